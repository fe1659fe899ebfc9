"""YAML configs: ``configs/defaults.yaml`` <- the chosen config file <- ``--set KEY=VALUE`` overrides.

Dotted keys address nested sections (``--set model.n_clusters=7``); values are parsed as YAML
(``--set image.scales=[1,2]``, ``--set data.image=null``). A key that the defaults do not know in a
section they define (or a section they do not define) is an error, so typos never pass silently.
"""
from __future__ import annotations

import copy
import difflib
import logging
import math
import os
import re
from pathlib import Path

import yaml

from data.errors import InputError
from data.readers import INPUT_FILE_KEYS   # the input paths of ``data`` and of each section spec

log = logging.getLogger("stpipe")


class _ConfigRules:
    """What a config's YAML reads differently from PyYAML's safe loader, mixed into each loader below:
    ``1e-4`` and ``3E5`` are numbers (PyYAML follows YAML 1.1, which wants ``1.0e-4``, and read ``lr: 1e-4``
    as a string, refused as "expected a number"); and a key given twice in one mapping is an error, as YAML
    itself wants keys unique (PyYAML keeps the last silently, so a config with two ``model:`` sections lost
    the first one's settings)."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.add_implicit_resolver("tag:yaml.org,2002:float",
                                  re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first: dict = {}
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node)
                if key in first:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} is given twice (lines {first[key] + 1} and "
                        f"{key_node.start_mark.line + 1}); YAML would keep only the second and silently drop "
                        "the first, so merge them into one", key_node.start_mark)
                first[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


class ConfigLoader(_ConfigRules, getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
    """PyYAML's safe loader with :class:`_ConfigRules`. It parses with libyaml (PyYAML's C extension, in
    PyYAML's wheels) where there is one: the pure-Python parser took ~25 ms for ``configs/defaults.yaml``,
    which every config load reads, libyaml ~2.5 ms, and both read the same values (a test compares them on
    every shipped config)."""


class PythonConfigLoader(_ConfigRules, yaml.SafeLoader):
    """:class:`ConfigLoader` with PyYAML's pure-Python parser, whose errors quote the line they are on
    (libyaml's give its number only): :func:`yaml_value` reads a text that libyaml refuses again with
    it, for the error a user sees."""


def yaml_value(text: str):
    """``text`` parsed as a config value (YAML, with :class:`ConfigLoader`); on an error, PyYAML's
    pure-Python parser's error (:class:`PythonConfigLoader`)."""
    try:
        return yaml.load(text, Loader=ConfigLoader)  # noqa: S506 -- a SafeLoader subclass
    except yaml.YAMLError:
        return yaml.load(text, Loader=PythonConfigLoader)  # noqa: S506 -- raises, with the line quoted


REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULTS_FILE = REPO_ROOT / "configs" / "defaults.yaml"


def deep_merge(base: dict, override: dict, strict: bool = False, where: str = "",
               reference: dict | None = None) -> dict:
    """Recursively merge ``override`` into a copy of ``base``. With ``strict``, a key that ``reference``
    (the defaults; ``base`` when not given) does not have is an error (a typo such as ``data.pth`` or
    ``modle.n_clusters`` would otherwise be ignored and the run would silently use the default), except
    inside a mapping that is empty in the defaults (free-form options such as ``image.options``), and a
    value is checked against the default's type (:func:`check_value`). The defaults, not what an earlier
    file or ``--set`` made of a key, decide: a config file's ``patch_cnn.use: false`` does not make
    ``--set superres.patch_cnn.use=auto`` a type error, nor its ``image.options: {scales: [1, 2]}`` make
    ``--set image.options.size=16`` an unknown key."""
    ref = base if reference is None else reference
    ref = ref if isinstance(ref, dict) else {}
    out = copy.deepcopy(base)
    for k, v in (override or {}).items():
        path = f"{where}.{k}" if where else k
        if strict and ref and k not in ref:
            close = difflib.get_close_matches(str(k), [str(b) for b in ref], n=1)
            hint = f" (did you mean {(where + '.' if where else '') + close[0]!r}?)" if close else ""
            raise InputError(f"unknown config key {path!r}{hint}; known keys in {where or 'the config'!r}: "
                             f"{sorted(ref)}")
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v, strict, path, ref.get(k) or {})   # null default: free-form, as when first set
        else:
            section = ref.get(k) if strict else None
            if isinstance(section, dict) and v is None:     # a section left empty in a file ('model:' alone)
                continue
            if isinstance(section, dict):
                example = next(iter(section), "KEY")
                raise InputError(f"{path}={v!r}: {path} is a section of settings, not a value; set its keys, e.g. "
                                 f"--set {path}.{example}=VALUE (in a config file, indented under '{k}:').")
            if strict:
                v = as_list(path, v)
                check_value(path, ref.get(k), v)
            out[k] = copy.deepcopy(v)
    return out


