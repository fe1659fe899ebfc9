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
                             "spots, plus image (and image_affine placing it), name (and bin_um for Visium HD).")
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


def refuse_training_sections_beside(model_key: str, model_file, train_specs) -> None:
    """A saved model (stage 4's ``superres.model_file``, stage 5's ``predict.model_file``) predicts without
    training, so ``train.sections`` given beside it would be read for nothing: refused, naming them."""
    if train_specs:
        raise InputError(f"{model_key}={model_file} predicts with a trained model, so train.sections "
                         f"({', '.join(s['name'] for s in train_specs)}) would not be used: unset one of them "
                         "(--set 'train.sections=[]').")


def section_inputs(specs) -> list:
    """The files the section specs read (:func:`data.readers.data_files`), for stage fingerprints."""
    from data.readers import data_files
    return [f for s in specs for f in data_files(resolve_data_paths(s))]


def section_source(spec: dict) -> tuple:
    """(path, pick): what a resolved section spec reads, as a key two specs share only when they read the
    same sample. ``path`` is its count table or its ``path`` (resolved); ``pick`` is None, or for a
    container of several samples the one the spec's name picks: a HEST-1k folder is its sample's
    ``st/<id>.h5ad``; a folder of several GEO samples, a SpatialData store of several tables or slides and
    an ``.h5ad`` (or AnnData ``.zarr``) of several libraries keep their path, with the sample prefix,
    (table, region) or library.
    A name that picks nothing leaves the pick None (reading the section then says why)."""
    from data.readers import hest_sample, zarr_store_kind

    if spec.get("counts") or not spec.get("path"):          # a legacy ST table, or a whole-slide image (no counts)
        return (str(Path(spec["counts"]).resolve()) if spec.get("counts") else None, None)
    path, name = Path(spec["path"]).resolve(), spec.get("name")
    try:
        hest = hest_sample(path, name)
        if hest is not None:
            return str(hest[0].resolve()), None
        if path.is_dir() and zarr_store_kind(path) == "spatialdata":
            from data.spatialdata_store import _choose_table, _table_regions
            table, folder = _choose_table(path, name)
            regions = _table_regions(folder)
            return str(path), (table, regions[0] if len(regions) == 1 else str(name) if str(name) in regions else None)
        if path.is_dir() and zarr_store_kind(path) != "anndata":
            from data.geo_layout import choose_sample, find_geo_samples
            samples = find_geo_samples(path)
            return str(path), choose_sample(samples, path, name, option="data.name") if len(samples) > 1 else None
        if path.suffix == ".h5ad" or path.is_dir():         # an .h5ad, or an AnnData .zarr folder
            libraries = _library_ids(path)
            return str(path), str(name) if len(libraries) > 1 and str(name) in libraries else None
    except Exception:  # noqa: BLE001 - a file that cannot be looked into: keyed by its path (reading it says why)
        pass
    return str(path), None


def _library_ids(path: Path) -> list[str]:
    """The libraries under ``uns['spatial']`` of an .h5ad or an AnnData .zarr folder, read without the data."""
    if path.is_dir():
        import zarr
        group = zarr.open_group(str(path), mode="r")
        return list(group["uns"]["spatial"].group_keys()) if "uns" in group and "spatial" in group["uns"] else []
    import h5py
    with h5py.File(path, "r") as f:
        return list(f["uns/spatial"].keys()) if "uns/spatial" in f else []


def check_disjoint(train_specs, test_specs, what: str = "test section") -> None:
    """A predicted section (``what``) may not also be a training section: same name, same input files,
    or the same counts under another path (a copied file or folder: :func:`counts_content_key`)."""
    train_names = {s["name"] for s in train_specs}
    train_sources = {section_source(resolve_data_paths(s)) for s in train_specs}
    train_content = {counts_content_key(resolve_data_paths(s)): s["name"] for s in train_specs}
    train_content.pop(None, None)
    for s in test_specs:
        d = resolve_data_paths(s)
        source = section_source(d)
        same = source[0] is not None and source in train_sources
        if s["name"] in train_names or same:
            where = (source[0] + (f", {source[1]}" if source[1] else "")) if same else "same name"
            raise InputError(f"{what} {s['name']!r} is also a training section "
                             f"({where}); a section predicted must stay out of training.")
        copy_of = train_content.get(counts_content_key(d))
        if copy_of is not None:
            raise InputError(f"{what} {s['name']!r} has the same counts as training section {copy_of!r} (a copy of "
                             "its file); a section predicted must stay out of training.")


CONTENT_BYTES = 16 * 2 ** 20    # bytes of a count file hashed to recognise a copy (with its size)


def counts_content_key(spec: dict):
    """(size, sha256 of the first 16 MB, the sample picked in it) of a section's count file: the legacy table,
    the ``.h5ad`` (a HEST-1k sample's), or a Space Ranger folder's filtered matrix (``.h5``, else the MEX
    ``matrix.mtx.gz``); None when there is none. Two sections with one key hold the same counts, whatever
    their paths (:func:`section_source` gives the file and the pick)."""
    import hashlib

    from data.readers import spaceranger_outs
    f, pick = section_source(spec) if (spec.get("counts") or spec.get("path")) else (None, None)
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
        return f.stat().st_size, hashlib.sha256(fh.read(CONTENT_BYTES)).hexdigest(), pick


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

    spec = resolve_data_paths(spec)
    try:
        adata = read_slide(spec)
        image, diameter = section_image(adata, image_cfg, needs_image)
    except InputError as exc:
        raise InputError(f"{label} {spec.get('name')}: {exc}") from None
    return adata, image, diameter


def section_image(adata, image_cfg: dict, needs_image: str, how: str = "as 'image' (or a Space Ranger folder with "
                  "spatial/tissue_hires_image.png)") -> tuple:
    """(SlideImage, spot diameter in full-resolution px) of a slide read, by ``image.use``; a slide
    without an image is refused, ``needs_image`` saying why and ``how`` how to give one."""
    from image_process.features import spot_diameter_fullres
    from image_process.patches import choose_image

    use = image_cfg.get("use", "auto")
    image = None if use == "none" else choose_image(adata, use)
    if image is None:
        raise InputError(f"no image. {needs_image}: give the section's full-resolution image {how}.")
    return image, spot_diameter_fullres(adata, image_cfg)
