"""``--demo``: each script run on synthetic slides the project generates in ``<out>`` (no data needed).

* stages 1-3 (``run_dlpfc.py``, ``run_breast_cancer.py``): one synthetic Visium slice with its truth;
* stage 4 (``train_superres.py``): the same slice under the ``recovery`` protocol (unless
  ``eval.protocol`` is set), so the run prints a score as well as writing the super-resolved grid;
* stage 5 (``predict_expression.py``): trained on one synthetic slice, predicting another section of
  the same synthetic tissue (same gene programmes, other counts and image texture), scored against
  its counts.

The synthetic slices are made once per output folder (``<out>/demo_slice*``) and every ``data`` /
``train`` / ``test`` input of the config is replaced by them; other keys stay as configured.
"""
from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger("stpipe")

DEMO_DATA_KEYS = {"counts": None, "spots": None, "image": None, "truth_column": None, "bin_um": None}


# the inputs every --demo replaces (prepare_*_demo below); a --set of one is not used
DEMO_REPLACED_KEYS = ("data.path", "data.truth", "data.name", "train.sections", "test.sections",
                      *(f"data.{k}" for k in DEMO_DATA_KEYS))


def warn_replaced_overrides(overrides) -> None:
    """Warn about each ``--set`` of an input that ``--demo`` replaces by its synthetic slides
    (``--demo --set data.truth=mine.txt`` scored against the demo's own labels without a word)."""
    for item in overrides or ():
        key = str(item).split("=", 1)[0].strip()
        if key in DEMO_REPLACED_KEYS or key.startswith(("train.sections.", "test.sections.")):
            log.warning("--demo runs on its own synthetic slides: --set %s is not used (drop --demo to use it)",
                        item)


def demo_slice(out: Path, name: str = "demo_slice", **shape) -> Path:
    """The synthetic Space Ranger folder ``<out>/<name>`` (generated on first use, in a few seconds;
    ``shape``: :func:`data.synthetic.make_synthetic_visium`'s arguments, default the 40 x 40 demo slice).
    Written whole or not at all (:func:`pipeline.stages.atomic_write`: a full disk is one error line, and
    no half-written slide is left to be read); a folder missing any of its files (one cut short by an
    older version) is made again."""
    from data.synthetic import SYNTHETIC_VISIUM_FILES, make_synthetic_visium
    from pipeline.stages import atomic_write

    folder = Path(out) / name
    if not all((folder / f).is_file() for f in SYNTHETIC_VISIUM_FILES):
        atomic_write(folder, lambda tmp: make_synthetic_visium(tmp, **{"seed": 0, **shape}))
    return folder


def prepare_demo(cfg: dict, out: Path) -> dict:
    """Stages 1-3: ``cfg['data']`` pointed at the synthetic slice and its truth."""
    folder = demo_slice(out)
    cfg["data"] = {**cfg["data"], **DEMO_DATA_KEYS, "path": str(folder), "truth": str(folder / "truth.txt"),
                   "name": "demo"}
    return cfg


def prepare_superres_demo(cfg: dict, out: Path) -> dict:
    """Stage 4: the synthetic slice as ``data`` (no truth: stage 4 does not use labels), no extra
    training sections, and the recovery protocol unless ``eval.protocol`` is set."""
    folder = demo_slice(out)
    cfg["data"] = {**cfg["data"], **DEMO_DATA_KEYS, "path": str(folder), "truth": None, "name": "demo"}
    cfg["train"] = {**cfg.get("train", {}), "sections": []}
    cfg["eval"] = {**cfg.get("eval", {}), "protocol": cfg.get("eval", {}).get("protocol") or "recovery"}
    return cfg


def prepare_predict_demo(cfg: dict, out: Path) -> dict:
    """Stage 5: train on one synthetic slice, predict and score another section of the same synthetic
    tissue (the same gene programmes; other counts and image texture); 24 x 24 spots each, for speed."""
    same_tissue = dict(n_rows=24, n_cols=24, program_seed=0)
    train = demo_slice(out, "demo_slice_train", seed=1, **same_tissue)
    test = demo_slice(out, "demo_slice_test", seed=2, **same_tissue)
    cfg["train"] = {**cfg.get("train", {}), "sections": [{"path": str(train), "name": "demo_train"}]}
    cfg["test"] = {**cfg.get("test", {}), "sections": [{"path": str(test), "name": "demo_test"}]}
    if (cfg.get("predict") or {}).get("model_file"):
        log.warning("--demo trains on its own synthetic slice: predict.model_file=%s is not used",
                    cfg["predict"]["model_file"])
    cfg["predict"] = {**cfg.get("predict", {}), "model_file": None}
    return cfg