# keys that hold a list of whole numbers, each at least the minimum given (a single number is a one-item list,
# 'A-B' the numbers from A to B); kept sorted, without repeats
NUMBER_LISTS = {"cluster.sweep": (2, "numbers of domains, each at least 2", "[5, 6, 7, 8] or 5-8")}


def as_number_list(path: str, value) -> list[int]:
    """A :data:`NUMBER_LISTS` key's value as a sorted list of distinct whole numbers (see there)."""
    low, what, example = NUMBER_LISTS[path]
    items = value
    if isinstance(value, str) and re.fullmatch(r"\s*\d+\s*-\s*\d+\s*", value):
        a, b = (int(x) for x in value.split("-"))
        items = list(range(a, b + 1)) if a <= b else None
    elif _is_number(value):
        items = [value]
    if not isinstance(items, list) or not items or not all(
            _is_number(x) and math.isfinite(x) and float(x).is_integer() and x >= low for x in items):
        raise InputError(f"{path}={value!r}: expected {what}, e.g. --set '{path}={example.split(' or ')[0]}' "
                         f"(or {example.split(' or ')[1]}).")
    return sorted({int(x) for x in items})


def as_list(path: str, value):
    """A list key's value (:data:`LISTS`) as a list: a single word becomes a one-item list (gene lists
    split at commas: ``plot.genes=MOBP,PCP4``); a list must hold words. :data:`NUMBER_LISTS` keys as numbers
    (:func:`as_number_list`). Other keys pass unchanged."""
    if path in NUMBER_LISTS and value is not None:
        return as_number_list(path, value)
    if path not in LISTS or value is None:
        return value
    if isinstance(value, str):
        items = [w.strip() for w in value.split(",")] if LISTS[path] else [value]
        return [w for w in items if w]
    if not isinstance(value, list) or not all(isinstance(w, (str, int, float)) and not isinstance(w, bool)
                                              for w in value):
        raise InputError(f"{path}={value!r}: expected a list of names, e.g. [{'MOBP, PCP4' if LISTS[path] else 'NA'}].")
    return [str(w) for w in value]


# numeric keys whose default is null (so their type cannot be read from the defaults)
NUMERIC_NULL_DEFAULTS = {"model.n_clusters": int, "data.bin_um": int, "image.patch_size_fullres": float,
                         "wsi.mpp": float, "wsi.spot_diameter_um": float, "wsi.spot_spacing_um": float}
# the one whole-number default that may take a fraction (every other one is a count, a size or a seed)
FRACTIONAL_OK = {"superres.factor"}
# fractions: dropout probabilities (every key named dropout: [0, 1)) and these, with their ranges
FRACTIONS = {"enhance.alpha": (0.0, 1.0, True), "superres.val_fraction": (0.0, 1.0, False),
             "predict.patch_cnn.weight": (0.0, 1.0, True)}      # (low, high, high included)
# radii in spot spacings: at 10 a spot already has ~300 neighbours; far beyond, the "sparse" graphs
# turn dense (n^2 edges: 2.5 billion for 50,000 Visium HD bins)
MAXIMA = {"enhance.radius": 10, "graph.spatial_radius": 10, "predict.graph_radius": 10}
# sizes with the largest value that makes sense, and why: beyond, arrays of terabytes failed deep in NumPy
# (pixel sizes), or a sparse graph silently became complete (neighbour counts: n^2 edges)
UPPER_BOUNDS = {"wsi.tile_px": (16384, "level-0 pixels read at once; memory is bounded by the tile, 0.8 GB as RGB "
                                       "at 16,384 px"),
                **{f"graph.{k}": (100, "neighbours per spot in a kNN graph; more make the sparse graph dense, and "
                                       "on a slide with fewer spots it joins every spot to every other")
                   for k in ("gene_k", "image_k")},
                **{f"{stage}.patch_cnn.px": (512, "the side a patch is resampled to for the patch CNN; every patch "
                                                  "of a batch and of the training set is held at that size")
                   for stage in ("superres", "predict")}}
