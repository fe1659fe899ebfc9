"""Section specs: the lists of sections a stage trains on or predicts (``train.sections``,
``test.sections``).

A *section spec* is a mapping with the keys of the ``data`` config section (``path``, or
``counts``/``spots``, plus ``image``) and an optional ``name``; a spec with only ``image`` is a
whole-slide image without spots (stage 5).
"""
from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

from data.errors import InputError
from data.readers import check_input_files
from pipeline.config import load_config, resolve_data_paths


def safe_folder_name(name: str) -> bool:
    """Whether a section name can be one folder under ``--out`` (``<out>/<name>/``): not empty, ``.`` or
    ``..``, and without path separators or control characters (``../x`` would write outside ``--out``)."""
    return name.strip() not in ("", ".", "..") and not re.search(r"[/\\\x00-\x1f]", name)


def require_image_use(cfg: dict, stage: str) -> None:
    """``image.use=none`` refused for a stage that reads the H&E (stages 4 and 5; stages 1-3 run without
    one): the refusal names the key, where a missing image would be blamed on the slide's files."""
    if (cfg.get("image") or {}).get("use") == "none":
        raise InputError(f"image.use=none: {stage} is guided by the H&E image and cannot run without it (stages "
                         "1-3 can); set image.use=auto (or fullres, hires, lowres).")


@lru_cache(maxsize=1)
def section_keys() -> frozenset:
    """The keys a section spec may have: those of the ``data`` config section (``configs/defaults.yaml``)."""
    return frozenset(load_config()["data"])


def section_name(spec: dict, i: int) -> str:
    if spec.get("name"):
        return str(spec["name"])
    for k in ("path", "counts", "image"):
        if spec.get(k):
            return Path(str(spec[k])).name.split(".")[0]
    return f"section{i}"


def spec_from_string(item: str) -> dict:
    """A section given as a bare path: a whole-slide or plain image file, or an OME-Zarr image folder (a
    SpatialData store's ``images/<name>``), is ``{image: ...}`` (stage 5 predicts it as a whole slide),
    anything else ``{path: ...}`` (a Space Ranger folder, an .h5ad, a SpatialData store)."""
    from data.readers import JPEG_SUFFIXES, TIFF_SUFFIXES
    from data.wsi import VENDOR_SUFFIXES, ome_multiscales
    image = item.lower().endswith(VENDOR_SUFFIXES + TIFF_SUFFIXES + JPEG_SUFFIXES + (".png",)) \
        or ome_multiscales(item) is not None
    return {"image" if image else "path": item}


def check_section_specs(specs, key: str) -> list[dict]:
    """Validate a list of section specs from the config key ``key`` (e.g. ``train.sections``). A single
    spec may stand for the list, and a bare path for a spec (:func:`spec_from_string`):
    ``--set 'train.sections=[../dlpfc/151674]'`` works as ``[{path: ../dlpfc/151674}]``."""
    if specs is None:
        return []
    if isinstance(specs, (dict, str)):
        specs = [specs]
    if isinstance(specs, list):
        specs = [spec_from_string(s) if isinstance(s, str) else s for s in specs]
    if not isinstance(specs, list) or not all(isinstance(s, dict) for s in specs):
        raise InputError(f"{key}: expected a list of mappings like [{{counts: a.tsv.gz, spots: a_sel.tsv, "
                         f"image: a.jpg, name: A}}]; got {specs!r}.")
    out, seen = [], set()
    for i, s in enumerate(specs):
        unknown = set(s) - section_keys()
        if unknown:
            raise InputError(f"{key}[{i}]: unknown key(s) {sorted(unknown)}; a section has path, or counts + "
                             "spots, plus image, name (and bin_um for Visium HD).")
        s = dict(s, name=section_name(s, i))
        if not safe_folder_name(s["name"]):
            raise InputError(f"{key}[{i}]: name {s['name']!r} cannot be a folder name in --out, where the section's "
                             "outputs go (<out>/<name>/); give a name without '/', '\\' or control characters.")
        check_input_files(resolve_data_paths(s), where=f"{key} {s['name']}")
        if s["name"] in seen:
            raise InputError(f"{key}: two sections are named {s['name']!r} (a name defaults to the file or folder "
                             "name); give each a distinct one, e.g. {path: ..., name: A}.")
        seen.add(s["name"])
        out.append(s)
    return out


