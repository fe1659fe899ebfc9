"""A SpatialData store (a ``.zarr`` folder written by spatialdata, e.g. from spatialdata-io's ``visium``
reader) read as one slide, without spatialdata installed: only zarr, anndata and pyarrow.

What is read (the store's layout, spatialdata 0.2-0.7):

* ``tables/<name>``: an AnnData (counts in ``X``) whose ``uns['spatialdata_attrs']`` names the element it
  annotates (``region``), the obs column saying which rows belong to it (``region_key``) and the obs
  column matching rows to that element's shapes (``instance_key``);
* ``shapes/<region>/shapes.parquet``: one shape per spot (GeoParquet: WKB points with a ``radius``
  column, as Visium spots are written; or polygons, as Visium HD bins are), its coordinate
  transformations in the group's attributes;
* ``images/<name>``: OME-Zarr multiscale images, each with transformations into named coordinate systems.

The slide is placed in one coordinate system that the spots' shapes reach keeping their shape (a scale,
rotation or translation; spatialdata-io names it after the dataset: Visium's full-resolution pixels),
preferring the one most images reach and then one the shapes reach unchanged. Spot centres become
``obsm['spatial']`` in that system's units, and each image reaching it becomes
``uns['spatial'][region]['images']`` with its ``tissue_<kind>_scalef`` (image px per unit). An image at
scale 1 is the full-resolution image, read from the store region by region (``metadata['fullres_path']``)
and never loaded here. When an image is finer than the system's unit (e.g. a system in microns), the
units are scaled so that the finest image is at scale 1. An image placed by more than a scale (a crop's
translation, a registration's rotation or affine) is resampled into the spots' frame
(:class:`data.wsi.PlacedImage`): a hires/lowres one here, at its own resolution; the full-resolution one
as the stages read it, its affine in ``metadata['fullres_placement']``. The result goes through the same
checks as an ``.h5ad`` (:func:`data.readers.conform_anndata`).
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd

from data import keys
from data.errors import InputError
from data.wsi import PlacedImage, axis_names, ome_multiscales, open_whole_slide, stain_channels, zarr_attributes

log = logging.getLogger("stpipe")
KIND_WORDS = {"hires": ("hires",), "lowres": ("lowres",)}    # image names that say their kind (spatialdata-io's)
HD_BIN_NAME = re.compile(r"square_(\d+)um")     # spatialdata-io's names of Visium HD bin tables and shapes
SAME_SCALE = 1e-3      # relative difference under which x and y scales (or a scale and 1) are taken as equal


def read_spatialdata(path, name: str | None = None):
    """One slide of the SpatialData store at ``path`` as an AnnData in scanpy's convention (see the module
    docstring): raw counts, ``obsm['spatial']`` (x, y), ``uns['spatial'][region]`` with ``images``
    (hires/lowres uint8 RGB), ``scalefactors`` (``tissue_<kind>_scalef``, ``spot_diameter_fullres``; for a
    table named as spatialdata-io names Visium HD bins, ``square_016um``, ``bin_size_um``) and
    ``metadata`` (``fullres_path``/``fullres_shape`` for an image at scale 1, ``image_files``,
    ``spatialdata_coordinate_system``). ``name`` (``data.name``) picks a table or a region when the store
    holds several; with one it is only the section's name."""
    import anndata as ad

    from data.readers import _anndata_reads_zarr3, _quiet_name_warnings, anndata_version

    store = Path(path)
    table_name, table_path = _choose_table(store, name)
    if not _anndata_reads_zarr3():      # beside zarr 3 (required here), older anndata reads no zarr store at all
        raise InputError(f"{store}: a SpatialData store, whose table anndata {anndata_version()} cannot read beside "
                         "zarr 3: anndata 0.12 or newer can (pip install -U anndata).")
    try:
        with _quiet_name_warnings():
            table = ad.read_zarr(table_path)
    except Exception as exc:  # noqa: BLE001 - zarr and anndata raise many types
        raise InputError(f"{table_path}: the store's table cannot be read as an AnnData ({exc}).") from None
    region, table = _one_region(table, table_path, name)
    instance_key = (table.uns.get("spatialdata_attrs") or {}).get("instance_key")
    centres, diameters, ids, shape_cs = _read_shapes(store, region)
    if instance_key not in table.obs:
        raise InputError(f"{table_path}: uns['spatialdata_attrs'] names instance_key={instance_key!r}, which is not a "
                         "column of obs: the rows cannot be matched to the spots' shapes.")
    rows = pd.Index(ids.astype(str)).get_indexer(table.obs[instance_key].astype(str))
    if (rows < 0).any():
        bad = np.flatnonzero(rows < 0)
        raise InputError(f"{table_path}: {len(bad)} of {table.n_obs} rows have no shape in shapes/{region} (e.g. "
                         f"{instance_key}={table.obs[instance_key].iloc[bad[0]]!r}); the table and its shapes "
                         "do not belong together.")
    system, images = _choose_system(store, shape_cs)
    units = max([1.0] + [1.0 / _linear_scale(m) for _, m in images])   # frame px per system unit: finest image at scale 1
    if units > 1:
        log.info("%s: an image is finer than coordinate system %r's unit; positions are taken in that image's "
                 "pixels (x%.4g)", store, system, units)
    to_frame = np.diag([units, units, 1.0])
    table.obsm[keys.SPATIAL] = _apply(to_frame @ shape_cs[system], centres[rows])
    entry = {"images": {}, "scalefactors": {}, "metadata": {"spatialdata_coordinate_system": system,
                                                            "image_files": {}}}
    if np.isfinite(diameters).any():
        entry["scalefactors"]["spot_diameter_fullres"] = float(np.nanmedian(diameters)
                                                               * _similarity_scale(shape_cs[system]) * units)
    bin_um = HD_BIN_NAME.search(f"{table_name} {region}")
    if bin_um:       # spatialdata-io's Visium HD tables (square_016um): the stages read a bin's size from here
        entry["scalefactors"]["bin_size_um"] = float(bin_um.group(1))
        log.info("%s: Visium HD bins of %g um (table %r)", store, float(bin_um.group(1)), table_name)
    _attach_images(entry, store, [(n, to_frame @ m) for n, m in images])
    table.uns[keys.SPATIAL_UNS] = {str(region): entry}
    table.uns.pop("spatialdata_attrs", None)
    log.info("%s: SpatialData table %r, region %r, coordinate system %r", store, table_name, region, system)
    return table