# keys with a lower bound other than 0 or 1, and why
MINIMUMS = {"wsi.tile_px": (256, "level-0 pixels read at once; smaller tiles multiply the reads (a 40,000 px "
                                 "slide in 8 px tiles is 25 million of them)"),
            **{f"{stage}.patch_cnn.px": (16, "the CNN halves the patch three times") for stage in ("superres", "predict")},
            "model.decoder_batch": (2, "the decoder's batch normalisation needs at least 2 spots"),
            **{f"{stage}.patch_cnn.batch": (2, "the patch CNN's batch normalisation needs 2 patches; batches of 1 "
                                                "were skipped, so the network never trained")
               for stage in ("superres", "predict")},
            "superres.patch_cnn.folds": (2, "cross-fitting: each network predicts the training pairs of the other "
                                            "folds, so one fold leaves none"),
            "model.n_clusters": (2, "a domain map needs at least 2 domains; null: as many as the truth has labels"),
            "enhance.sigma": (0.1, "the Gaussian's width in spot spacings; narrower, the weights of neighbours one "
                                   "spacing away vanish (below ~0.03 they underflow to 0) and nothing is enhanced"),
            **{key: (1, "in spot spacings; the nearest spots are one spacing apart, so below 1 no spot has a "
                        "neighbour and the graph is empty") for key in MAXIMA}}
# single values a key's range would let through but that cannot work, and why
EXCLUDED = {"cluster.sweep_resamples": (1, "the stability compares pairs of fits, so give 0 (no stability) or at least "
                                           "2")}
# keys that take one of a few words, and where the words are kept: (module, tuple), the module that uses
# the key (and refuses a wrong word there too); checked here before any work, since a wrong word used to
# stop only when its stage came, after the slide was read or earlier stages had run
CHOICES = {"image.use": ("image_process.patches", "IMAGE_USES"),
           "enhance.kernel": ("positions_enhancement.spatial_weights", "KERNELS"),
           "cluster.covariance": ("pipeline.clustering", "COVARIANCES"),
           "cluster.seeds": ("pipeline.domains", "SEED_DOMAINS"),
           "model.decoder_start": ("pipeline.domains", "DECODER_STARTS"),
           "markers.method": ("pipeline.domains", "MARKER_METHODS"),
           "predict.feature_norm": ("pipeline.expression_prediction", "FEATURE_NORMS"),
           "wsi.grid": ("pipeline.wsi_prediction", "GRID_LAYOUTS"),
           "superres.patch_cnn.use": ("pipeline.superres_patches", "PATCH_CNN_USES"),
           "predict.patch_cnn.use": ("pipeline.superres_patches", "PATCH_CNN_USES"),
           "preprocess.flavor": ("pipeline.preprocess", "GENE_FLAVORS"),
           "eval.protocol": ("pipeline.superres", "PROTOCOLS"),
           "output.compression": ("pipeline.stages", "H5AD_COMPRESSIONS")}


NULL_CHOICES = {"markers.method"}      # keys of CHOICES with a default that also take null ("none")


def choices(path: str) -> tuple:
    """The words ``path`` (a key of :data:`CHOICES`) takes, from the module that uses it."""
    import importlib

    module, name = CHOICES[path]
    return getattr(importlib.import_module(module), name)
# keys that hold a list: a single word is taken as a one-item list (a gene list, comma-separated, as
# several); a string was iterated letter by letter (superres.genes=MOBP: "genes not in the slide: M, O,
# B, P"; data.truth_missing=Layer1 left Layer1 annotated, silently)
LISTS = {"data.truth_missing": False, "plot.genes": True, "superres.genes": True, "superres.plot_genes": True,
         "predict.genes": True, "predict.plot_genes": True}      # key -> split on commas