def section_inputs(specs) -> list:
    files = []
    for s in specs:
        d = resolve_data_paths(s)
        files += [d[k] for k in ("path", "counts", "spots", "image") if d.get(k)]
    return files


def check_disjoint(train_specs, test_specs, what: str = "test section") -> None:
    """A predicted section (``what``) may not also be a training section: same name, same input files,
    or the same counts under another path (a copied file or folder: :func:`counts_content_key`)."""
    train_names = {s["name"] for s in train_specs}
    train_files = {str(Path(f).resolve()) for s in train_specs
                   for k, f in resolve_data_paths(s).items() if k in ("path", "counts") and f}
    train_content = {counts_content_key(resolve_data_paths(s)): s["name"] for s in train_specs}
    train_content.pop(None, None)
    for s in test_specs:
        d = resolve_data_paths(s)
        same = [f for k, f in d.items() if k in ("path", "counts") and f and str(Path(f).resolve()) in train_files]
        if s["name"] in train_names or same:
            raise InputError(f"{what} {s['name']!r} is also a training section "
                             f"({same[0] if same else 'same name'}); a section predicted must stay out of training.")
        copy_of = train_content.get(counts_content_key(d))
        if copy_of is not None:
            raise InputError(f"{what} {s['name']!r} has the same counts as training section {copy_of!r} (a copy of "
                             "its file); a section predicted must stay out of training.")


CONTENT_BYTES = 16 * 2 ** 20    # bytes of a count file hashed to recognise a copy (with its size)


def counts_content_key(spec: dict):
    """(size, sha256 of the first 16 MB) of a section's count file: the legacy table, the ``.h5ad``, or a
    Space Ranger folder's filtered matrix (``.h5``, else the MEX ``matrix.mtx.gz``); None when there is
    none. Two sections with one key hold the same counts, whatever their paths."""
    import hashlib

    from data.readers import spaceranger_outs
    f = spec.get("counts") or spec.get("path")
    if not f:
        return None
    f = Path(f)
    if f.is_dir():
        outs = spaceranger_outs(f)
        f = next((c for c in (outs / "filtered_feature_bc_matrix.h5", outs / "filtered_feature_bc_matrix" /
                              "matrix.mtx.gz") if c.is_file()), None)
    if f is None or not f.is_file():
        return None
    with open(f, "rb") as fh:
        return f.stat().st_size, hashlib.sha256(fh.read(CONTENT_BYTES)).hexdigest()


def is_whole_slide_spec(spec: dict) -> bool:
    """A spec with an image and neither a Space Ranger/h5ad path nor a count table."""
    return bool(spec.get("image")) and not spec.get("path") and not spec.get("counts")


def read_section(spec: dict, image_cfg: dict, label: str, needs_image: str):
    """Read a section spec: (AnnData, its SlideImage, spot diameter in full-resolution px).

    The image is the full-resolution one (``image``) when given, else the Space Ranger folder's
    hires/lowres PNG. Errors name the section as ``label NAME``; ``needs_image`` says why an image
    is required (e.g. "Stage 5 predicts expression from the H&E image").
    """
    from data.readers import read_slide
    from image_process.features import spot_diameter_fullres
    from image_process.patches import choose_image

    spec = resolve_data_paths(spec)
    try:
        adata = read_slide(spec)
        use = image_cfg.get("use", "auto")
        image = None if use == "none" else choose_image(adata, use)
        if image is None:
            raise InputError(f"no image. {needs_image}: give the section's full-resolution image as 'image' (or a "
                             "Space Ranger folder with spatial/tissue_hires_image.png).")
    except InputError as exc:
        raise InputError(f"{label} {spec.get('name')}: {exc}") from None
    return adata, image, spot_diameter_fullres(adata, image_cfg)