def _groups(folder: Path) -> list[str]:
    """Names of the zarr groups (folders with zarr metadata) directly in ``folder``."""
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir()
                  if p.is_dir() and any((p / m).exists() for m in ("zarr.json", ".zgroup", ".zattrs")))


def _choose_table(store: Path, name) -> tuple[str, Path]:
    """(name, folder) of the table to read: the only one, or the one ``name`` names (a table's name or a
    region it annotates)."""
    tables = {t: store / "tables" / t for t in _groups(store / "tables")}
    if not tables and (store / "table" / "obs").is_dir():      # stores written before spatialdata 0.1
        tables = {"table": store / "table"}
    if not tables:
        raise InputError(f"{store}: a SpatialData store with no table (tables/<name>): there are no counts to read. "
                         f"It holds {', '.join(f'{g}/' for g in ('images', 'labels', 'points', 'shapes') if (store / g).is_dir())}.")
    if len(tables) == 1:
        return next(iter(tables.items()))
    if name is not None:
        if str(name) in tables:
            return str(name), tables[str(name)]
        owners = [t for t, folder in tables.items() if str(name) in _table_regions(folder)]
        if len(owners) == 1:
            return owners[0], tables[owners[0]]
    listed = "; ".join(f"{t} (regions {', '.join(_table_regions(f)) or '?'})" for t, f in tables.items())
    raise InputError(f"{store}: the store holds {len(tables)} tables ({listed}); name the one to read with "
                     f"data.name=<table or region>{'' if name is None else f' ({name!r} is neither)'}.")


def _table_regions(table_folder: Path) -> list[str]:
    """The regions a table annotates, from its ``uns/spatialdata_attrs`` without reading the table."""
    import zarr

    try:
        region = zarr.open_group(str(table_folder), mode="r")["uns"]["spatialdata_attrs"]["region"][...]
    except Exception:  # noqa: BLE001 - a table without the attributes: no regions to list
        return []
    region = np.asarray(region)
    return [str(r) for r in (region.ravel() if region.ndim else [region.item()])]