# whole-number keys with a positive default for which 0 still means something (every other one is a
# count or a size, where 0 would fail late or, as n_top_genes=0 did, silently mean something else)
ZERO_OK = {"preprocess.min_spots", "predict.n_gcn", "cluster.sweep_resamples"}


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def check_value(path: str, default, value) -> None:
    """Refuse an override whose type cannot be right, before it fails deep inside a library: a number
    where the default is a number (non-negative, as every numeric default is: counts, rates, weights,
    seeds; a whole number where the default is one, and at least 1 where the default is a positive
    whole number, a count or a size, unless listed in ``ZERO_OK``), true/false where the default is a boolean. null
    is always accepted (it means "off" or "automatic" where a key allows it; the code checks those)."""
    if value is None:
        return
    if path in CHOICES:
        words = choices(path)
        if not any(value is c if isinstance(c, bool) or isinstance(value, bool) else value == c for c in words):
            words = ", ".join(str(c).lower() if isinstance(c, bool) else c for c in words)
            raise InputError(f"{path}={value!r}: choose one of {words}"
                             + (" or null" if default is None or path in NULL_CHOICES else "")
                             + (f" (default {default!r})" if default is not None else "") + ".")
        return
    kind = NUMERIC_NULL_DEFAULTS.get(path)
    if kind is None and _is_number(default):
        kind = int if isinstance(default, int) and path not in FRACTIONAL_OK else float
    if kind is not None:
        if not _is_number(value) or not math.isfinite(value) or (kind is int and not float(value).is_integer()):
            raise InputError(f"{path}={value!r}: expected {'a whole number' if kind is int else 'a number'}"
                             + (f" (default {default!r})" if default is not None else "") + ".")
        if value < 0:
            raise InputError(f"{path}={value!r}: must not be negative.")
        if value == 0 and path in NUMERIC_NULL_DEFAULTS and path not in MINIMUMS:   # sizes, resolutions
            raise InputError(f"{path}=0: must be greater than 0 (or null, its automatic choice).")
        if path in EXCLUDED and value == EXCLUDED[path][0]:
            raise InputError(f"{path}={value!r}: {EXCLUDED[path][1]} (default {default!r}).")
        if value == 0 and path.split(".")[-1] == "lr":     # every learning rate (stages 3, 4, 5, patch CNNs)
            raise InputError(f"{path}=0: must be greater than 0 (default {default!r}); at 0 training never moves the "
                             "networks from their random start.")
        if value == 0 and kind is int and _is_number(default) and default > 0 and path not in ZERO_OK:
            raise InputError(f"{path}=0: must be at least 1 (default {default!r})"
                             + ("; null selects every gene." if path.endswith("n_top_genes") else "."))
        if path in MAXIMA and value > MAXIMA[path]:
            raise InputError(f"{path}={value!r}: at most {MAXIMA[path]} spot spacings (~300 neighbours per spot; "
                             f"default {default!r}); a larger radius makes the spatial graph dense.")
        if path in UPPER_BOUNDS and value > UPPER_BOUNDS[path][0]:
            raise InputError(f"{path}={value!r}: at most {UPPER_BOUNDS[path][0]} ({UPPER_BOUNDS[path][1]}; "
                             f"default {default!r}).")
        if path in MINIMUMS and value < MINIMUMS[path][0]:
            raise InputError(f"{path}={value!r}: must be at least {MINIMUMS[path][0]} ({MINIMUMS[path][1]}).")
        low, high, closed = FRACTIONS.get(path, (0.0, 1.0, False) if path.split(".")[-1] == "dropout" else (None,) * 3)
        if high is not None and not (value <= high if closed else value < high):
            raise InputError(f"{path}={value!r}: must be in [{low:g}, {high:g}{']' if closed else ')'} "
                             f"(default {default!r}).")
    elif isinstance(default, bool) and not isinstance(value, bool):
        raise InputError(f"{path}={value!r}: expected true or false (default {str(default).lower()}).")


def one_line(exc: Exception) -> str:
    """A YAML error (several lines, with a caret drawing) as one line."""
    text = " ".join(part.strip() for part in str(exc).splitlines() if part.strip() and part.strip() != "^")
    return text.replace(' in "<unicode string>",', " at")


def _read_yaml(path: Path) -> dict:
    if not path.exists():
        raise InputError(f"{path}: config file not found (--config).")
    if path.is_dir():
        found = sorted(p.name for p in path.glob("*.yaml"))[:6]
        raise InputError(f"{path}: a folder, not a config file (--config)"
                         + (f"; it holds {', '.join(found)}." if found else "."))
    try:
        data = yaml_value(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise InputError(f"{path}: not valid YAML ({one_line(exc)}).") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot be read as a YAML config ({getattr(exc, 'strerror', None) or exc}).") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: a config must be a YAML mapping of sections.")
    return data


