"""A SpatialData store read as a slide, without spatialdata installed (data.spatialdata_store).

The stores here are written by hand in the layout spatialdata 0.7.3 writes (what spatialdata-io 0.7.1's
``visium`` reader leaves, checked against real stores of DLPFC 151673 and the synthetic slice: DEVLOG 239):
an AnnData table, one shapes element of spot circles (GeoParquet, WKB points and a radius), OME-Zarr images,
each element with its transformations into named coordinate systems."""
import json
import struct

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from data import keys
from data.errors import InputError
from data.readers import _anndata_reads_zarr3, read_slide
from image_process.patches import choose_image

pytestmark = pytest.mark.filterwarnings("ignore:Writing zarr v2 data:UserWarning")


def _transformations(scales: dict, axes) -> list:
    """spatialdata's transformation list: ``{coordinate system: scale}`` (1: identity)."""
    def space(name):
        return {"name": name, "axes": [{"name": a, "type": "channel" if a == "c" else "space"} for a in axes]}
    out = []
    for system, s in scales.items():
        t = {"type": "identity"} if s == 1 else {"type": "scale", "scale": [1.0 if a == "c" else float(s) for a in axes]}
        out.append({**t, "input": space("".join(axes)), "output": space(system)})
    return out


def _group(folder, attributes: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group", "attributes": attributes}))


def _write_image(store, name, rgb, scales: dict, levels: int = 1, first_format: bool = False, channels=None,
                 transformations=None) -> None:
    """An OME-Zarr multiscale image (c, y, x) of ``rgb`` (H, W, 3), ``levels`` levels each half the last;
    ``first_format``: zarr 2 with the attributes at the top (spatialdata before 0.1.0)."""
    import zarr

    folder = store / "images" / name
    datasets, level = [], np.moveaxis(rgb, 2, 0)
    group = zarr.open_group(str(folder), mode="w", zarr_format=2 if first_format else 3)
    for i in range(levels):
        group.create_array(f"s{i}", shape=level.shape, dtype=level.dtype, chunks=(3, 256, 256))[...] = level
        datasets.append({"path": f"s{i}", "coordinateTransformations": [{"type": "scale", "scale": [1.0, 2.0 ** i, 2.0 ** i]}]})
        level = level[:, ::2, ::2]
    multiscales = [{"datasets": datasets, "name": f"/images/{name}",
                    "axes": [{"name": "c", "type": "channel"}, {"name": "y", "type": "space"}, {"name": "x", "type": "space"}],
                    "coordinateTransformations": transformations or _transformations(scales, "cyx")}]
    omero = {"omero": {"channels": [{"label": c} for c in channels]}} if channels else {}
    group.attrs.update({"multiscales": multiscales, **omero} if first_format else
                       {"ome": {"version": "0.5-dev-spatialdata", "multiscales": multiscales, **omero},
                        "spatialdata_attrs": {"version": "0.3"}})


def _write_shapes(store, region, xy, diameter, scales: dict, squares: bool = False, encoding: str = "WKB") -> None:
    """Spots as circles (WKB points + radius) or squares (WKB polygons) in GeoParquet, indexed by spot_id;
    ``encoding`` "geoarrow": points as an (x, y) struct column; "zarr": spatialdata's first format (zarr 2
    arrays ``coords``, ``radius``, ``Index``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = store / "shapes" / region
    if encoding == "zarr":
        import zarr
        group = zarr.open_group(str(folder), mode="w", zarr_format=2)
        for key, values in (("coords", np.asarray(xy, float)), ("radius", np.asarray(diameter, float) / 2),
                            ("Index", np.arange(len(xy)))):
            group.create_array(key, shape=values.shape, dtype=values.dtype)[...] = values
        group.attrs.update({"encoding-type": "ngff:shapes", "axes": ["x", "y"],
                            "coordinateTransformations": _transformations(scales, "xy"),
                            "spatialdata_attrs": {"geos": {"name": "POINT", "type": 0}, "version": "0.1"}})
        return
    if squares:
        corners = np.array([(-1, -1), (1, -1), (1, 1), (-1, 1), (-1, -1)]) / 2
        geometry = [struct.pack("<BIII", 1, 3, 1, 5) + (np.asarray(c) + corners * d).astype("<f8").tobytes()
                    for c, d in zip(xy, diameter)]
        frame = pd.DataFrame({"geometry": geometry}, index=pd.Index(np.arange(len(xy)), name="spot_id"))
    else:
        geometry = [struct.pack("<BIdd", 1, 1, x, y) for x, y in xy]
        frame = pd.DataFrame({"geometry": geometry, "radius": diameter / 2},
                             index=pd.Index(np.arange(len(xy)), name="spot_id"))
    _group(folder, {"encoding-type": "ngff:shapes", "axes": ["x", "y"],
                    "coordinateTransformations": _transformations(scales, "xy"), "spatialdata_attrs": {"version": "0.3"}})
    if encoding == "geoarrow":
        frame["geometry"] = [{"x": float(x), "y": float(y)} for x, y in xy]
    table = pa.Table.from_pandas(frame)
    geo = {"primary_column": "geometry", "columns": {"geometry": {"encoding": "WKB", "crs": None,
                                                                   "geometry_types": ["Polygon" if squares else "Point"]}},
           "version": "1.1.0"}
    pq.write_table(table.replace_schema_metadata({**table.schema.metadata, b"geo": json.dumps(geo).encode()}),
                   str(folder / "shapes.parquet"))


def _write_table(store, name, slides: dict) -> None:
    """The AnnData table annotating ``slides`` ({region: slide read by read_slide}), as spatialdata-io's."""
    parts = []
    for region, slide in slides.items():
        t = ad.AnnData(X=slide.X.astype(np.int64).astype(np.float32), var=slide.var[[]].copy(),
                       obs=pd.DataFrame({"in_tissue": 1, "array_row": slide.obs[keys.ARRAY_ROW].to_numpy(),
                                         "array_col": slide.obs[keys.ARRAY_COL].to_numpy(),
                                         "spot_id": np.arange(slide.n_obs), "region": region}, index=slide.obs_names))
        parts.append(t)
    table = ad.concat(parts, index_unique=None) if len(parts) > 1 else parts[0]
    table.obs["region"] = pd.Categorical(table.obs["region"])
    regions = list(slides)
    table.uns["spatialdata_attrs"] = {"region": regions[0] if len(regions) == 1 else regions,
                                      "region_key": "region", "instance_key": "spot_id"}
    table.write_zarr(store / "tables" / name)


def _store_of(slide, store, region="syn", fullres=None, unit=1.0, squares=False, encoding="WKB", table="table"):
    """A store like spatialdata-io's of a slide: shapes and images in coordinate system ``region``, ``unit`` of
    its units per full-resolution px (1: full-resolution pixels; 0.5: e.g. microns at 2 px per micron)."""
    _group(store, {"spatialdata_attrs": {"version": "0.2"}})
    for g in ("images", "shapes", "tables"):
        _group(store / g, {})
    entry = slide.uns[keys.SPATIAL_UNS][keys.library_id(slide)]
    sf = entry["scalefactors"]
    first = encoding == "zarr"
    for kind, rgb in entry["images"].items():
        _write_image(store, f"{region}_{kind}_image", rgb, {f"{region}_downscaled_{kind}": 1,
                                                            region: unit / sf[f"tissue_{kind}_scalef"]}, first_format=first)
    if fullres is not None:
        _write_image(store, f"{region}_full_image", fullres, {region: unit}, levels=3, first_format=first)
    _write_shapes(store, region, slide.obsm[keys.SPATIAL], np.full(slide.n_obs, sf["spot_diameter_fullres"]),
                  {region: unit, **{f"{region}_downscaled_{k}": sf[f"tissue_{k}_scalef"] for k in entry["images"]}},
                  squares=squares, encoding=encoding)
    _write_table(store, table, {region: slide})
    return store


@pytest.fixture
def slide(synthetic_slice):
    if not _anndata_reads_zarr3():
        pytest.skip("anndata < 0.12 cannot read zarr 3 stores (refused with the upgrade: see the last test)")
    return read_slide({"path": synthetic_slice})


def _assert_same_slide(a, b, kinds=("hires", "lowres")):
    assert a.obs_names.equals(b.obs_names) and a.var_names.equals(b.var_names) and (a.X != b.X).nnz == 0
    np.testing.assert_allclose(a.obsm[keys.SPATIAL], b.obsm[keys.SPATIAL], rtol=1e-9)
    np.testing.assert_array_equal(a.obs[keys.ARRAY_ROW], b.obs[keys.ARRAY_ROW])
    assert keys.scalefactors(a)["spot_diameter_fullres"] == pytest.approx(keys.scalefactors(b)["spot_diameter_fullres"])
    for kind in kinds:
        ia, ib = choose_image(a, kind), choose_image(b, kind)
        assert ia.scale == pytest.approx(ib.scale)
        np.testing.assert_array_equal(np.asarray(ia.pixels), np.asarray(ib.pixels))


def test_a_spatialdata_store_reads_as_its_space_ranger_folder(slide, synthetic_slice, tmp_path):
    """A store as spatialdata-io writes a Visium slide (spots as circles, hires/lowres images and a
    full-resolution pyramid in the dataset's coordinate system) reads as the folder it came from, the
    full-resolution image by path (region by region, never whole)."""
    from data.wsi import OmeZarrImage, open_fullres_pixels, open_whole_slide

    full = np.random.default_rng(0).integers(0, 255, (600, 640, 3), dtype=np.uint8)
    store = _store_of(slide, tmp_path / "visium.zarr", fullres=full)
    a = read_slide({"path": store})
    assert keys.library_id(a) == "syn"
    _assert_same_slide(a, slide)
    meta = a.uns[keys.SPATIAL_UNS]["syn"]["metadata"]
    assert meta["fullres_path"] == str(store / "images" / "syn_full_image") and meta["fullres_shape"] == [600, 640]
    np.testing.assert_array_equal(choose_image(a, "fullres").pixels, full)
    streamed = open_fullres_pixels(meta["fullres_path"], stream_above_bytes=0)      # a large one: by region
    np.testing.assert_array_equal(streamed.region(10, 20, 110, 70), full[20:70, 10:110])
    pyramid = open_whole_slide(meta["fullres_path"])
    assert isinstance(pyramid, OmeZarrImage) and [ds for _, ds in pyramid.levels] == [1.0, 2.0, 4.0]
    thumb, scale = pyramid.thumbnail(160)
    assert thumb.shape == (150, 160, 3) and scale == pytest.approx(0.25)


def test_a_store_in_microns_and_bins_as_squares(slide, tmp_path):
    """A coordinate system whose unit is coarser than the finest image (e.g. microns) is taken in that image's
    pixels, so positions and scale factors stay as the folder's; spots (bins) written as square polygons give
    their centres and side, and a table named as spatialdata-io names Visium HD bins (square_016um) gives the
    bin size that stage 5 reads (it took 16 um bins for 55 um Visium spots)."""
    from pipeline.expression_prediction import spot_size_um

    full = np.random.default_rng(1).integers(0, 255, (600, 640, 3), dtype=np.uint8)
    for squares in (False, True):
        store = _store_of(slide, tmp_path / f"um{squares}.zarr", fullres=full, unit=0.5, squares=squares,
                          table="square_016um" if squares else "table")
        a = read_slide({"path": store})
        _assert_same_slide(a, slide)
        assert choose_image(a).scale == 1.0
        assert spot_size_um(a) == ((16.0, 16.0) if squares else spot_size_um(slide))


def test_stores_in_other_encodings(slide, tmp_path):
    """Spots as geoarrow points (spatialdata's other GeoParquet encoding), and a store in spatialdata's first
    format (zarr 2; shapes as zarr arrays, images' attributes at the top), read as the folder."""
    full = np.random.default_rng(2).integers(0, 255, (600, 640, 3), dtype=np.uint8)
    for encoding in ("geoarrow", "zarr"):
        a = read_slide({"path": _store_of(slide, tmp_path / f"{encoding}.zarr", fullres=full, encoding=encoding)})
        _assert_same_slide(a, slide)
        np.testing.assert_array_equal(choose_image(a, "fullres").pixels, full)


def test_a_store_of_several_slides_or_tables_is_read_by_name(slide, tmp_path):
    """A table annotating two regions (slides), or a store holding two tables, is refused without data.name
    and cut to the one it names; data.name is only the section's name when there is one."""
    store = _store_of(slide, tmp_path / "two.zarr")
    other = slide[: slide.n_obs // 2].copy()
    other.obs_names = [f"B-{n}" for n in other.obs_names]
    _write_shapes(store, "B", other.obsm[keys.SPATIAL], np.full(other.n_obs, 33.0), {"B": 1})
    import shutil
    shutil.rmtree(store / "tables" / "table")
    _write_table(store, "table", {"syn": slide, "B": other})
    with pytest.raises(InputError, match=r"two.zarr.*table: the table annotates 2 regions \(syn, B\); name the slide"):
        read_slide({"path": store})
    b = read_slide({"path": store, "name": "B"})
    assert b.n_obs == other.n_obs and keys.library_id(b) == "B" and not b.uns[keys.SPATIAL_UNS]["B"]["images"]
    _assert_same_slide(read_slide({"path": store, "name": "syn"}), slide)
    from pipeline.sections import check_disjoint           # two slides of one store: two stage-5 sections
    check_disjoint([{"path": str(store), "name": "syn"}], [{"path": str(store), "name": "B"}])

    store = _store_of(slide, tmp_path / "tables.zarr")
    _write_shapes(store, "B", other.obsm[keys.SPATIAL], np.full(other.n_obs, 33.0), {"B": 1})
    _write_table(store, "B_table", {"B": other})
    with pytest.raises(InputError, match=r"holds 2 tables \(B_table \(regions B\); table \(regions syn\)\); name the one"):
        read_slide({"path": store})
    assert read_slide({"path": store, "name": "B"}).n_obs == other.n_obs
    assert read_slide({"path": store, "name": "table"}).n_obs == slide.n_obs
    check_disjoint([{"path": str(store), "name": "B"}], [{"path": str(store), "name": "table"}])
    with pytest.raises(InputError, match=r"also a training section \(.*tables.zarr, \('B_table', 'B'\)\)"):
        check_disjoint([{"path": str(store), "name": "B"}], [{"path": str(store), "name": "B_table"}])  # one by two names
    assert read_slide({"path": _store_of(slide, tmp_path / "one.zarr"), "name": "section 1"}).n_obs == slide.n_obs


def test_a_fluorescence_image_is_not_taken_for_an_h_and_e(slide, tmp_path, caplog):
    """An image whose channels name stains (DAPI, ...; a Xenium store's morphology image) was read as RGB(A),
    its fourth stain as transparency, silently. In a store it is left out with a warning; named as data.image
    it is refused. Channels labelled r, g, b (spatialdata-io's H&E) or unnamed are read as before."""
    full = np.random.default_rng(3).integers(0, 255, (600, 640, 3), dtype=np.uint8)
    store = _store_of(slide, tmp_path / "if.zarr")
    four = np.concatenate([full, full[..., :1]], axis=2)
    _write_image(store, "morphology_focus", four, {"syn": 1}, channels=["DAPI", "ATP1A1/CD45/E-Cadherin", "18S", "AlphaSMA/Vimentin"])
    _write_image(store, "he_named", full, {"syn_other": 1}, channels=["r", "g", "b"])
    a = read_slide({"path": store})
    _assert_same_slide(a, slide)
    assert "fullres_path" not in a.uns[keys.SPATIAL_UNS]["syn"]["metadata"]
    assert "image 'morphology_focus' is not read: its channels are DAPI, ATP1A1/CD45/E-Cadherin" in caplog.text
    with pytest.raises(InputError, match=r"morphology_focus: an OME-Zarr image whose channels are DAPI, .* not an H&E"):
        read_slide({"path": store, "image": store / "images" / "morphology_focus"})
    b = read_slide({"path": store, "image": store / "images" / "he_named"})
    np.testing.assert_array_equal(choose_image(b, "fullres").pixels, full)


def _placed(system: str, *steps) -> list:
    """An image's transformation list: a sequence of ``steps`` into ``system`` (axes c, y, x)."""
    space = {"name": system, "axes": [{"name": a, "type": "channel" if a == "c" else "space"} for a in "cyx"]}
    return [{"type": "sequence", "input": {**space, "name": "cyx"}, "output": space, "transformations": list(steps)}]


def test_an_image_placed_by_a_translation_rotation_or_affine_is_resampled_onto_the_spots(slide, tmp_path, caplog):
    """An image placed in the spots' coordinate system by more than a scale (a crop's translation, a
    registration's rotation or affine) is resampled into the spots' frame: by whole pixels and quarter turns
    the pixels come back unchanged (white where the image does not reach), read whole or region by region;
    a hires image cropped and placed by (translation, scale) keeps its scale factor. A transformation that is
    not read is named in a warning; ``data.image`` replaces a placed image."""
    from data.wsi import open_fullres_pixels

    full = np.random.default_rng(4).integers(0, 255, (600, 640, 3), dtype=np.uint8)
    store = _store_of(slide, tmp_path / "placed.zarr")
    _write_image(store, "crop", full[25:, 30:], {}, levels=2, transformations=_placed(
        "syn", {"type": "scale", "scale": [1.0, 1.0, 1.0]}, {"type": "translation", "translation": [0.0, 25.0, 30.0]}))
    a = read_slide({"path": store})
    meta = a.uns[keys.SPATIAL_UNS]["syn"]["metadata"]
    assert meta[keys.FULLRES_PLACEMENT] == [[1.0, 0.0, 30.0], [0.0, 1.0, 25.0]] and meta["fullres_shape"] == [600, 640]
    expected = full.copy()
    expected[:25], expected[:, :30] = 255, 255
    np.testing.assert_array_equal(choose_image(a, "fullres").pixels, expected)
    streamed = open_fullres_pixels(meta["fullres_path"], 0, meta[keys.FULLRES_PLACEMENT])
    np.testing.assert_array_equal(streamed.region(20, 10, 300, 200), expected[10:200, 20:300])
    assert streamed.shrunk(160)[0].shape == (150, 160, 3)
    _assert_same_slide(a, slide)                      # the spots, the counts and the hires/lowres images unchanged

    height, width = full.shape[:2]                    # a quarter turn: rotated px (x, y) -> (width - y, x)
    _write_image(store, "crop", np.ascontiguousarray(np.rot90(full)), {}, transformations=_placed(
        "syn", {"type": "affine", "affine": [[1.0, 0, 0, 0], [0, 0, 1.0, 0], [0, -1.0, 0, float(width)]]}))
    np.testing.assert_array_equal(choose_image(read_slide({"path": store}), "fullres").pixels, full)

    entry = slide.uns[keys.SPATIAL_UNS][keys.library_id(slide)]
    hires, s = entry["images"]["hires"], entry["scalefactors"]["tissue_hires_scalef"]
    import shutil
    shutil.rmtree(store / "images" / "syn_hires_image")
    _write_image(store, "syn_hires_image", hires[7:, 11:], {}, transformations=_placed(
        "syn", {"type": "translation", "translation": [0.0, 7.0, 11.0]}, {"type": "scale", "scale": [1.0, 1 / s, 1 / s]}))
    b = choose_image(read_slide({"path": store}), "hires")
    assert b.scale == pytest.approx(s)
    cut = hires.copy()
    cut[:7], cut[:, :11] = 255, 255
    np.testing.assert_array_equal(b.pixels, cut)

    _write_image(store, "crop", full, {}, transformations=_placed("syn", {"type": "mapAxis", "mapAxis": {"x": "y", "y": "x"}}))
    c = read_slide({"path": store})
    assert "'crop' are placed in coordinate system 'syn' by a transformation that is not read" in caplog.text
    assert "fullres_path" not in c.uns[keys.SPATIAL_UNS]["syn"]["metadata"]
    _write_image(store, "crop", full[25:, 30:], {}, transformations=_placed(
        "syn", {"type": "translation", "translation": [0.0, 25.0, 30.0]}))
    import cv2
    cv2.imwrite(str(tmp_path / "given.png"), full[..., ::-1])
    d = read_slide({"path": store, "image": tmp_path / "given.png"})
    assert keys.FULLRES_PLACEMENT not in d.uns[keys.SPATIAL_UNS]["syn"]["metadata"]
    np.testing.assert_array_equal(choose_image(d, "fullres").pixels, full)


def test_spots_placed_by_a_turn_and_a_shift_read_in_the_images_frame(slide, tmp_path):
    """Spots whose shapes reach the images' coordinate system by a rotation and translation (uniform scale)
    are placed there, diameters scaled alike; a shear, which would distort the spots' distances, is refused."""
    store = _store_of(slide, tmp_path / "turned.zarr")
    xy = slide.obsm[keys.SPATIAL]
    _write_shapes(store, "syn", np.column_stack([xy[:, 1] - 7.0, 900.0 - xy[:, 0]]) / 2, np.full(slide.n_obs, 16.5), {})
    attrs = json.loads((store / "shapes" / "syn" / "zarr.json").read_text())
    space = {"axes": [{"name": a, "type": "space"} for a in "xy"]}
    turn = {"type": "affine", "affine": [[0.0, -2.0, 900.0], [2.0, 0.0, 7.0]], "input": {**space, "name": "xy"},
            "output": {**space, "name": "syn"}}
    attrs["attributes"]["coordinateTransformations"] = [turn]
    (store / "shapes" / "syn" / "zarr.json").write_text(json.dumps(attrs))
    _assert_same_slide(read_slide({"path": store}), slide)
    turn["affine"][0][1] = -2.5
    (store / "shapes" / "syn" / "zarr.json").write_text(json.dumps(attrs))
    with pytest.raises(InputError, match="the spots' shapes reach no coordinate system by a scale, rotation or translation"):
        read_slide({"path": store})


def test_a_store_that_cannot_be_a_slide_says_why(slide, tmp_path):
    """No table, a table annotating a segmentation (labels), rows without shapes, a bin size given: one line
    each, naming the store."""
    store = _store_of(slide, tmp_path / "s.zarr")
    with pytest.raises(InputError, match="s.zarr: data.bin_um is for a Visium HD Space Ranger folder; this is a zarr store"):
        read_slide({"path": store, "bin_um": 8})
    import shutil
    shutil.move(store / "shapes" / "syn", tmp_path / "moved")
    _group(store / "labels" / "syn", {})
    with pytest.raises(InputError, match=r"s.zarr: the table annotates 'syn', which is labels/syn, not shapes.*"
                       r"spatialdata_io.xenium\(path, cells_as_circles=True\)"):
        read_slide({"path": store})
    shutil.rmtree(store / "labels")
    _write_shapes(store, "syn", slide.obsm[keys.SPATIAL][:10], np.full(10, 33.0), {"syn": 1})
    with pytest.raises(InputError, match=rf"table: {slide.n_obs - 10} of {slide.n_obs} rows have no shape in shapes/syn"):
        read_slide({"path": store})
    shutil.rmtree(store / "tables")
    with pytest.raises(InputError, match="s.zarr: a SpatialData store with no table"):
        read_slide({"path": store})


def test_a_store_written_by_spatialdata_io(synthetic_slice, tmp_path):
    """With spatialdata-io installed (not a requirement), its own store of the synthetic slice reads as the
    folder does."""
    sio = pytest.importorskip("spatialdata_io")
    from data.synthetic import write_10x_h5

    ref = read_slide({"path": synthetic_slice})
    import shutil
    folder = tmp_path / "slice"
    shutil.copytree(synthetic_slice, folder)
    write_10x_h5(folder / "filtered_feature_bc_matrix.h5", ref.X.toarray(), list(ref.obs_names), list(ref.var_names))
    sdata = sio.visium(folder, dataset_id="syn")
    sdata.write(tmp_path / "sio.zarr")
    _assert_same_slide(read_slide({"path": tmp_path / "sio.zarr"}), ref)

    from spatialdata.models import Image2DModel      # spatialdata's own affine: a quarter turn, as registered
    from spatialdata.transformations import Affine

    full = np.random.default_rng(5).integers(0, 255, (600, 640, 3), dtype=np.uint8)
    turn = Affine(np.array([[0.0, -1.0, 640.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]), input_axes=("x", "y"),
                  output_axes=("x", "y"))
    sdata.images["registered"] = Image2DModel.parse(np.moveaxis(np.rot90(full), 2, 0), dims=("c", "y", "x"),
                                                    c_coords=["r", "g", "b"], scale_factors=[2],
                                                    transformations={"syn": turn})
    sdata.write(tmp_path / "placed.zarr")
    np.testing.assert_array_equal(choose_image(read_slide({"path": tmp_path / "placed.zarr"}), "fullres").pixels, full)


def test_old_anndata_gets_the_upgrade_for_a_zarr3_store(synthetic_slice, tmp_path, monkeypatch):
    """anndata < 0.12 cannot read a zarr store beside zarr 3: the upgrade line, not zarr's traceback."""
    import data.readers

    store = tmp_path / "s.zarr"
    _group(store, {})
    _group(store / "tables" / "table", {})
    (store / "tables" / "table" / "obs").mkdir()
    monkeypatch.setattr(data.readers, "_anndata_reads_zarr3", lambda: False)
    with pytest.raises(InputError, match="s.zarr: a SpatialData store, whose table anndata .* anndata 0.12 or newer"):
        read_slide({"path": store})