def _one_region(table, table_path: Path, name):
    """(region, the table's rows of it): a table annotating several regions (slides) is cut to the one
    ``name`` names; without a name it is refused."""
    attrs = table.uns.get("spatialdata_attrs") or {}
    region = attrs.get("region")
    if region is None:
        raise InputError(f"{table_path}: the table has no uns['spatialdata_attrs']['region']: it does not say which "
                         "spots (shapes) its rows are.")
    regions = [str(r) for r in np.atleast_1d(np.asarray(region, dtype=object))]
    if len(regions) == 1:
        return regions[0], table
    if name is None or str(name) not in regions:
        raise InputError(f"{table_path}: the table annotates {len(regions)} regions ({', '.join(regions)}); name the "
                         f"slide to read with data.name=<region>{'' if name is None else f' ({name!r} is none of them)'}.")
    key = attrs.get("region_key")
    if key not in table.obs:
        raise InputError(f"{table_path}: region_key={key!r} (uns['spatialdata_attrs']) is not a column of obs.")
    return str(name), table[(table.obs[key].astype(str) == str(name)).to_numpy()].copy()


def _read_shapes(store: Path, region: str):
    """(centres (n, 2) in the shapes' own units, diameters (n,) or NaN, instance ids (Index), {coordinate system:
    3x3 affine into it} for each system the shapes reach keeping their shape) of ``shapes/<region>``."""
    folder = store / "shapes" / region
    if (folder / "coords").is_dir():
        return _read_zarr_shapes(folder)
    if not (folder / "shapes.parquet").exists():
        other = [g for g in ("labels", "points", "images") if (store / g / region).is_dir()]
        what = f"{other[0]}/{region}, not shapes" if other else \
            "a shapes folder without shapes.parquet" if folder.is_dir() else "no such shapes element"
        hint = (" A Xenium store that spatialdata-io wrote with its default cells_as_circles=False annotates the "
                "cells' label image: write it again with spatialdata_io.xenium(path, cells_as_circles=True), which "
                "adds the cells as circles and points the table at them.") if other[:1] == ["labels"] else ""
        raise InputError(f"{store}: the table annotates {region!r}, which is {what}; a slide is read from the shapes "
                         f"its spots (or bins, or cells) are, with their centres.{hint}")
    import pyarrow.parquet as pq

    try:
        arrow = pq.read_table(str(folder / "shapes.parquet"))
    except Exception as exc:  # noqa: BLE001 - pyarrow raises many types for a damaged file
        raise InputError(f"{folder / 'shapes.parquet'}: cannot be read ({exc}).") from None
    geo = json.loads((arrow.schema.metadata or {}).get(b"geo", b"{}"))
    column = geo.get("primary_column", "geometry")
    if column not in arrow.column_names:
        raise InputError(f"{folder / 'shapes.parquet'}: no geometry column {column!r}.")
    frame = (arrow.drop_columns if hasattr(arrow, "drop_columns") else arrow.drop)([column]).to_pandas()   # pyarrow < 14: drop
    centres, sizes = _geometry_centres(arrow.column(column).combine_chunks(), folder / "shapes.parquet")
    diameters = 2 * frame["radius"].to_numpy(float) if "radius" in frame else sizes
    return centres, diameters, frame.index, _shape_systems(zarr_attributes(folder), folder)


def _read_zarr_shapes(folder: Path):
    """:func:`_read_shapes` for the first shapes format (spatialdata before 0.1.0: zarr arrays ``coords``,
    ``radius`` and ``Index`` instead of GeoParquet), which held spots as points."""
    import zarr

    attrs = zarr_attributes(folder)
    kind = ((attrs.get("spatialdata_attrs") or {}).get("geos") or {}).get("name", "POINT")
    if str(kind).upper() != "POINT":
        raise InputError(f"{folder}: shapes of type {kind} in spatialdata's first format, which is read for points "
                         "(Visium spots) only; write the store again with a recent spatialdata "
                         "(sd.read_zarr(old).write(new)) and give the new one.")
    group = zarr.open_group(str(folder), mode="r")
    coords = np.asarray(group["coords"][...], float)
    n = len(coords)
    diameters = 2 * np.asarray(group["radius"][...], float) if "radius" in group else np.full(n, np.nan)
    ids = pd.Index(np.asarray(group["Index"][...])) if "Index" in group else pd.RangeIndex(n)
    return coords[:, :2], diameters, ids, _shape_systems(attrs, folder)