def parse_override(item: str) -> dict:
    """``'a.b=3'`` -> ``{'a': {'b': 3}}`` (value parsed as YAML)."""
    if "=" not in item:
        raise InputError(f"--set {item!r}: expected KEY=VALUE, e.g. --set model.n_clusters=7")
    key, raw = item.split("=", 1)
    try:
        value = yaml_value(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise InputError(f"--set {item!r}: value is not valid YAML ({one_line(exc)}).") from None
    node: dict = {}
    cur = node
    parts = key.strip().split(".")
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
    cur[parts[-1]] = value
    return node


def load_config(path=None, overrides=(), defaults_file: Path = DEFAULTS_FILE, extra_files=()) -> dict:
    """Defaults <- config file <- extra files (e.g. the demo's) <- overrides, as a plain nested dict."""
    defaults = _read_yaml(Path(defaults_file))
    cfg = defaults
    for f in ([path] if path else []) + list(extra_files):   # e.g. configs/x.yaml from any folder
        file = Path(resolve_path(f))
        cfg = deep_merge(cfg, anchor_relative_paths(_read_yaml(file), file.parent), strict=True, reference=defaults)
    for item in overrides or ():
        cfg = deep_merge(cfg, parse_override(item), strict=True, reference=defaults)
    check_loss_terms(cfg)
    check_sampling_steps(cfg)
    return cfg


# loss weights that train a network's output on the data: at 0 the network keeps its random start and
# its output is written as a result (keys -> what they train); each group needs one weight above 0
LOSS_TERMS = {("model.zinb_weight",): "the ZINB decoder, which gives layers['denoised'] and fits the embedding "
                                      "to the counts (a small value weakens it)",
              ("predict.mse_weight", "predict.pcc_weight"): "the GCN decoder that predicts each gene from the "
                                                            "image embedding"}


def check_loss_terms(cfg: dict) -> None:
    """Refuse a config that sets every loss term of a decoder to 0 (:data:`LOSS_TERMS`): it trained
    nothing and wrote its random output as denoised or predicted expression, silently."""
    def get(path):
        node = cfg
        for part in path.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        return node
    for group, trains in LOSS_TERMS.items():
        values = [get(k) for k in group]
        if all(_is_number(v) and v == 0 for v in values):
            keys_ = " and ".join(f"{k}=0" for k in group)
            raise InputError(f"{keys_}: nothing would train {trains}; its untrained output would be written as the "
                             "result. Keep " + ("it" if len(group) == 1 else "one of them") + " above 0.")


def check_sampling_steps(cfg: dict) -> None:
    """Refuse ``superres.sampling_steps`` above ``superres.diffusion_steps``: DDIM visits each noise level
    at most once, so more steps repeat levels (steps that change nothing) and only multiply the sampling
    time (5,000 on the demo ran for minutes where 20 take seconds)."""
    sr = cfg.get("superres") or {}
    n, levels = sr.get("sampling_steps"), sr.get("diffusion_steps")
    if _is_number(n) and _is_number(levels) and n > levels:
        raise InputError(f"superres.sampling_steps={n} is more than superres.diffusion_steps={levels}: DDIM visits "
                         "each noise level at most once, so the extra steps only repeat levels. At most "
                         f"{levels} (default 20).")


def resolve_path(p, must_exist: bool = False) -> str | None:
    """A config path: absolute, or relative to the working directory, else to the repository root."""
    if p in (None, ""):
        return None
    path = Path(str(p)).expanduser()
    if not path.is_absolute() and not path.exists() and (REPO_ROOT / path).exists():
        path = REPO_ROOT / path
    if must_exist and not path.exists():
        raise InputError(f"{path}: not found.")
    return str(path)


def input_file(cfg: dict, key: str, what: str, own=None, own_name: str = "", own_fix: str = "") -> Path | None:
    """The file the config key ``key`` (``'section.name'``) names, looked for as every input path is
    (:func:`resolve_path`); None when unset. Refused, naming the key: the ``--out``'s own output ``own``
    (``own_name``; each run writes it anew, so a run reading it would never be up to date; ``own_fix`` says
    what to do), and a missing file (``what`` says which file the key takes)."""
    section, name = key.split(".")
    given = (cfg.get(section) or {}).get(name)
    if not given:
        return None
    path = Path(resolve_path(given))
    if own is not None and path.resolve() == Path(own).resolve():
        raise InputError(f"{key}={given} is this --out's own {own_name}, which each run writes anew: {own_fix}")
    if not path.is_file():
        raise InputError(f"{key}={given}: no such file ({what}).")
    return path


def map_input_paths(cfg: dict, fn) -> dict:
    """A copy of ``cfg`` with every input path replaced by ``fn(value, key)``: ``data.*`` file keys, the
    specs of ``train.sections`` / ``test.sections`` (a mapping, or a bare path), ``image.weights`` and
    ``predict.model_file``, ``superres.model_file``, ``cluster.reference``; ``key`` names the place
    (``'train.sections.image'``).
    Only non-empty strings are passed."""
    def one(value, key):
        return fn(value, key) if isinstance(value, str) and value.strip() else value

    def spec(item, key):
        if isinstance(item, dict):
            return {k: one(v, f"{key}.{k}") if k in INPUT_FILE_KEYS else v for k, v in item.items()}
        return one(item, key)

    out = copy.deepcopy(cfg)
    if isinstance(out.get("data"), dict):
        out["data"] = spec(out["data"], "data")
    for section in ("train", "test"):
        specs = (out.get(section) or {}).get("sections") if isinstance(out.get(section), dict) else None
        if isinstance(specs, list):
            out[section]["sections"] = [spec(s, f"{section}.sections") for s in specs]
    for section, key in (("image", "weights"), ("predict", "model_file"), ("superres", "model_file"),
                         ("cluster", "reference")):
        if isinstance(out.get(section), dict) and key in out[section]:
            out[section][key] = one(out[section][key], f"{section}.{key}")
    return out


def anchor_relative_paths(file_cfg: dict, folder: Path) -> dict:
    """``file_cfg`` (one config file's contents) with each relative input path that exists neither from
    the working directory nor from the repository (where :func:`resolve_path` looks) but does from
    ``folder``, the config file's own folder, made absolute there: a config kept beside its data
    (``data.path: slides/A1``) then works from any directory."""
    def anchored(value, key):
        rel = Path(value).expanduser()
        if rel.is_absolute() or rel.exists() or (REPO_ROOT / rel).exists() or not (folder / rel).exists():
            return value
        log.info("%s: %s taken relative to the config file's folder: %s", key, value, folder / rel)
        return str(folder / rel)

    return map_input_paths(file_cfg, anchored)


def absolute_input_paths(cfg: dict) -> dict:
    """``cfg`` with every input path that exists (:func:`resolve_path`: from the working directory, else
    the repository) made absolute, so the config a run saves (``config.<script>.yaml``) repeats it from
    any directory, and a path spelled two ways (``slides/A1``, ``./slides/A1``) is one input to the
    reruns' fingerprints. A path found nowhere is left as given, for its stage's error to name."""
    def absolute(value, key):
        found = Path(resolve_path(value))
        return os.path.abspath(found) if found.exists() else value    # symbolic links kept as given

    return map_input_paths(cfg, absolute)


def resolve_data_paths(data_cfg: dict) -> dict:
    """Resolve every path-valued key of a ``data`` (or section) mapping."""
    out = dict(data_cfg or {})
    for k in INPUT_FILE_KEYS:
        if out.get(k):
            out[k] = resolve_path(out[k])
    return out


def model_name(cfg: dict, choices: tuple, default: str, alias: str | None = None) -> str:
    """The model a stage script runs: ``model.name`` (the issue's key for every script), else the
    older spelling ``alias`` (``superres.model`` for stage 4), else ``default``. A name that is not
    in ``choices`` -- e.g. a stage-4 model given to the stage-3 script -- is an error, as is
    ``model.name`` disagreeing with the alias, so a run never silently trains another model."""
    name = (cfg.get("model") or {}).get("name")
    other = None
    if alias:
        section, key = alias.split(".")
        other = (cfg.get(section) or {}).get(key)
    if name is not None and other is not None and name != other:
        raise InputError(f"model.name={name!r} but {alias}={other!r}: set only one (model.name).")
    chosen = name if name is not None else other if other is not None else default
    if chosen not in choices:
        key = "model.name" if name is not None else alias
        raise InputError(f"{key}={chosen!r}: this script runs {' or '.join(map(repr, choices))}.")
    return chosen