def _shape_systems(attrs: dict, folder: Path) -> dict:
    """{coordinate system: 3x3 affine from the shapes' units to the system's} for the systems the shapes reach
    keeping their shape (a uniform scale, rotation, translation); the others (a shear, x and y scaled
    differently, a transformation not read) are named in a log line."""
    systems = _placements(attrs, ("x", "y"))
    other = [cs for cs, m in systems.items() if _similarity_scale(m) is None]
    if other:
        log.info("%s: the spots reach %s by a transformation that does not keep their shape; not used", folder,
                 ", ".join(map(repr, other)))
    return {cs: m for cs, m in systems.items() if cs not in other}


def _geometry_centres(column, source) -> tuple[np.ndarray, np.ndarray]:
    """(centres (n, 2), sizes (n,): a polygon's square-root area, NaN for points) of a GeoParquet geometry
    column: WKB points or polygons of one shape each (all alike, as spatialdata writes spots and bins),
    or geoarrow's native points."""
    import pyarrow as pa

    if pa.types.is_struct(column.type) and {"x", "y"} <= {f.name for f in column.type}:
        xy = np.column_stack([column.field("x").to_numpy(zero_copy_only=False),
                              column.field("y").to_numpy(zero_copy_only=False)])
        return xy.astype(float), np.full(len(xy), np.nan)
    if pa.types.is_fixed_size_list(column.type) and column.type.list_size >= 2:
        xy = column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), -1)[:, :2]
        return xy.astype(float), np.full(len(xy), np.nan)
    raw = _equal_length_blobs(column)
    if raw is None:
        raise InputError(f"{source}: shapes of different kinds or sizes (or missing ones); each spot must be one "
                         "point or one polygon of the same number of corners.")
    order = "<" if raw[0, 0] == 1 else ">"
    if not (raw[:, 0] == raw[0, 0]).all():
        raise InputError(f"{source}: shapes written with mixed byte orders.")
    kind = int(raw[0, 1:5].copy().view(f"{order}u4")[0]) & 0xFFFF      # ISO WKB 1/3 (1001/1003 with z)
    if kind % 1000 == 1:
        xy = raw[:, 5:21].copy().view(f"{order}f8").reshape(-1, 2)
        return xy.astype(float), np.full(len(xy), np.nan)
    if kind % 1000 == 3:
        dims = 3 if kind // 1000 in (1, 3) else 2
        n_points = int(raw[0, 9:13].copy().view(f"{order}u4")[0])
        corners = raw[:, 13:13 + 8 * dims * n_points].copy().view(f"{order}f8").reshape(len(raw), n_points, dims)
        ring = corners[:, :-1, :2]                                      # the last corner closes the ring
        x, y = ring[..., 0], ring[..., 1]
        area = 0.5 * np.abs((x * np.roll(y, -1, 1) - np.roll(x, -1, 1) * y).sum(1))
        return ring.mean(1), np.sqrt(area)
    raise InputError(f"{source}: shapes of WKB type {kind}; spots must be points (circles) or polygons.")


def _equal_length_blobs(column) -> np.ndarray | None:
    """A binary (WKB) column whose values all have one length as an (n, length) uint8 array, read from its
    buffers (no Python object per shape: a Visium HD table holds millions); None when lengths differ or a
    value is missing."""
    import pyarrow as pa

    if isinstance(column, pa.ExtensionArray):          # geoarrow.wkb, when geoarrow-pyarrow is installed
        column = column.storage
    if not (pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type)) or not len(column) \
            or column.null_count:
        return None
    width = np.int64 if pa.types.is_large_binary(column.type) else np.int32
    offsets = np.frombuffer(column.buffers()[1], width)[column.offset:column.offset + len(column) + 1]
    lengths = np.diff(offsets)
    if (lengths != lengths[0]).any() or lengths[0] == 0:
        return None
    data = np.frombuffer(column.buffers()[2], np.uint8)
    return data[offsets[0]:offsets[-1]].reshape(len(column), int(lengths[0]))


def _placements(transformations, axes) -> dict:
    """{coordinate system: 3x3 affine on (x, y, 1) from the element's units to the system's} of an element's
    transformations (its attributes' ``coordinateTransformations``); None for one that is not read (a
    ``mapAxis``, or one without x and y)."""
    out = {}
    for t in transformations.get("coordinateTransformations", []) if isinstance(transformations, dict) else transformations:
        target = (t.get("output") or {}).get("name")
        names = axis_names((t.get("input") or {}).get("axes", [])) or list(axes)
        if target is not None:
            out[target] = _matrix(t, names)
    return out


def _matrix(t: dict, names) -> np.ndarray | None:
    """One NGFF/spatialdata transformation (identity, scale, translation, affine, or a sequence of them) as a
    3x3 affine on (x, y, 1); ``names`` are its input axes when it does not name them. None otherwise."""
    kind = t.get("type")
    if kind == "identity":
        return np.eye(3)
    if kind in ("scale", "translation"):
        values = dict(zip(names, t.get(kind) or []))
        vx, vy = (float(values.get(a, np.nan)) for a in ("x", "y"))
        if not (np.isfinite(vx) and np.isfinite(vy)):
            return None
        return np.diag([vx, vy, 1.0]) if kind == "scale" else np.array([[1.0, 0, vx], [0, 1.0, vy], [0, 0, 1.0]])
    if kind == "affine":
        rows = np.asarray(t.get("affine") or [[]], float)
        ins = axis_names((t.get("input") or {}).get("axes", [])) or list(names)
        outs = axis_names((t.get("output") or {}).get("axes", [])) or ins
        if rows.ndim != 2 or rows.shape[1] != len(ins) + 1 or rows.shape[0] < len(outs) \
                or not {"x", "y"} <= set(ins) & set(outs):
            return None
        picked = rows[[outs.index("x"), outs.index("y")]][:, [ins.index("x"), ins.index("y"), len(ins)]]
        return np.vstack([picked, [0.0, 0.0, 1.0]])
    if kind == "sequence":
        matrix = np.eye(3)
        for step in t.get("transformations", []):
            step_matrix = _matrix(step, axis_names((step.get("input") or {}).get("axes", [])) or names)
            if step_matrix is None:
                return None
            matrix = step_matrix @ matrix       # each step applies to the previous one's output
        return matrix
    return None


def _plain_scale(matrix) -> float | None:
    """The factor of an affine that only scales, x and y alike (no translation, rotation or shear); else None."""
    if matrix is None:
        return None
    s = float(matrix[0, 0])
    off = np.abs([matrix[0, 1], matrix[1, 0], matrix[0, 2], matrix[1, 2]])
    return s if s > 0 and abs(matrix[1, 1] - s) <= SAME_SCALE * s and (off <= 1e-9 * max(1.0, s)).all() else None


def _linear_scale(matrix) -> float:
    """Output units per input unit of an affine, the geometric mean of its two axes' (0 when singular)."""
    return float(abs(np.linalg.det(matrix[:2, :2]))) ** 0.5


def _similarity_scale(matrix) -> float | None:
    """The scale of an affine that keeps shapes (a uniform scale with any rotation, reflection and
    translation); None for one that shears or scales x and y differently."""
    if matrix is None:
        return None
    s = _linear_scale(matrix)
    q = matrix[:2, :2] / s if s > 0 else None
    return s if q is not None and np.allclose(q.T @ q, np.eye(2), atol=SAME_SCALE) else None


def _apply(matrix, xy: np.ndarray) -> np.ndarray:
    """Points (n, 2) through a 3x3 affine."""
    return xy @ matrix[:2, :2].T + matrix[:2, 2]


def _image_placements(store: Path) -> dict:
    """{image name: {coordinate system: 3x3 affine from its level-0 px to the system's units, or None when
    not read}} of the store's images; an image whose channels are stains (fluorescence: DAPI, ...) is left
    out with a warning, as not an H&E."""
    out = {}
    for name in _groups(store / "images"):
        meta = ome_multiscales(store / "images" / name)
        if meta is None:
            continue
        stains = stain_channels(store / "images" / name)
        if stains:
            log.warning("%s: image %r is not read: its channels are %s, not an H&E's red, green and blue", store,
                        name, ", ".join(stains))
            continue
        axes = axis_names(meta.get("axes", ["c", "y", "x"]))
        level0 = _matrix({"type": "sequence", "transformations":
                          meta["datasets"][0].get("coordinateTransformations", [])}, axes)
        level0 = np.eye(3) if level0 is None else level0
        out[name] = {cs: None if m is None or _linear_scale(m) == 0 else m @ level0
                     for cs, m in _placements(meta, axes).items()}
    return out


def _choose_system(store: Path, shape_cs: dict) -> tuple[str, list[tuple[str, np.ndarray]]]:
    """(coordinate system, [(image, 3x3 affine from its px to the system's units)]): of the systems the shapes
    reach keeping their shape, the one most images reach, preferring one the shapes reach unchanged
    (spatialdata-io's dataset system: Visium's full-resolution pixels)."""
    if not shape_cs:
        raise InputError(f"{store}: the spots' shapes reach no coordinate system by a scale, rotation or translation, "
                         "so their positions cannot be placed on the images.")
    placements = _image_placements(store)
    reached = {cs: [(n, p[cs]) for n, p in placements.items() if p.get(cs) is not None] for cs in shape_cs}
    system = max(shape_cs, key=lambda cs: (len(reached[cs]), np.allclose(shape_cs[cs], np.eye(3), atol=1e-9),
                                           cs == next(iter(shape_cs))))
    unread = sorted(n for n, p in placements.items() if system in p and p[system] is None)
    if unread:
        log.warning("%s: image(s) %s are placed in coordinate system %r by a transformation that is not read (not "
                    "a scale, translation, rotation or affine, or not invertible); they are left out", store,
                    ", ".join(map(repr, unread)), system)
    unused = sorted(set(placements) - {n for n, _ in reached[system]} - set(unread))
    if unused:
        log.info("%s: images not in coordinate system %r are not read: %s", store, system, ", ".join(unused))
    return system, reached[system]


def _attach_images(entry: dict, store: Path, images: list[tuple[str, np.ndarray]]) -> None:
    """Fill ``entry`` (``uns['spatial'][lib]``) with the images, each given with its 3x3 affine from its px to
    ``obsm['spatial']``'s: the finest at scale 1 as the full-resolution image (by path; a placement other
    than a plain scale in ``metadata['fullres_placement']``), the others as hires/lowres by their names'
    words, else finest first. An image placed by more than a scale (a crop's translation, a registration's
    rotation or affine) is resampled into the spots' frame (:class:`data.wsi.PlacedImage`): at its own
    resolution as hires/lowres, region by region as the full-resolution image."""
    kinds: dict[str, tuple[str, float, np.ndarray]] = {}
    rest = []
    placed = {name: _plain_scale(matrix) is None for name, matrix in images}
    for name, matrix in sorted(images, key=lambda item: (_linear_scale(item[1]), placed[item[0]])):
        scalef = 1.0 / _linear_scale(matrix)          # image px per frame px
        if abs(scalef - 1) <= SAME_SCALE and "fullres" not in kinds:
            kinds["fullres"] = (name, 1.0, matrix)
            continue
        said = [k for k, words in KIND_WORDS.items() if any(w in name.lower() for w in words) and k not in kinds]
        if said:
            kinds[said[0]] = (name, scalef, matrix)
        else:
            rest.append((name, scalef, matrix))
    for name, scalef, matrix in rest:
        free = [k for k in ("hires", "lowres") if k not in kinds]
        if free:
            kinds[free[0]] = (name, scalef, matrix)
        else:
            log.warning("%s: image %r is not read (a full-resolution, a hires and a lowres image are read)", store, name)
    from data.readers import fullres_metadata

    meta = entry["metadata"]
    for kind, (name, scalef, matrix) in kinds.items():
        folder = store / "images" / name
        meta["image_files"][kind] = str(folder)
        if placed[name]:
            log.info("%s: image %r is placed on the spots by the affine %s; it is resampled into their frame", store,
                     name, np.round(matrix[:2], 4).tolist())
        if kind == "fullres":
            meta.update(fullres_metadata(folder, matrix[:2] if placed[name] else None))
            continue
        slide = open_whole_slide(folder)
        if placed[name]:
            slide = PlacedImage(slide, np.diag([scalef, scalef, 1.0]) @ matrix)
        entry["images"][kind] = slide.read_whole()
        entry["scalefactors"][f"tissue_{kind}_scalef"] = float(scalef)
