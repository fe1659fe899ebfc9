"""Readers on every input format, and bad input giving one clear error that names the file."""
import gzip
import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from conftest import shared
from data import keys
from data.errors import InputError
from data.readers import read_slide
from data.synthetic import write_10x_h5, write_headered_positions


def test_visium_mex(synthetic_slice):
    a = read_slide({"path": synthetic_slice, "truth": synthetic_slice / "truth.txt"})
    assert a.n_obs == 24 * 24 and a.n_vars == 300
    assert a.obsm[keys.SPATIAL].shape == (a.n_obs, 2)
    lib = keys.library_id(a)
    assert set(a.uns["spatial"][lib]["images"]) == {"hires", "lowres"}
    assert a.obs[keys.TRUTH].notna().all()
    np.testing.assert_allclose(a.obs[keys.TOTAL_COUNTS], np.asarray(a.X.sum(1)).ravel())


def test_visium_h5_and_new_positions_header(slice_copy):
    ref = read_slide({"path": slice_copy})
    import shutil
    shutil.rmtree(slice_copy / "filtered_feature_bc_matrix")
    write_10x_h5(slice_copy / "filtered_feature_bc_matrix.h5", ref.X.toarray(), list(ref.obs_names), list(ref.var_names))
    old = slice_copy / "spatial" / "tissue_positions_list.csv"
    write_headered_positions(old, slice_copy / "spatial" / "tissue_positions.csv")
    old.unlink()
    a = read_slide({"path": slice_copy})
    assert list(a.obs_names) == list(ref.obs_names)
    np.testing.assert_array_equal(a.X.toarray(), ref.X.toarray())
    np.testing.assert_allclose(a.obsm[keys.SPATIAL], ref.obsm[keys.SPATIAL])
    # a header's columns are read by name (a tool that rewrote the file may have reordered them: read by
    # place, pixel rows became array rows); a header naming other columns is refused by name
    new = slice_copy / "spatial" / "tissue_positions.csv"
    table = pd.read_csv(new)
    table[table.columns[::-1]].to_csv(new, index=False)
    b = read_slide({"path": slice_copy})
    np.testing.assert_allclose(b.obsm[keys.SPATIAL], ref.obsm[keys.SPATIAL])
    assert (b.obs[keys.ARRAY_ROW].to_numpy() == ref.obs[keys.ARRAY_ROW].to_numpy()).all()
    table.rename(columns={"pxl_row_in_fullres": "y", "pxl_col_in_fullres": "x"}).to_csv(new, index=False)
    with pytest.raises(InputError, match="does not name the columns Space Ranger writes"):
        read_slide({"path": slice_copy})


def test_h5ad_roundtrip(synthetic_slice, tmp_path):
    ref = read_slide({"path": synthetic_slice})
    out = ad.AnnData(X=ref.X, obs=ref.obs[[]].copy(), var=ref.var[[]].copy())
    out.obsm["spatial"] = ref.obsm["spatial"]
    out.write_h5ad(tmp_path / "s.h5ad")
    a = read_slide({"path": tmp_path / "s.h5ad"})
    assert a.shape == ref.shape
    np.testing.assert_allclose(a.obs[keys.TOTAL_COUNTS], ref.obs[keys.TOTAL_COUNTS])
    # no array coordinates in the file: recovered from obsm['spatial'] (the same lattice, maybe shifted)
    from test_lattice import _same_lattice
    assert _same_lattice(a.obs[[keys.ARRAY_COL, keys.ARRAY_ROW]].to_numpy(), ref.obs[[keys.ARRAY_COL, keys.ARRAY_ROW]].to_numpy())
    assert a.uns[keys.SPATIAL_UNS][keys.library_id(a)]["metadata"]["array_inferred"] == "hex"

    # a third column (z, as squidpy allows) is dropped; (x, y) are the first two
    out.obsm["spatial"] = np.c_[ref.obsm["spatial"], np.ones(ref.n_obs)]
    out.write_h5ad(tmp_path / "xyz.h5ad")
    np.testing.assert_allclose(read_slide({"path": tmp_path / "xyz.h5ad"}).obsm["spatial"], ref.obsm["spatial"])
    out.obsm["spatial"] = ref.obsm["spatial"]

    # spots off the tissue (Space Ranger's raw matrix) are left out
    out.obs["in_tissue"] = 1
    out.obs.iloc[:7, 0] = 0
    out.write_h5ad(tmp_path / "raw_matrix.h5ad")
    assert read_slide({"path": tmp_path / "raw_matrix.h5ad"}).n_obs == ref.n_obs - 7
    out.obs["in_tissue"] = 1

    # scanpy's usual order: counts kept in .raw, X log-normalised (and cut to some genes)
    import scanpy as sc
    out.raw = out.copy()
    sc.pp.normalize_total(out, target_sum=1e4)
    sc.pp.log1p(out)
    out = out[:, :50].copy()
    out.write_h5ad(tmp_path / "lognorm.h5ad")
    b = read_slide({"path": tmp_path / "lognorm.h5ad"})
    assert b.shape == ref.shape
    np.testing.assert_allclose(b.obs[keys.TOTAL_COUNTS], ref.obs[keys.TOTAL_COUNTS])
    del out.raw
    out.write_h5ad(tmp_path / "lognorm_only.h5ad")
    with pytest.raises(InputError, match="not integers"):
        read_slide({"path": tmp_path / "lognorm_only.h5ad"})
    out.uns["prediction"] = {"model": "hespotex"}          # the pipeline's own stage-5 output: named as such
    out.write_h5ad(tmp_path / "05_predicted.h5ad")
    with pytest.raises(InputError, match="not integers.*stage 5's prediction .* cluster it directly"):
        read_slide({"path": tmp_path / "05_predicted.h5ad"})



def _scanpy_style(ref, library_id, float_images=True):
    """``ref`` as scanpy's ``read_visium`` + ``write_h5ad`` leave a Visium slide: images as float32 in
    [0, 1] under ``uns['spatial'][library_id]``, ``obs['library_id']``."""
    entry = ref.uns[keys.SPATIAL_UNS][keys.library_id(ref)]
    images = {k: (v / 255.0).astype(np.float32) if float_images else v for k, v in entry["images"].items()}
    out = ad.AnnData(X=ref.X, obs=pd.DataFrame({"library_id": library_id}, index=ref.obs_names),
                     var=ref.var[[]].copy())
    out.obsm["spatial"] = ref.obsm["spatial"]
    out.uns[keys.SPATIAL_UNS] = {library_id: {"images": images, "scalefactors": dict(entry["scalefactors"])}}
    return out


def test_h5ad_scale_factors_stored_as_arrays_or_words(synthetic_slice, tmp_path):
    """A scale factor left in uns as a one-element array (some writers do) is its number; it ended in a
    TypeError from a format string. One that is not a number in (0, 1] is refused naming the key, as
    scalefactors_json.json's are."""
    ref = read_slide({"path": synthetic_slice})
    kind = next(iter(ref.uns[keys.SPATIAL_UNS][keys.library_id(ref)]["images"]))
    out = _scanpy_style(ref, "A")
    sf = out.uns[keys.SPATIAL_UNS]["A"]["scalefactors"]
    value = sf[f"tissue_{kind}_scalef"]
    sf[f"tissue_{kind}_scalef"] = np.array([value])
    out.write_h5ad(tmp_path / "array.h5ad")
    assert keys.scalefactors(read_slide({"path": tmp_path / "array.h5ad"}))[f"tissue_{kind}_scalef"] == value
    sf[f"tissue_{kind}_scalef"] = "half"
    out.write_h5ad(tmp_path / "word.h5ad")
    with pytest.raises(InputError, match=rf"word.h5ad: uns\['spatial'\]\['A'\]\['scalefactors'\]\['tissue_{kind}_scalef'\]='half'"):
        read_slide({"path": tmp_path / "word.h5ad"})


def test_h5ad_in_tissue_flags_and_image_keys_as_other_tools_write_them(synthetic_slice, tmp_path, caplog):
    """obs['in_tissue'] held as floats (a column that once held NaN) marked 0.0 spots that were kept
    silently, and words kept every spot; an image under 'fulres' (stLearn) or 'fullres' ended in a
    KeyError, and one under another key was ignored without a word."""
    from image_process.patches import choose_image

    ref = read_slide({"path": synthetic_slice})
    out = _scanpy_style(ref, "A", float_images=False)
    out.obs["in_tissue"] = np.where(np.arange(ref.n_obs) < 7, 0.0, 1.0)
    out.write_h5ad(tmp_path / "float.h5ad")
    assert read_slide({"path": tmp_path / "float.h5ad"}).n_obs == ref.n_obs - 7
    out.obs["in_tissue"] = pd.Categorical(np.where(np.arange(ref.n_obs) < 7, "FALSE", "True"))
    out.write_h5ad(tmp_path / "bool_words.h5ad")
    assert read_slide({"path": tmp_path / "bool_words.h5ad"}).n_obs == ref.n_obs - 7
    out.obs["in_tissue"] = np.where(np.arange(ref.n_obs) < 7, "no", "yes")
    out.write_h5ad(tmp_path / "words.h5ad")
    with pytest.raises(InputError, match=rf"words.h5ad: obs\['in_tissue'\] must be 1 .* spot '{ref.obs_names[0]}' has 'no'"):
        read_slide({"path": tmp_path / "words.h5ad"})
    del out.obs["in_tissue"]

    # the hires image at scale 1 (coordinates in its pixels) under stLearn's key for a full-resolution image
    kind = next(iter(ref.uns[keys.SPATIAL_UNS][keys.library_id(ref)]["images"]))
    scale = keys.scalefactors(ref)[f"tissue_{kind}_scalef"]
    full = ad.AnnData(X=ref.X, obs=pd.DataFrame(index=ref.obs_names), var=pd.DataFrame(index=ref.var_names))
    full.obsm["spatial"] = ref.obsm["spatial"] * scale
    pixels = choose_image(ref, kind).pixels
    for name in ("fulres", "fullres"):
        full.uns["spatial"] = {"A": {"images": {name: pixels}, "scalefactors": {}}}
        full.write_h5ad(tmp_path / f"{name}.h5ad")
        img = choose_image(read_slide({"path": tmp_path / f"{name}.h5ad"}))
        assert img.scale == 1.0
        np.testing.assert_array_equal(img.pixels, pixels)
    full.uns["spatial"] = {"A": {"images": {"HE": pixels}, "scalefactors": {}}}
    full.write_h5ad(tmp_path / "he.h5ad")
    with caplog.at_level("WARNING"):
        assert choose_image(read_slide({"path": tmp_path / "he.h5ad"})) is None
    assert "holds 'HE', which is not read" in caplog.text and "the slide has no other image" in caplog.text


def _hest_sample(ref, root, sample, wsi=True):
    """``ref`` as HEST-1k keeps a sample: ``st/<id>.h5ad`` (counts, ``obsm['spatial']`` in the whole-slide image's
    pixels, a thumbnail under ``uns['spatial']['ST']['images']['downscaled_fullres']`` with
    ``tissue_downscaled_fullres_scalef``) and ``wsis/<id>.tif`` (a tiled TIFF); returns the image's pixels."""
    import cv2
    import tifffile

    entry = ref.uns[keys.SPATIAL_UNS][keys.library_id(ref)]
    kind = "hires" if "hires" in entry["images"] else "lowres"
    thumb, s = entry["images"][kind], entry["scalefactors"][f"tissue_{kind}_scalef"]
    out = ad.AnnData(X=ref.X, obs=ref.obs[[keys.ARRAY_ROW, keys.ARRAY_COL]].assign(in_tissue=1), var=ref.var[[]].copy())
    out.obsm["spatial"] = ref.obsm["spatial"]
    out.uns["spatial"] = {"ST": {"images": {"downscaled_fullres": thumb}, "scalefactors": {
        "tissue_downscaled_fullres_scalef": s, "spot_diameter_fullres": entry["scalefactors"]["spot_diameter_fullres"]}}}
    (root / "st").mkdir(parents=True, exist_ok=True)
    (root / "wsis").mkdir(exist_ok=True)
    out.write_h5ad(root / "st" / f"{sample}.h5ad")
    full = cv2.resize(thumb, (round(thumb.shape[1] / s), round(thumb.shape[0] / s)), interpolation=cv2.INTER_LINEAR)
    if wsi:
        tifffile.imwrite(root / "wsis" / f"{sample}.tif", full, tile=(256, 256), compression="zlib", photometric="rgb")
    return full


def test_a_hest_1k_sample_reads_with_its_whole_slide_image(synthetic_slice, tmp_path, caplog):
    """HEST-1k's layout (st/<id>.h5ad beside wsis/<id>.tif): data.path the folder (data.name the sample) or the
    .h5ad reads the counts, the whole-slide image as the full-resolution image and the thumbnail, under its
    own key, as the hires image; several samples need a name; data.image still overrides; a sample without
    its whole-slide image runs on the thumbnail, with a warning."""
    from image_process.patches import choose_image

    ref = read_slide({"path": synthetic_slice})
    root = tmp_path / "hest_data"
    full = _hest_sample(ref, root, "SYN1")
    for data in ({"path": root}, {"path": root / "st" / "SYN1.h5ad"}):
        a = read_slide(data)
        assert a.obs_names.equals(ref.obs_names) and (a.X != ref.X).nnz == 0
        assert a.uns[keys.SPATIAL_UNS]["ST"]["metadata"]["fullres_path"] == str(root / "wsis" / "SYN1.tif")
        np.testing.assert_array_equal(choose_image(a).pixels, full)
        hires = choose_image(a, "hires")
        np.testing.assert_array_equal(hires.pixels, ref.uns[keys.SPATIAL_UNS][keys.library_id(ref)]["images"]["hires"])
        assert hires.scale == keys.scalefactors(ref)["tissue_hires_scalef"]
    _hest_sample(ref, root, "SYN2", wsi=False)
    with pytest.raises(InputError, match=r"hest_data: a HEST-1k folder of 2 samples \(SYN1, SYN2\); pick one with data.name"):
        read_slide({"path": root})
    with pytest.raises(InputError, match=r"hest_data: a HEST-1k folder without sample 'SYN3' in st/ \(it has SYN1, SYN2\)"):
        read_slide({"path": root, "name": "SYN3"})
    with pytest.raises(InputError, match="hest_data: data.bin_um is for a Visium HD Space Ranger folder; this is a HEST-1k"):
        read_slide({"path": root, "name": "SYN1", "bin_um": 16})
    with caplog.at_level("WARNING"):
        b = read_slide({"path": root, "name": "SYN2"})
    assert "HEST-1k sample 'SYN2' has no wsis/SYN2.tif" in caplog.text
    assert choose_image(b).scale == keys.scalefactors(ref)["tissue_hires_scalef"]
    import cv2
    cv2.imwrite(str(tmp_path / "other.png"), full[..., ::-1])
    c = read_slide({"path": root, "name": "SYN1", "image": tmp_path / "other.png"})
    assert c.uns[keys.SPATIAL_UNS]["ST"]["metadata"]["fullres_path"] == str(tmp_path / "other.png")


def test_a_registered_image_is_placed_by_data_image_affine(synthetic_slice, tmp_path):
    """data.image_affine places data.image on the spots (its pixel (x, y) to their full-resolution pixels): an
    image cropped by (30, 25) px and placed by that shift reads as the uncropped one, white where it lacks;
    a matrix that is not an invertible 2x3 affine, or an affine without data.image, is refused."""
    import cv2

    from image_process.patches import choose_image

    ref = read_slide({"path": synthetic_slice})
    hires, s = choose_image(ref, "hires").pixels, keys.scalefactors(ref)["tissue_hires_scalef"]
    full = cv2.resize(hires, (round(hires.shape[1] / s), round(hires.shape[0] / s)), interpolation=cv2.INTER_LINEAR)
    cv2.imwrite(str(tmp_path / "crop.png"), np.ascontiguousarray(full[25:, 30:, ::-1]))
    a = read_slide({"path": synthetic_slice, "image": tmp_path / "crop.png", "image_affine": [[1, 0, 30], [0, 1, 25]]})
    expected = full.copy()
    expected[:25], expected[:, :30] = 255, 255
    np.testing.assert_array_equal(choose_image(a, "fullres").pixels, expected)
    assert a.uns[keys.SPATIAL_UNS][keys.library_id(a)]["metadata"]["fullres_shape"] == list(full.shape[:2])
    for bad in ([[1, 0], [0, 1]], [[0, 0, 1], [0, 0, 2]], "shift", [[1, 0, 0], [0, 1, 0], [1, 0, 1]]):
        with pytest.raises(InputError, match=r"data.image_affine=.*give the 2x3 affine"):
            read_slide({"path": synthetic_slice, "image": tmp_path / "crop.png", "image_affine": bad})
    with pytest.raises(InputError, match="data.image_affine places data.image on the spots; set data.image too"):
        read_slide({"path": synthetic_slice, "image_affine": [[1, 0, 30], [0, 1, 25]]})


@pytest.mark.filterwarnings("ignore:Writing zarr v2 data:UserWarning")    # anndata's note on write_zarr
def test_scanpy_h5ad_float_images_and_several_libraries(synthetic_slice, tmp_path):
    from image_process.patches import choose_image

    ref = read_slide({"path": synthetic_slice})
    kind = next(iter(ref.uns[keys.SPATIAL_UNS][keys.library_id(ref)]["images"]))
    _scanpy_style(ref, "A").write_h5ad(tmp_path / "one.h5ad")
    a = read_slide({"path": tmp_path / "one.h5ad"})
    img = choose_image(a)
    assert img.pixels.dtype == np.uint8 and img.pixels.shape[2] == 3
    np.testing.assert_array_equal(img.pixels, choose_image(ref).pixels)       # /255 then x255 is exact

    b = _scanpy_style(ref[:100].copy(), "B", float_images=False)
    both = ad.concat([_scanpy_style(ref, "A"), b], index_unique="-", uns_merge="unique")
    assert set(both.uns[keys.SPATIAL_UNS]) == {"A", "B"}
    both.write_h5ad(tmp_path / "both.h5ad")
    with pytest.raises(InputError, match="data.name"):                        # never the first slide silently
        read_slide({"path": tmp_path / "both.h5ad"})
    with pytest.raises(InputError, match="'C' is not among"):
        read_slide({"path": tmp_path / "both.h5ad", "name": "C"})
    only_b = read_slide({"path": tmp_path / "both.h5ad", "name": "B"})
    assert only_b.n_obs == 100 and list(only_b.uns[keys.SPATIAL_UNS]) == ["B"]
    np.testing.assert_allclose(only_b.obsm["spatial"], ref.obsm["spatial"][:100])
    from data.readers import _anndata_reads_zarr3
    from pipeline.sections import check_disjoint           # two libraries of one file: two stage-5 sections
    check_disjoint([{"path": str(tmp_path / "both.h5ad"), "name": "A"}], [{"path": str(tmp_path / "both.h5ad"), "name": "B"}])
    if _anndata_reads_zarr3():                              # the same in an AnnData .zarr folder
        both.write_zarr(tmp_path / "both.zarr")
        check_disjoint([{"path": str(tmp_path / "both.zarr"), "name": "A"}], [{"path": str(tmp_path / "both.zarr"), "name": "B"}])

    broken = _scanpy_style(ref, "A")
    del broken.uns[keys.SPATIAL_UNS]["A"]["scalefactors"][f"tissue_{kind}_scalef"]
    broken.write_h5ad(tmp_path / "noscale.h5ad")
    with pytest.raises(InputError) as err:
        read_slide({"path": tmp_path / "noscale.h5ad"})
    assert str(tmp_path / "noscale.h5ad") in str(err.value) and f"tissue_{kind}_scalef" in str(err.value)

def _legacy_st(tmp_path, n=6):
    xs, ys = np.meshgrid(np.arange(1, n + 1), np.arange(1, n + 1))
    ids = [f"{x}x{y}" for x, y in zip(xs.ravel(), ys.ravel())]
    rng = np.random.default_rng(0)
    counts = pd.DataFrame(rng.poisson(3, (len(ids), 20)), index=ids, columns=[f"G{i}" for i in range(20)])
    counts.to_csv(tmp_path / "s.tsv.gz", sep="\t", compression="gzip")
    spots = pd.DataFrame({"x": xs.ravel(), "y": ys.ravel(), "new_x": xs.ravel() + 0.01, "new_y": ys.ravel(),
                          "pixel_x": xs.ravel() * 200.0, "pixel_y": ys.ravel() * 200.0, "selected": 1})
    spots.loc[0, "selected"] = 0
    spots.to_csv(tmp_path / "s_selection.tsv", sep="\t", index=False)
    return tmp_path / "s.tsv.gz", tmp_path / "s_selection.tsv", counts


def test_legacy_st_and_labelled_coordinates(tmp_path):
    counts_path, spots_path, counts = _legacy_st(tmp_path)
    lab = pd.DataFrame({"x": [1.98, 3.01], "y": [1.02, 4.0], "pixel_x": [400, 600], "pixel_y": [200, 800],
                        "label": ["tumour", "undetermined"]})
    lab.to_csv(tmp_path / "labels.tsv", sep="\t", index=False)
    a = read_slide({"counts": counts_path, "spots": spots_path, "truth": tmp_path / "labels.tsv"})
    assert a.n_obs == len(counts) - 1                      # the unselected spot is dropped
    assert "1x1" not in a.obs_names
    np.testing.assert_allclose(a.obsm[keys.SPATIAL][0], [400.0, 200.0])   # spot 2x1
    assert a.obs.loc["2x1", keys.TRUTH] == "tumour"
    assert pd.isna(a.obs.loc["3x4", keys.TRUTH])           # 'undetermined' = not annotated


def test_legacy_st_ids_and_columns_in_another_case(tmp_path):
    """Spot ids written '2X1' and selection columns 'X', 'Pixel_X' (a spreadsheet's capitals) read as
    '2x1' and x, pixel_x, not refused as 'not a legacy ST table'."""
    counts_path, spots_path, counts = _legacy_st(tmp_path)
    ref = read_slide({"counts": counts_path, "spots": spots_path})
    counts.index = [i.upper() for i in counts.index]
    counts.to_csv(tmp_path / "upper.tsv", sep="\t")
    spots = pd.read_csv(spots_path, sep="\t")
    spots.columns = ["X", "Y", "new_x", "new_y", "Pixel_X", "PIXEL_Y", "Selected"]
    spots.to_csv(tmp_path / "upper_sel.tsv", sep="\t", index=False)
    a = read_slide({"counts": tmp_path / "upper.tsv", "spots": tmp_path / "upper_sel.tsv"})
    assert a.obs_names.equals(ref.obs_names) and "2x1" in a.obs_names
    np.testing.assert_array_equal(a.obsm[keys.SPATIAL], ref.obsm[keys.SPATIAL])


@pytest.mark.parametrize("cut", ["counts_header", "spots_header", "labels_header", "counts_row"])
def test_legacy_st_tables_cut_short_are_one_line(tmp_path, cut):
    """A table holding its header line alone (an interrupted copy) failed with an IndexError while its
    error message was built; a count table cut inside a selected spot's row was refused as 'non-finite
    values' without naming the spot or the likely cause."""
    import gzip

    counts_path, spots_path, counts = _legacy_st(tmp_path)
    labels = tmp_path / "labels.tsv"
    pd.DataFrame({"x": [2], "y": [1], "pixel_x": [400], "pixel_y": [200], "label": ["tumour"]}).to_csv(
        labels, sep="\t", index=False)
    if cut == "counts_row":
        text = counts.to_csv(sep="\t")
        counts_path = tmp_path / "cut.tsv"
        counts_path.write_text(text[:len(text) - len(text.splitlines()[-1]) // 2 - 1])   # the last row, half of it
        expect = f"{counts_path}: the row of spot '6x6' has \\d+ empty cell\\(s\\) of its 20 genes .*cut short"
    else:
        path = {"counts_header": counts_path, "spots_header": spots_path, "labels_header": labels}[cut]
        with (gzip.open(path, "rt") if path.suffix == ".gz" else open(path)) as f:
            header = f.readline()
        with (gzip.open(path, "wt") if path.suffix == ".gz" else open(path, "w")) as f:
            f.write(header)
        expect = f"{path}: cannot be read as .*: it holds a header line and no rows under it"
    with pytest.raises(InputError, match=expect):
        read_slide({"counts": counts_path, "spots": spots_path, "truth": labels})


def test_a_truth_file_cut_short_is_warned_of(slice_copy, caplog):
    """A label file cut short (an interrupted copy) scored against the labels before the cut, its last label
    possibly cut too ("Lay"), with no word: a file whose last line has no line end is warned of."""
    truth = slice_copy / "truth.txt"
    text = truth.read_text()
    with caplog.at_level("WARNING", logger="stpipe"):
        read_slide({"path": slice_copy, "truth": truth})
    assert "has no line end" not in caplog.text
    truth.write_text(text[:len(text) // 2 + 3])
    with caplog.at_level("WARNING", logger="stpipe"):
        a = read_slide({"path": slice_copy, "truth": truth})
    n = int(a.obs[keys.TRUTH].notna().sum())
    assert "truth.txt: its last line has no line end" in caplog.text and f"({n} of the slide's {a.n_obs} spots" in caplog.text


@pytest.mark.parametrize("content", ["empty", "header"])
def test_visium_positions_empty_or_header_alone_are_one_line(slice_copy, content):
    """An empty tissue_positions file ended in pandas' EmptyDataError traceback; Space Ranger 2's file with
    its header line alone is refused as such."""
    positions = slice_copy / "spatial" / "tissue_positions_list.csv"
    if content == "empty":
        positions.write_text("")
        expect = "it is empty"
    else:
        positions.unlink()
        positions = positions.with_name("tissue_positions.csv")
        positions.write_text("barcode,in_tissue,array_row,array_col,pxl_row_in_fullres,pxl_col_in_fullres\n")
        expect = "it holds a header line and no rows under it"
    with pytest.raises(InputError, match=f"{positions}: cannot be read as Space Ranger's spot positions table: {expect}"):
        read_slide({"path": slice_copy})


@pytest.mark.parametrize("column, value, expect", [
    ("selected", "yes", "the selected column must be 1 \\(under tissue\\) or 0 on every row; row 4 of the file has 'yes'"),
    ("selected", np.nan, "the selected column must be 1 .* row 4 of the file has 'nan'"),
    ("pixel_x", "abc", "pixel_x, pixel_y must be numbers \\(full-resolution pixels\\); row 4 of the file has abc, 200.0"),
    ("repeat", None, "spot '3x1' \\(array x, y\\) is listed more than once with different pixel positions"),
    ("counts_repeat", None, "s.tsv.gz: spot '4x1' has more than one row, with different counts")])
def test_bad_selection_table_values_name_the_row(tmp_path, column, value, expect):
    """A selection table's selected flag or pixel position that is not a number ended in a ValueError
    traceback; a spot listed twice at two positions was read at the first, and a count table listing a
    spot twice gave two spots of one name, silently."""
    counts_path, spots_path, _ = _legacy_st(tmp_path)
    spots = pd.read_csv(spots_path, sep="\t")
    if column == "repeat":
        spots = pd.concat([spots, spots.iloc[[2]].assign(pixel_x=9999.0)])
    elif column == "counts_repeat":       # the count table lists a spot twice, with other counts the second time
        counts = pd.read_csv(counts_path, sep="\t", index_col=0)
        ref = read_slide({"counts": counts_path, "spots": spots_path})
        pd.concat([counts, counts.iloc[[3]]]).to_csv(counts_path, sep="\t")       # the same row again: kept once
        again = read_slide({"counts": counts_path, "spots": spots_path})
        assert again.obs_names.equals(ref.obs_names) and (again.X != ref.X).nnz == 0
        pd.concat([counts, counts.iloc[[3]] + 1]).to_csv(counts_path, sep="\t")
    else:
        spots[column] = spots[column].astype(object)
        spots.loc[2, column] = value
    spots.to_csv(spots_path, sep="\t", index=False)
    with pytest.raises(InputError, match=expect):
        read_slide({"counts": counts_path, "spots": spots_path})


@pytest.mark.parametrize("name, sep, transpose", [("s.csv.gz", ",", False), ("s.csv", ",", True),
                                                  ("s.txt.gz", " ", False), ("s.txt", "\t", True)])
def test_legacy_st_count_table_delimiter_is_read_not_assumed(tmp_path, name, sep, transpose):
    """A count table's delimiter comes from its first line, not its name (a .csv.gz used to be read
    as tab-separated and refused with its whole first row quoted); genes x spots is turned round."""
    counts_path, spots_path, counts = _legacy_st(tmp_path)
    ref = read_slide({"counts": counts_path, "spots": spots_path})
    (counts.T if transpose else counts).to_csv(tmp_path / name, sep=sep)
    spots = pd.read_csv(spots_path, sep="\t")
    spots.to_csv(tmp_path / "sel.csv.gz", index=False)          # the selection table as CSV too
    a = read_slide({"counts": tmp_path / name, "spots": tmp_path / "sel.csv.gz"})
    assert a.obs_names.equals(ref.obs_names) and a.var_names.equals(ref.var_names)
    assert (a.X != ref.X).nnz == 0
    np.testing.assert_array_equal(a.obsm[keys.SPATIAL], ref.obsm[keys.SPATIAL])


@pytest.mark.parametrize("case", ["missing_matrix", "missing_positions", "barcodes", "other_slide_positions",
                                  "non_integer", "no_input"])
def test_bad_input_names_the_file(slice_copy, case):
    cfg = {"path": slice_copy}
    if case == "missing_matrix":
        import shutil
        shutil.rmtree(slice_copy / "filtered_feature_bc_matrix")
        expect = "filtered_feature_bc_matrix"
    elif case == "missing_positions":
        (slice_copy / "spatial" / "tissue_positions_list.csv").unlink()
        expect = "tissue_positions"
    elif case == "barcodes":
        p = slice_copy / "spatial" / "tissue_positions_list.csv"
        df = pd.read_csv(p, header=None)
        df[0] = df[0].str.replace("SYN", "OTHER")
        df.to_csv(p, header=False, index=False)
        expect = "barcodes"
    elif case == "other_slide_positions":
        # same array barcodes, but another slide's tissue: many matrix spots marked in_tissue=0
        p = slice_copy / "spatial" / "tissue_positions_list.csv"
        df = pd.read_csv(p, header=None)
        df.loc[df.index[::10], 1] = 0
        df.to_csv(p, header=False, index=False)
        expect = "in_tissue=0"
    elif case == "non_integer":
        p = slice_copy / "filtered_feature_bc_matrix" / "matrix.mtx.gz"
        with gzip.open(p, "rt") as fh:
            lines = fh.read().splitlines()
        lines[0] = lines[0].replace("integer", "real")
        body = [" ".join(line.split()[:2] + [str(float(line.split()[2]) + 0.37)]) for line in lines[3:]]
        with gzip.open(p, "wt") as fh:
            fh.write("\n".join(lines[:3] + body) + "\n")
        expect = "not integers"
    else:
        cfg = {}
        expect = "data.path"
    with pytest.raises(InputError) as err:
        read_slide(cfg)
    msg = str(err.value)
    assert expect in msg and "\n" not in msg
    if case != "no_input":
        assert str(slice_copy) in msg


def test_bad_scale_factor_detected(slice_copy):
    """A scale factor that is off puts spots outside the image or off the tissue: both refused."""
    from image_process.features import spot_image_features

    sf_path = slice_copy / "spatial" / "scalefactors_json.json"
    sf = json.loads(sf_path.read_text())
    for factor, expect in ((1.8, "outside"), (0.3, "cover only")):
        bad = dict(sf, tissue_hires_scalef=sf["tissue_hires_scalef"] * factor)
        sf_path.write_text(json.dumps(bad))
        a = read_slide({"path": slice_copy})
        with pytest.raises(InputError, match=expect) as err:
            spot_image_features(a, {"use": "hires"})
        assert "tissue_hires_image.png" in str(err.value)
        assert "look like pixels of this image" not in str(err.value)
    sf_path.write_text(json.dumps(sf))
    a = read_slide({"path": slice_copy})           # positions already in lowres pixels (another tool's export)
    a.obsm["spatial"] = a.obsm["spatial"] * sf["tissue_lowres_scalef"]
    with pytest.raises(InputError, match="look like pixels of this image already"):
        spot_image_features(a, {"use": "lowres"})
    lowres_png = slice_copy / "spatial" / "tissue_lowres_image.png"    # a downscaled image given as data.image
    a = read_slide({"path": slice_copy, "image": str(lowres_png)})
    with pytest.raises(InputError, match="data.image must be the full-resolution H&E"):
        spot_image_features(a, {"use": "auto"})
    sf_path.write_text(json.dumps(dict(sf, tissue_hires_scalef=7)))
    with pytest.raises(InputError, match="scalefactors_json.json"):
        read_slide({"path": slice_copy})
    sf_path.write_text(json.dumps({k: v for k, v in sf.items() if k != "tissue_hires_scalef"}))
    with pytest.raises(InputError, match="has no 'tissue_hires_scalef'"):
        read_slide({"path": slice_copy})
    sf_path.write_text("[]")                         # valid JSON, not an object: was an AttributeError
    with pytest.raises(InputError, match=r"scalefactors_json.json: expected a JSON object of scale factors .* found \[\]"):
        read_slide({"path": slice_copy})
    sf_path.unlink()                                 # the file itself missing: named so, with where it comes from
    with pytest.raises(InputError, match="scalefactors_json.json is missing: copy it from the Space Ranger run"):
        read_slide({"path": slice_copy})


def test_run_folder_outs_and_extra_scalefactors(slice_copy, tmp_path):
    """A Space Ranger run folder (results in outs/) is read through outs/; scale factors the pipeline
    does not use (CytAssist's regist_target_img_scalef) are not validated; data.bin_um (Visium HD only)
    is refused on it."""
    import shutil
    run = tmp_path / "run"
    shutil.copytree(slice_copy, run / "outs")
    sf_path = run / "outs" / "spatial" / "scalefactors_json.json"
    sf_path.write_text(json.dumps(dict(json.loads(sf_path.read_text()), regist_target_img_scalef=2.5)))
    a = read_slide({"path": run})
    ref = read_slide({"path": slice_copy})
    assert list(a.obs_names) == list(ref.obs_names) and keys.library_id(a) == "run"
    (run / "outs" / "spatial" / "tissue_positions.parquet").write_bytes(b"PAR1")   # beside the CSV: still read
    assert read_slide({"path": run}).n_obs == ref.n_obs
    with pytest.raises(InputError, match="standard Visium folder"):
        read_slide({"path": run, "bin_um": 16})


def test_truth_saved_as_utf16_is_read_and_other_encodings_named(synthetic_slice, tmp_path):
    """Excel's "Unicode Text" export is UTF-16 with a byte-order mark: read as such (it was refused
    with a codec error). A Latin-1 file is refused with the fix (save as UTF-8)."""
    text = (synthetic_slice / "truth.txt").read_text()
    ref = read_slide({"path": synthetic_slice, "truth": synthetic_slice / "truth.txt"})
    (tmp_path / "utf16.txt").write_bytes(text.encode("utf-16"))
    a = read_slide({"path": synthetic_slice, "truth": tmp_path / "utf16.txt"})
    assert a.obs[keys.TRUTH].equals(ref.obs[keys.TRUTH])
    (tmp_path / "latin1.txt").write_bytes(text.replace("\tD1", "\tD\u00e91").encode("latin-1"))
    with pytest.raises(InputError, match="latin1.txt: cannot be read as a label table: it is not UTF-8 text"):
        read_slide({"path": synthetic_slice, "truth": tmp_path / "latin1.txt"})


def test_truth_labels_with_spaces_around_them_are_one_label(synthetic_slice, tmp_path):
    """"D1 " (a hand-edited file's trailing space) is the label "D1", not a class of its own that would
    change the number of domains and the score; "undetermined " still means not annotated."""
    lines = (synthetic_slice / "truth.txt").read_text().splitlines()
    ref = read_slide({"path": synthetic_slice, "truth": synthetic_slice / "truth.txt"})
    spaced = [line + " " if i % 2 else line for i, line in enumerate(lines)]
    spaced[3] = spaced[3].split("\t")[0] + "\t undetermined "
    (tmp_path / "spaced.txt").write_text("\n".join(spaced) + "\n")
    a = read_slide({"path": synthetic_slice, "truth": tmp_path / "spaced.txt"})
    assert set(a.obs[keys.TRUTH].dropna()) == set(ref.obs[keys.TRUTH].dropna())
    assert a.obs[keys.TRUTH].isna().sum() == ref.obs[keys.TRUTH].isna().sum() + 1
    # spot names with spaces around them match; a line repeated is fine, one spot with two labels is not
    (tmp_path / "names.txt").write_text("\n".join([" " + line for line in lines] + [lines[5]]) + "\n")
    b = read_slide({"path": synthetic_slice, "truth": tmp_path / "names.txt"})
    assert b.obs[keys.TRUTH].astype(str).equals(ref.obs[keys.TRUTH].astype(str))
    spot, label = lines[0].split("\t")
    other = sorted(set(ref.obs[keys.TRUTH].dropna()) - {label})[0]
    (tmp_path / "twice.txt").write_text("\n".join(lines + [f"{spot}\t{other}"]) + "\n")
    with pytest.raises(InputError, match=f"twice.txt: spot '{spot}' has more than one label"):
        read_slide({"path": synthetic_slice, "truth": tmp_path / "twice.txt"})


def test_truth_from_another_slide(synthetic_slice, tmp_path):
    (tmp_path / "t.txt").write_text("AAAA-1\tL1\nBBBB-1\tL2\n")
    with pytest.raises(InputError, match="t.txt"):
        read_slide({"path": synthetic_slice, "truth": tmp_path / "t.txt"})


def test_truth_mostly_matching_but_from_another_slide(synthetic_slice, tmp_path):
    """Visium barcodes repeat on every slide: a file annotating many spots this slide lacks is refused."""
    own = read_slide({"path": synthetic_slice}).obs_names[:400]
    lines = [f"{b}\tL{i % 3}" for i, b in enumerate(own)]
    (tmp_path / "near.txt").write_text("\n".join(lines + ["TTTTTTTTTTTTTTTT-1\tL1"]) + "\n")
    a = read_slide({"path": synthetic_slice, "truth": tmp_path / "near.txt"})      # one stray spot: fine
    assert a.obs[keys.TRUTH].notna().sum() == 400
    stray = [f"{'ACGT'[i % 4] * 12}{i:04d}-1\tL1" for i in range(40)]
    (tmp_path / "other.txt").write_text("\n".join(lines + stray) + "\n")
    with pytest.raises(InputError, match="other.txt: 40 of its 440 annotated spots are not spots of this slide"):
        read_slide({"path": synthetic_slice, "truth": tmp_path / "other.txt"})

    # the same files written without Space Ranger's '-1' suffix: matched, and the strays still seen
    (tmp_path / "bare.txt").write_text("\n".join(l.replace("-1\t", "\t") for l in lines) + "\n")
    b = read_slide({"path": synthetic_slice, "truth": tmp_path / "bare.txt"})
    assert b.obs[keys.TRUTH].astype(str).equals(a.obs[keys.TRUTH].astype(str))
    (tmp_path / "bare_other.txt").write_text("\n".join(l.replace("-1\t", "\t") for l in lines + stray) + "\n")
    with pytest.raises(InputError, match="40 of its 440 annotated spots are not spots of this slide"):
        read_slide({"path": synthetic_slice, "truth": tmp_path / "bare_other.txt"})


def test_truth_table_with_a_header_needs_its_label_column(synthetic_slice, tmp_path):
    """A metadata table (spatialLIBD's metadata.tsv: R's write.table, the header one field shorter than
    the rows) holds the labels in one of many columns: it is refused until data.truth_column names it,
    never read as if its second column were the labels; a ragged table is one line naming the file."""
    ref = read_slide({"path": synthetic_slice, "truth": synthetic_slice / "truth.txt"})
    truth = ref.obs[keys.TRUTH].astype(str)
    rows = [f"{b}\t{b}\tslide1\t{i % 5}\t{lab}" for i, (b, lab) in enumerate(truth.items())]
    (tmp_path / "metadata.tsv").write_text("\n".join(["barcode\tsample\tcluster\tlayer_guess"] + rows) + "\n")
    with pytest.raises(InputError, match=r"metadata.tsv: a table of 5 columns; .*data.truth_column=NAME "
                                         r"\(columns with a few distinct values: cluster \(5\), layer_guess"):
        read_slide({"path": synthetic_slice, "truth": tmp_path / "metadata.tsv"})
    a = read_slide({"path": synthetic_slice, "truth": tmp_path / "metadata.tsv", "truth_column": "layer_guess"})
    assert a.obs[keys.TRUTH].astype(str).equals(truth)
    with pytest.raises(InputError, match="metadata.tsv: no column 'layers' for data.truth_column \\(columns with"):
        read_slide({"path": synthetic_slice, "truth": tmp_path / "metadata.tsv", "truth_column": "layers"})

    # R's write.table of a one-column data frame: a header naming the label column only, rows "barcode<TAB>label"
    (tmp_path / "r_labels.tsv").write_text("\n".join(["layer"] + [f"{b}\t{lab}" for b, lab in truth.items()]) + "\n")
    r = read_slide({"path": synthetic_slice, "truth": tmp_path / "r_labels.tsv"})
    assert r.obs[keys.TRUTH].astype(str).equals(truth)

    # a CSV with a header and a barcode column that is not the first; R's NA = not annotated
    df = pd.DataFrame({"region": truth.to_numpy(), "barcode": truth.index})
    df.loc[:9, "region"] = "NA"
    df.to_csv(tmp_path / "labels.csv", index=False)
    b = read_slide({"path": synthetic_slice, "truth": tmp_path / "labels.csv", "truth_column": "Region"})
    assert b.obs[keys.TRUTH].isna().sum() == 10
    assert b.obs[keys.TRUTH].iloc[10:].astype(str).equals(truth.iloc[10:])

    for i, body in enumerate([[f"{x},L1" for x in truth.index[:5]] + ["A,L2,extra"],     # pandas' ParserError
                              [f"{x},L1,extra,more" for x in truth.index[:5]]]):       # 2 fields more than the header
        (tmp_path / f"ragged{i}.csv").write_text("\n".join(["barcode,label"] + body) + "\n")
        with pytest.raises(InputError, match=f"ragged{i}.csv: cannot be read as a label table") as err:
            read_slide({"path": synthetic_slice, "truth": tmp_path / f"ragged{i}.csv", "truth_column": "label"})
        assert "\n" not in str(err.value)


def test_truth_from_an_h5ad_obs_column(synthetic_slice, tmp_path):
    ref = read_slide({"path": synthetic_slice, "truth": synthetic_slice / "truth.txt"})
    ref.obs["layer"] = ref.obs[keys.TRUTH].astype(str).to_numpy()
    ref.obs.loc[ref.obs_names[:3], "layer"] = "undetermined"
    ref.write_h5ad(tmp_path / "s.h5ad")
    a = read_slide({"path": tmp_path / "s.h5ad", "truth_column": "layer"})
    assert a.obs[keys.TRUTH].isna().sum() == 3
    assert a.obs[keys.TRUTH].iloc[3:].astype(str).equals(ref.obs[keys.TRUTH].iloc[3:].astype(str))
    with pytest.raises(InputError, match="s.h5ad: obs has no column 'Layer' .*did you mean 'layer'"):
        read_slide({"path": tmp_path / "s.h5ad", "truth_column": "Layer"})
    with pytest.raises(InputError, match="data.truth_column without data.truth"):
        read_slide({"path": synthetic_slice, "truth_column": "layer"})


def test_real_dlpfc_reader():
    folder = shared("dlpfc", "151673")
    a = read_slide({"path": folder, "truth": folder / "151673_truth.txt"})
    assert a.n_obs == 3639
    assert a.obs[keys.TRUTH].nunique() == 7
    assert keys.scalefactors(a)["tissue_lowres_scalef"] == pytest.approx(0.045004502)


def _rewrite_positions(folder, change):
    p = folder / "spatial" / "tissue_positions_list.csv"
    df = pd.read_csv(p, header=None)
    change(df).to_csv(p, header=False, index=False)
    return "tissue_positions_list.csv"


def _break(folder, case):
    """Break the copied Space Ranger folder; return (config, text the error must contain)."""
    cfg = {"path": folder}
    sf = folder / "spatial" / "scalefactors_json.json"
    if case == "scalefactors_not_json":
        sf.write_text("{'spot_diameter_fullres': 89,")
        return cfg, "scalefactors_json.json"
    if case == "positions_five_columns":
        return cfg, _rewrite_positions(folder, lambda df: df.iloc[:, :5])
    if case == "positions_not_numbers":
        def text_column(df):
            df[4] = "n/a"
            return df
        return cfg, _rewrite_positions(folder, text_column)
    if case == "positions_in_tissue_2":          # a flag that is neither 0 nor 1 was taken as under tissue
        def flag_two(df):
            df.iloc[3, 1] = 2
            return df
        _rewrite_positions(folder, flag_two)
        return cfg, "in_tissue must be 1 (under tissue) or 0 on every row"
    if case == "positions_barcode_twice":          # listed again with another position
        def moved_copy(df):
            row = df.iloc[[3]].copy()
            row[4] += 500
            return pd.concat([df, row])
        return cfg, _rewrite_positions(folder, moved_copy)
    if case == "matrix_barcode_twice":
        import gzip
        path = folder / "filtered_feature_bc_matrix" / "barcodes.tsv.gz"
        lines = gzip.open(path, "rt").read().splitlines()
        lines[5] = lines[4]
        with gzip.open(path, "wt") as f:
            f.write("\n".join(lines) + "\n")
        return cfg, "occur more than once"
    if case == "truth_missing":
        return {**cfg, "truth": folder / "no_truth.txt"}, "no_truth.txt"
    if case == "truth_one_column":
        (folder / "truth.txt").write_text("\n".join(["AAAC-1", "AAAG-1", "AAAT-1"]))
        return {**cfg, "truth": folder / "truth.txt"}, "truth.txt"
    if case == "truth_other_barcodes":
        (folder / "truth.txt").write_text("\n".join(f"X{i}-1\tL1" for i in range(50)))
        return {**cfg, "truth": folder / "truth.txt"}, "truth.txt"
    if case == "image_missing":        # the error also names the folder's closest file
        (folder / "nope_he.tif").write_bytes(b"")
        return {**cfg, "image": folder / "nope.tif"}, "data.image). Close names in"
    if case == "image_not_an_image":
        (folder / "he.png").write_text("not a png")
        return {**cfg, "image": folder / "he.png"}, "he.png"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["scalefactors_not_json", "positions_five_columns", "positions_not_numbers",
                                  "positions_in_tissue_2", "positions_barcode_twice", "matrix_barcode_twice", "truth_missing", "truth_one_column", "truth_other_barcodes", "image_missing",
                                  "image_not_an_image"])
def test_more_bad_visium_input_names_the_file(slice_copy, case):
    """Each broken file gives one InputError line naming it: never a traceback from pandas or numpy."""
    cfg, expect = _break(slice_copy, case)
    with pytest.raises(InputError) as err:
        read_slide(cfg)
    msg = str(err.value)
    assert expect in msg and "\n" not in msg, msg


def test_features_without_gene_symbols_are_named_by_their_ids(slice_copy):
    """A features.tsv whose symbol column is empty (some converters write ids only) names those genes by
    their ids; it ended in a garbled "cannot be read as a 10x count matrix". Other genes keep their symbols."""
    import gzip
    ref = read_slide({"path": slice_copy})
    path = slice_copy / "filtered_feature_bc_matrix" / "features.tsv.gz"
    rows = [line.split("\t") for line in gzip.open(path, "rt").read().splitlines()]
    for r in rows[:10]:
        r[1] = ""
    with gzip.open(path, "wt") as f:
        f.write("\n".join("\t".join(r) for r in rows) + "\n")
    a = read_slide({"path": slice_copy})
    assert list(a.var_names[:10]) == [r[0] for r in rows[:10]] and list(a.var_names[10:]) == list(ref.var_names[10:])
    assert (a.X != ref.X).nnz == 0


def test_positions_row_repeated_exactly_is_kept_once(slice_copy, caplog):
    """A positions file with a row repeated as it was (a script appending twice) reads as the original,
    with a warning; it ended in a pandas length-mismatch traceback."""
    ref = read_slide({"path": slice_copy})
    _rewrite_positions(slice_copy, lambda df: pd.concat([df, df.iloc[[3, 7]]]))
    with caplog.at_level("WARNING", logger="stpipe"):
        a = read_slide({"path": slice_copy})
    assert "2 row(s) repeat an earlier row exactly" in caplog.text
    assert a.obs_names.equals(ref.obs_names)
    np.testing.assert_array_equal(a.obsm[keys.SPATIAL], ref.obsm[keys.SPATIAL])


@pytest.mark.parametrize("case", ["h5ad_no_spatial", "h5ad_nan_spatial", "h5ad_negative", "h5ad_all_zero",
                                  "h5ad_corrupt", "h5ad_duplicate_spots", "h5ad_spatial_one_column",
                                  "h5ad_spatial_words", "h5ad_spatial_one_point", "h5ad_spatial_piled"])
@pytest.mark.filterwarnings("ignore:Observation names are not unique:UserWarning")   # made on purpose
def test_bad_h5ad_names_the_file(synthetic_slice, tmp_path, case):
    ref = read_slide({"path": synthetic_slice})
    X = np.asarray(ref.X.todense() if hasattr(ref.X, "todense") else ref.X, np.float32)
    path = tmp_path / "s.h5ad"
    if case == "h5ad_corrupt":
        path.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 64)
    else:
        if case == "h5ad_negative":
            X[0, 0] = -3
        if case == "h5ad_all_zero":
            X[:] = 0
        out = ad.AnnData(X=X, obs=ref.obs[[]].copy(), var=ref.var[[]].copy())
        if case == "h5ad_duplicate_spots":     # two slides joined without telling their barcodes apart
            out.obs_names = list(ref.obs_names[:10]) + list(ref.obs_names[:ref.n_obs - 10])
        if case != "h5ad_no_spatial":
            out.obsm["spatial"] = np.array(ref.obsm["spatial"], float)
        if case == "h5ad_nan_spatial":
            out.obsm["spatial"][5] = np.nan
        if case == "h5ad_spatial_one_column":
            out.obsm["spatial"] = out.obsm["spatial"][:, :1].copy()
        if case == "h5ad_spatial_words":
            out.obsm["spatial"] = np.full((out.n_obs, 2), "centre")
        if case == "h5ad_spatial_one_point":    # every spot at one place: it was refused for the spot diameter
            out.obsm["spatial"][:] = 120.0
        if case == "h5ad_spatial_piled":        # 2% of the spots on another's centre
            out.obsm["spatial"][: out.n_obs // 50] = out.obsm["spatial"][out.n_obs // 2]
        out.write_h5ad(path)
    with pytest.raises(InputError) as err:
        read_slide({"path": path})
    msg = str(err.value)
    assert str(path) in msg and "\n" not in msg, msg
    if case in ("h5ad_spatial_one_point", "h5ad_spatial_piled"):
        assert "lie at the position of another spot" in msg


def test_a_few_spots_sharing_a_centre_are_said(synthetic_slice, tmp_path, caplog):
    """One spot on another's centre (under 1% of the spots) is read, with a warning naming the pair."""
    ref = read_slide({"path": synthetic_slice})
    out = ref.copy()
    out.obsm["spatial"] = np.array(out.obsm["spatial"], float)
    out.obsm["spatial"][3] = out.obsm["spatial"][4]
    out.uns.pop("spatial")
    out.write_h5ad(tmp_path / "one.h5ad")
    with caplog.at_level("WARNING", logger="stpipe"):
        a = read_slide({"path": tmp_path / "one.h5ad"})
    assert a.n_obs == ref.n_obs and "1 spot(s) lie at the position of another spot" in caplog.text


def test_h5ad_errors_say_where_the_file_keeps_what_is_missing(synthetic_slice, tmp_path):
    """Files converted from other tools keep spot centres under another name (obsm['X_spatial'],
    obs x/y) or the counts in a layer scanpy does not name 'counts': the error gives the line that fixes it."""
    ref = read_slide({"path": synthetic_slice})
    xy = np.array(ref.obsm["spatial"], float)
    moved = ad.AnnData(X=ref.X.copy(), obs=ref.obs[[]].copy(), var=ref.var[[]].copy())
    moved.obs["imagecol"], moved.obs["imagerow"] = xy[:, 0], xy[:, 1]
    moved.write_h5ad(tmp_path / "obs.h5ad")
    with pytest.raises(InputError, match=r"adata.obs\[\['imagecol', 'imagerow'\]\]"):
        read_slide({"path": tmp_path / "obs.h5ad"})
    normed = ad.AnnData(X=ref.X.copy(), obs=ref.obs[[]].copy(), var=ref.var[[]].copy(), obsm={"spatial": xy})
    normed.layers["umi"] = normed.X.copy()
    normed.X = normed.X.multiply(1 / np.asarray(normed.X.sum(axis=1))).tocsr() * 1e4
    normed.write_h5ad(tmp_path / "normed.h5ad")
    with pytest.raises(InputError, match=r"layers\['umi'\] holds integers"):
        read_slide({"path": tmp_path / "normed.h5ad"})


@pytest.mark.parametrize("case", ["spots_missing_columns", "spots_nan_pixel", "spots_nan_array", "ids_not_in_spots",
                                  "none_selected", "non_numeric", "truncated_gzip", "other_table"])
def test_bad_legacy_st_names_the_file(tmp_path, case):
    counts_path, spots_path, counts = _legacy_st(tmp_path)
    if case == "spots_missing_columns":
        pd.read_csv(spots_path, sep="\t").drop(columns=["pixel_x"]).to_csv(spots_path, sep="\t", index=False)
        expect = spots_path
    elif case in ("spots_nan_pixel", "spots_nan_array"):
        spots = pd.read_csv(spots_path, sep="\t")
        spots.loc[4, "pixel_x" if case == "spots_nan_pixel" else "x"] = np.nan
        spots.to_csv(spots_path, sep="\t", index=False)
        expect = spots_path
    elif case == "ids_not_in_spots":
        counts.index = [f"{i}x{i + 100}" for i in range(len(counts))]
        counts.to_csv(counts_path, sep="\t", compression="gzip")
        expect = counts_path
    elif case == "none_selected":
        pd.read_csv(spots_path, sep="\t").assign(selected=0).to_csv(spots_path, sep="\t", index=False)
        expect = spots_path
    elif case == "truncated_gzip":
        counts_path.write_bytes(counts_path.read_bytes()[:200])
        expect = counts_path
    elif case == "other_table":          # a wide table of something else: its first row is not quoted whole
        pd.DataFrame(np.ones((5, 400)), index=[f"cell{i}" for i in range(5)]).to_csv(counts_path, sep="\t")
        expect = counts_path
    else:
        counts = counts.astype(object)
        counts.iloc[3, 2] = "many"
        counts.to_csv(counts_path, sep="\t", compression="gzip")
        expect = counts_path
    with pytest.raises(InputError) as err:
        read_slide({"counts": counts_path, "spots": spots_path})
    msg = str(err.value)
    assert str(expect) in msg and "\n" not in msg and len(msg) < 400, msg


def test_legacy_st_tables_of_two_sections_are_refused(tmp_path, caplog):
    """ST spot ids are array coordinates, shared by every section: a count table given with another
    section's selection table ran on the spots they shared (her2st A1 counts + B1 table: 210 of 346
    spots, silently). Both tables must hold >= 95% of the other's spots; a table filtered on purpose
    passes once its dropped spots are marked selected=0."""
    counts_path, spots_path, counts = _legacy_st(tmp_path, n=10)          # 100 spots, 99 selected
    spots = pd.read_csv(spots_path, sep="\t")
    spots.iloc[:20].to_csv(tmp_path / "a.tsv", sep="\t", index=False)    # the count table's spots, 20% missing
    with pytest.raises(InputError, match=r"s.tsv.gz: 80 of its 100 spots .*different sections") as err:
        read_slide({"counts": counts_path, "spots": tmp_path / "a.tsv"})
    assert "\n" not in str(err.value)
    counts.iloc[:90].to_csv(tmp_path / "f.tsv.gz", sep="\t", compression="gzip")   # 10 selected spots not counted
    with pytest.raises(InputError, match=r"s_selection.tsv: 10 of its 99 spots under tissue .*selected=0"):
        read_slide({"counts": tmp_path / "f.tsv.gz", "spots": spots_path})
    spots.loc[90:, "selected"] = 0                                             # the fix the message gives
    spots.to_csv(tmp_path / "fixed.tsv", sep="\t", index=False)
    assert read_slide({"counts": tmp_path / "f.tsv.gz", "spots": tmp_path / "fixed.tsv"}).n_obs == 89
    counts.iloc[:97].to_csv(tmp_path / "g.tsv.gz", sep="\t", compression="gzip")   # 3 of 99 missing: read, said
    with caplog.at_level("INFO", logger="stpipe"):
        assert read_slide({"counts": tmp_path / "g.tsv.gz", "spots": spots_path}).n_obs == 96
    assert "3 selected spot(s) without counts, left out" in caplog.text


def test_raw_matrix_only_keeps_the_spots_under_tissue(slice_copy):
    """A folder with only Space Ranger's raw matrix (every array barcode): cut to in_tissue=1, which is
    what the filtered matrix would have held."""
    import shutil
    ref = read_slide({"path": slice_copy})
    shutil.rmtree(slice_copy / "filtered_feature_bc_matrix")
    pos_file = slice_copy / "spatial" / "tissue_positions_list.csv"
    pos = pd.read_csv(pos_file, header=None)
    off = pd.DataFrame([[f"OFF{i:013d}-1", 0, 100 + i, 2 * i, 50 + i, 60 + i] for i in range(10)])
    pd.concat([pos, off]).to_csv(pos_file, header=False, index=False)
    counts = np.vstack([ref.X.toarray(), np.ones((10, ref.n_vars))])
    write_10x_h5(slice_copy / "raw_feature_bc_matrix.h5", counts, list(ref.obs_names) + list(off[0]),
                 list(ref.var_names))
    a = read_slide({"path": slice_copy})
    assert list(a.obs_names) == list(ref.obs_names)
    np.testing.assert_array_equal(a.X.toarray(), ref.X.toarray())
    np.testing.assert_array_equal(a.obsm[keys.SPATIAL], ref.obsm[keys.SPATIAL])


def test_subfolder_of_a_spaceranger_folder_names_its_parent(slice_copy):
    with pytest.raises(InputError) as err:
        read_slide({"path": slice_copy / "spatial"})
    assert f"set data.path={slice_copy}" in str(err.value)
    for part in ("filtered_feature_bc_matrix/matrix.mtx.gz", "spatial/scalefactors_json.json"):   # a file in it
        with pytest.raises(InputError, match=f"part of a Space Ranger folder: set data.path={slice_copy}"):
            read_slide({"path": slice_copy / part})


def test_a_folder_of_slides_or_of_tables_as_data_path_names_the_way_to_read_them(slice_copy, tmp_path):
    """data.path naming the folder above the slides (../shared/data/dlpfc) or a folder of legacy ST tables
    (../shared/data/mob, her2st) said only "no count matrix": the error now names what it holds and the fix."""
    import shutil

    def error_of(path):
        with pytest.raises(InputError) as err:
            read_slide({"path": path})
        return str(err.value)

    assert error_of(tmp_path).endswith(f"It holds one slide, slice: set data.path={slice_copy}")
    shutil.copytree(slice_copy, tmp_path / "other")
    assert error_of(tmp_path).endswith(f"It holds 2 slides (other, slice): set data.path to one of them, e.g. "
                                       f"data.path={tmp_path / 'other'}")
    h5ads = tmp_path / "h5ads"
    h5ads.mkdir()
    (h5ads / "s.h5ad").write_bytes(b"x")
    assert error_of(h5ads).endswith(f"set data.path={h5ads / 's.h5ad'}")
    legacy = tmp_path / "legacy"
    (legacy / "counts").mkdir(parents=True)
    _legacy_st(legacy / "counts")
    text = error_of(legacy)
    assert "no count matrix" in text and "It holds tables (counts/s.tsv.gz, counts/s_selection.tsv): a legacy ST " \
        "section is read from data.counts (its spots x genes table) and data.spots" in text
    images = tmp_path / "images"
    images.mkdir()
    (images / "A1.jpg").write_bytes(b"x")
    assert error_of(images).endswith("It holds images (A1.jpg): an H&E image is given as data.image, beside the "
                                     "slide's counts (data.path, or data.counts + data.spots)")
    (tmp_path / "empty").mkdir()
    assert error_of(tmp_path / "empty").endswith("as written by Space Ranger.")
    # a table or an image named as data.path
    assert "; this is a table: a legacy ST section is read from data.counts" in error_of(legacy / "counts" / "s.tsv.gz")
    assert "; this is an image: an H&E image is given as data.image" in error_of(images / "A1.jpg")


def test_a_slide_and_a_legacy_st_section_both_named_is_refused(tmp_path):
    """run_dlpfc.py's config sets data.path: --set data.counts=... --set data.spots=... ran on that slide,
    ignoring the section asked for. Both kinds of input named is now one error, for data and for a section."""
    from data.readers import check_input_files

    counts, spots, _ = _legacy_st(tmp_path)
    with pytest.raises(InputError, match=r"^data.path \(/somewhere\) and data.counts \(.*s.tsv.gz\) are both set, .*"
                                         r"--set data.path=null, or --set data.counts=null --set data.spots=null.$"):
        read_slide({"path": "/somewhere", "counts": counts, "spots": spots})
    with pytest.raises(InputError, match="^test.sections C2: path and spots are both given, .* Keep one.$"):
        check_input_files({"path": str(tmp_path), "spots": spots}, where="test.sections C2")

def test_an_r_or_loom_file_as_data_path_gets_the_conversion(tmp_path):
    """A Seurat object (.rds, .h5seurat) or a loom file was refused without a way forward."""
    for name, says in (("slide.rds", "R object .Seurat.: save it as .h5ad once, e.g. with SeuratDisk"),
                       ("slide.h5seurat", "SeuratDisk's Convert.dest = 'h5ad'."), ("slide.loom", "anndata.read_loom")):
        (tmp_path / name).write_bytes(b"x")
        with pytest.raises(InputError, match=rf"{name}: data.path must be .* or a SpatialData store; this is .*{says}"):
            read_slide({"path": tmp_path / name})


def test_dataset_registry(tmp_path):
    """data/datasets.json: the shared data match it; a changed or missing file is named, with the source."""
    import shutil

    from data.datasets import files_of, registry, verify

    reg = registry()
    assert {"dlpfc", "her2st", "mob"} <= set(reg) and all(ds.source.startswith("https://") for ds in reg.values())
    truth = "151673/151673_truth.txt"
    assert truth in files_of("dlpfc", "151673/")
    verify("dlpfc", [truth], shared("dlpfc").parent)
    (tmp_path / "dlpfc" / "151673").mkdir(parents=True)
    shutil.copy(shared("dlpfc", truth), tmp_path / "dlpfc" / truth)
    verify("dlpfc", [truth], tmp_path)
    with (tmp_path / "dlpfc" / truth).open("a") as f:
        f.write("AAAC-1\tWM\n")
    with pytest.raises(InputError, match="sha256 differs"):
        verify("dlpfc", [truth], tmp_path)
    with pytest.raises(InputError, match="spatialLIBD"):
        verify("dlpfc", ["151673/metadata.tsv"], tmp_path)


def test_spots_without_counts_are_kept_with_a_warning(synthetic_slice, tmp_path, caplog):
    import scipy.sparse as sp

    a = read_slide({"path": synthetic_slice})
    X = a.X.tolil()
    X[[3, 7], :] = 0
    a.X = sp.csr_matrix(X)
    del a.obs[keys.TOTAL_COUNTS]          # else its library sizes (of the counts before) would be kept
    a.write_h5ad(tmp_path / "s.h5ad")
    with caplog.at_level("WARNING", logger="stpipe"):
        b = read_slide({"path": str(tmp_path / "s.h5ad")})
    assert b.n_obs == a.n_obs and (b.obs[keys.TOTAL_COUNTS].to_numpy() == 0).sum() == 2
    assert "2 spot(s) have no counts" in caplog.text and a.obs_names[3] in caplog.text


def test_repeated_gene_names_are_renamed_and_said(slice_copy, tmp_path, caplog):
    """Gene-symbol matrices repeat a few names; they are made unique as scanpy does (NAME-1), in one log
    line, in every format (anndata's multi-line UserWarning no longer precedes it), and the same way."""
    import shutil
    import warnings

    features = slice_copy / "filtered_feature_bc_matrix" / "features.tsv.gz"
    with gzip.open(features, "rt") as fh:
        rows = fh.read().splitlines()
    rows[1] = rows[1].replace("Gene0001", "Gene0000")
    with gzip.open(features, "wt") as fh:
        fh.write("\n".join(rows) + "\n")
    want = ["Gene0000", "Gene0000-1", "Gene0002"]
    with warnings.catch_warnings(), caplog.at_level("INFO", logger="stpipe"):
        warnings.simplefilter("error", UserWarning)
        mex = read_slide({"path": slice_copy})
        assert list(mex.var_names[:3]) == want and mex.var_names.is_unique
        assert "1 gene name(s) occur more than once (e.g. 'Gene0000')" in caplog.text
        ref = mex.copy()
        shutil.rmtree(slice_copy / "filtered_feature_bc_matrix")
        names = ["Gene0000", "Gene0000", *ref.var_names[2:]]
        write_10x_h5(slice_copy / "filtered_feature_bc_matrix.h5", ref.X.toarray(), list(ref.obs_names), names)
        assert list(read_slide({"path": slice_copy}).var_names[:3]) == want
        ref.var_names = names
        ref.write_h5ad(tmp_path / "s.h5ad")
        assert list(read_slide({"path": str(tmp_path / "s.h5ad")}).var_names[:3]) == want


def test_h5ad_of_a_gene_subset_keeps_its_library_sizes(synthetic_slice, tmp_path, caplog):
    """An .h5ad saved with some genes only (highly variable genes, say) was log-normalised by the UMIs of
    those genes, inflating CP10k (stage 5's MSE on the demo: 2.00 instead of 1.29). Its own
    obs['total_counts'] is used when it is a whole number >= the UMIs read, for every spot."""
    from pipeline.preprocess import lognormalize

    full = read_slide({"path": synthetic_slice})
    full[:, :100].copy().write_h5ad(tmp_path / "subset.h5ad")       # obs['total_counts'] of every gene
    with caplog.at_level("INFO", logger="stpipe"):
        sub = read_slide({"path": str(tmp_path / "subset.h5ad")})
    assert "a gene subset" in caplog.text
    np.testing.assert_array_equal(sub.obs[keys.TOTAL_COUNTS], full.obs[keys.TOTAL_COUNTS])
    np.testing.assert_allclose(lognormalize(sub.X, sub.obs[keys.TOTAL_COUNTS]),
                               lognormalize(full.X, full.obs[keys.TOTAL_COUNTS])[:, :100], rtol=1e-6)
    bad = full[:, :100].copy()
    bad.obs[keys.TOTAL_COUNTS] = 1.0                                 # smaller than the UMIs read: not used
    bad.write_h5ad(tmp_path / "bad.h5ad")
    b = read_slide({"path": str(tmp_path / "bad.h5ad")})
    np.testing.assert_array_equal(b.obs[keys.TOTAL_COUNTS], np.asarray(b.X.sum(1)).ravel())


def test_h5ad_named_by_ensembl_id_takes_its_symbols(synthetic_slice, tmp_path, caplog):
    """An .h5ad whose var_names are Ensembl ids with the symbols in a var column is read with the
    symbols as gene names, as a Space Ranger folder is (its ids kept in var['gene_ids']), so config gene
    lists match and a stage-5 test section shares the training folder's genes (none did: "none of the
    model's genes is in its count table"). A gene without a symbol keeps its id; a column of one word
    (a feature type) or of ids is not taken; a file of ids alone is unchanged (MOB)."""
    full = read_slide({"path": synthetic_slice})
    ids = [f"ENSG{i:011d}.{i % 3 + 1}" for i in range(full.n_vars)]
    by_id = full.copy()
    by_id.var_names = ids
    by_id.var["feature_types"] = "Gene Expression"
    by_id.var["feature_name"] = [np.nan] + list(full.var_names[1:])
    by_id.write_h5ad(tmp_path / "ids.h5ad")
    with caplog.at_level("INFO", logger="stpipe"):
        a = read_slide({"path": str(tmp_path / "ids.h5ad")})
    assert "using the symbols in var['feature_name']" in caplog.text
    assert list(a.var_names) == [ids[0]] + list(full.var_names[1:])
    assert list(a.var["gene_ids"]) == ids
    np.testing.assert_array_equal(a.X.toarray(), full.X.toarray())
    by_id.var["feature_name"] = ids                     # ids again, and a one-word column: names unchanged
    del by_id.var["feature_types"]
    by_id.var["gene"] = "Gene Expression"
    by_id.write_h5ad(tmp_path / "ids_only.h5ad")
    assert list(read_slide({"path": str(tmp_path / "ids_only.h5ad")}).var_names) == ids


def test_h5ad_with_missing_array_indices_recovers_them(synthetic_slice, tmp_path, caplog):
    """A NaN in obs['array_row'] ended in numpy tracebacks (stage 1's spacing fit, stage 4's grid). Array
    indices that are missing or not whole are ignored, with a warning, and recovered from obsm['spatial'];
    whole-number floats are taken as integers."""
    full = read_slide({"path": synthetic_slice})
    holed = full.copy()
    holed.obs[keys.ARRAY_ROW] = holed.obs[keys.ARRAY_ROW].astype(float)
    holed.obs.loc[holed.obs_names[0], keys.ARRAY_ROW] = np.nan
    holed.write_h5ad(tmp_path / "holed.h5ad")
    with caplog.at_level("INFO", logger="stpipe"):
        a = read_slide({"path": str(tmp_path / "holed.h5ad")})
    assert "missing or not whole numbers for 1 spot(s)" in caplog.text and "hexagonal lattice" in caplog.text
    pairs = lambda x: x.obs[[keys.ARRAY_COL, keys.ARRAY_ROW]].to_numpy()     # noqa: E731
    np.testing.assert_array_equal(np.diff(pairs(a), axis=0), np.diff(pairs(full), axis=0))   # the same lattice
    as_float = full.copy()
    as_float.obs[keys.ARRAY_COL] = as_float.obs[keys.ARRAY_COL].astype(float)
    as_float.write_h5ad(tmp_path / "float.h5ad")
    b = read_slide({"path": str(tmp_path / "float.h5ad")})
    assert b.obs[keys.ARRAY_COL].dtype.kind == "i" and (pairs(b) == pairs(full)).all()


def test_swapped_x_and_y_are_refused():
    """Spot positions stored as (row, column) land partly on a wide tissue piece anyway, so the earlier
    checks let them through (151673 with swapped coordinates ran to the end); the same spots with x and
    y swapped back land on it much better, which is refused, naming the fix."""
    import cv2

    from image_process.patches import SlideImage, check_spots_on_image

    img = np.full((900, 900, 3), 245, np.uint8)                                   # white slide
    cv2.ellipse(img, (450, 450), (400, 300), 0, 0, 360, (200, 120, 170), -1)      # a wide pink tissue piece
    rng = np.random.default_rng(0)
    t, r = rng.uniform(0, 2 * np.pi, 800), np.sqrt(rng.uniform(0, 0.85, 800))
    xy = np.c_[450 + 400 * r * np.cos(t), 450 + 300 * r * np.sin(t)]              # spots on it, (x, y)
    image = SlideImage(img, 1.0, "he.png", "full resolution (scale 1)")
    check_spots_on_image(xy, image, 10.0)                                           # the right order passes
    with pytest.raises(InputError, match="x and y swapped"):
        check_spots_on_image(xy[:, ::-1], image, 10.0)                             # (row, column)


@pytest.mark.parametrize("options", [
    {}, {"planarconfig": "separate"}, {"tile": (64, 64)}, {"compression": "zlib"},
    {"compression": "lzw", "rowsperstrip": 16}, {"compression": "jpeg", "tile": (64, 64)},
], ids=["plain", "planar", "tiled", "zlib", "lzw", "jpeg-tiles"])
def test_tiff_read_as_opencv_reads_it(tmp_path, options):
    """A full-resolution TIFF is read by tifffile (memory-mapped when uncompressed, decoded into one
    array otherwise), pixel for pixel what OpenCV's reader gave."""
    import cv2
    import tifffile
    from data.readers import read_image

    rgb = (np.random.default_rng(0).random((150, 200, 3)) * 255).astype(np.uint8)
    path = tmp_path / "he.tif"
    data = rgb.transpose(2, 0, 1) if options.get("planarconfig") == "separate" else rgb
    tifffile.imwrite(path, data, photometric="rgb", **options)
    got = read_image(path)
    assert got.shape == (150, 200, 3) and got.dtype == np.uint8
    assert np.array_equal(got, cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_UNCHANGED), cv2.COLOR_BGR2RGB))
    if options.get("compression") != "jpeg":
        assert np.array_equal(got, rgb)


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="ru_maxrss is in kB on Linux only")
def test_uncompressed_tiff_is_memory_mapped_not_copied(tmp_path):
    """An uncompressed full-resolution TIFF is not read into memory: reading a 64 MB one raises the
    process's peak memory by far less than the image (OpenCV's TIFF reader held ~3.3x the image)."""
    import subprocess
    import sys
    import tifffile
    from pathlib import Path

    rgb = np.zeros((4096, 5461, 3), np.uint8)
    rgb[::7] = 200
    path = tmp_path / "big.tif"
    tifffile.imwrite(path, rgb, photometric="rgb")
    code = ("import resource, sys; sys.path.insert(0, sys.argv[2]); from data.readers import read_image; "
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; img = read_image(sys.argv[1]); "
            "assert img.shape == (4096, 5461, 3) and int(img[7, 3, 0]) == 200; "
            "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)")
    root = str(Path(__file__).resolve().parents[1])
    grown = int(subprocess.run([sys.executable, "-c", code, str(path), root], capture_output=True, text=True,
                               check=True).stdout.strip())
    assert grown < 0.25 * rgb.nbytes, f"reading the TIFF grew the peak by {grown / 1e6:.0f} MB"


def test_transparent_background_is_white_not_black(tmp_path):
    """An RGBA export whose transparent background holds black pixels: dropping the alpha channel made
    that background dark 'tissue'. PNG, TIFF and a tiled TIFF read by region now composite onto white,
    as OpenSlide's regions are; opaque pixels are unchanged."""
    import cv2
    import tifffile

    from data.readers import read_image
    from data.wsi import open_whole_slide

    rgba = np.zeros((128, 128, 4), np.uint8)
    rgba[:, :64, :3] = (180, 60, 120)
    rgba[:, :64, 3] = 255                                        # tissue, opaque; the rest transparent black
    rgba[:, 64, 3] = 128                                         # an antialiased edge: half way to white
    expect = np.full((128, 128, 3), 255, np.uint8)
    expect[:, :64] = (180, 60, 120)
    expect[:, 64] = 127                                           # black at 128/255 opacity over white
    cv2.imwrite(str(tmp_path / "he.png"), cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA))
    tifffile.imwrite(tmp_path / "he.tif", rgba, photometric="rgb", extrasamples=["unassalpha"])
    tifffile.imwrite(tmp_path / "tiled.tif", rgba, photometric="rgb", extrasamples=["unassalpha"], tile=(64, 64))
    for name in ("he.png", "he.tif", "tiled.tif"):
        assert np.array_equal(read_image(tmp_path / name), expect), name
    with open_whole_slide(tmp_path / "tiled.tif") as slide:
        assert np.array_equal(slide.read_region(32, 0, 64, 16), expect[:16, 32:96])


def test_unreadable_tiff_names_the_file(tmp_path):
    from data.readers import read_image

    bad = tmp_path / "broken.tif"
    bad.write_bytes(b"II*\x00" + b"\x00" * 20)
    with pytest.raises(InputError, match="broken.tif: cannot be read as an image"):
        read_image(bad)


def test_jpeg_too_large_to_decode_names_the_fix_and_the_fix_works(tmp_path, monkeypatch, capsys):
    """A JPEG over OpenCV's pixel limit (2**30 by default; lowered here) is refused naming the file and
    the converter; the converter's tiled TIFF then reads as the same image, block by block."""
    import cv2
    from data.readers import read_image
    from data.wsi import TiledPixels, main, open_fullres_pixels

    rng = np.random.default_rng(0)
    rgb = cv2.resize(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8), (1200, 900), interpolation=cv2.INTER_LINEAR)
    src = tmp_path / "scan.jpg"
    cv2.imwrite(str(src), rgb[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])
    monkeypatch.setenv("OPENCV_IO_MAX_IMAGE_PIXELS", "100000")
    with pytest.raises(InputError, match=r"scan.jpg: 1,200 x 900 px .* too large .*python -m data.wsi"):
        read_image(src)
    main([str(src), str(tmp_path / "scan.tif"), "--mpp", "0.5"])
    pixels = open_fullres_pixels(tmp_path / "scan.tif", stream_above_bytes=1)
    assert isinstance(pixels, TiledPixels) and pixels.shape == (900, 1200, 3)
    monkeypatch.delenv("OPENCV_IO_MAX_IMAGE_PIXELS")
    ref = read_image(src).astype(int)
    assert np.abs(pixels.region(0, 0, 1200, 900).astype(int) - ref).mean() < 2     # JPEG tiles at quality 90
    pixels.close()
    assert np.abs(read_image(tmp_path / "scan.tif").astype(int) - ref).mean() < 2
    # the converter's bad output paths: one line and status 2, and no partial file left anywhere
    for dst, said in [(tmp_path / "nofolder" / "x.tif", "no such folder"), (tmp_path, "a folder; give the output")]:
        with pytest.raises(SystemExit) as stop:
            main([str(src), str(dst)])
        assert stop.value.code == 2 and said in capsys.readouterr().err
    assert not list(tmp_path.parent.glob("*.part")) and not list(tmp_path.glob("*.part"))


def test_jpeg_decoded_once_with_opencvs_pixels(tmp_path):
    """JPEGs are decoded by imagecodecs into one array (OpenCV's decoder held ~2x the image): the pixels
    equal OpenCV's for RGB and grey files; a CMYK file falls back to OpenCV's conversion."""
    import cv2
    from PIL import Image

    from data.readers import read_image
    rng = np.random.default_rng(0)
    rgb = cv2.GaussianBlur((rng.random((120, 90, 3)) * 255).astype(np.uint8), (5, 5), 0)
    cv2.imwrite(str(tmp_path / "he.jpg"), rgb[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])
    ref = cv2.cvtColor(cv2.imread(str(tmp_path / "he.jpg")), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(read_image(tmp_path / "he.jpg"), ref)
    cv2.imwrite(str(tmp_path / "grey.jpeg"), rgb[..., 0])
    np.testing.assert_array_equal(read_image(tmp_path / "grey.jpeg")[..., 1],
                                  cv2.imread(str(tmp_path / "grey.jpeg"), cv2.IMREAD_UNCHANGED))
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg")
    np.testing.assert_array_equal(read_image(tmp_path / "cmyk.jpg"),
                                  cv2.cvtColor(cv2.imread(str(tmp_path / "cmyk.jpg")), cv2.COLOR_BGR2RGB))


def test_jpeg_orientation_tag_is_read_as_stored_with_a_warning(tmp_path, caplog):
    """A JPEG whose EXIF tag says "show me turned" (a phone photo, some viewers' exports) is read as
    stored, the frame spot positions are taken in, and the tag is named in a warning; the usual tag 1
    (as stored, her2st's JPEGs carry it) says nothing."""
    from PIL import Image

    from data.readers import read_image, warn_if_orientation_tag
    rgb = np.zeros((20, 30, 3), np.uint8)
    rgb[:, :10] = 200
    for tag in (6, 1):
        exif = Image.Exif()
        exif[0x0112] = tag
        Image.fromarray(rgb).save(tmp_path / f"tag{tag}.jpg", exif=exif, quality=95)
    with caplog.at_level("WARNING", logger="stpipe"):
        img = read_image(tmp_path / "tag6.jpg")
        assert warn_if_orientation_tag(tmp_path / "tag1.jpg") == 1
    assert img.shape == (20, 30, 3) and img[:, :10].mean() > 150          # not turned
    assert caplog.text.count("EXIF orientation tag (6)") == 1 and "rotated 90 degrees clockwise" in caplog.text
    assert warn_if_orientation_tag(tmp_path / "missing.png") == 0


def test_image_values_outside_0_255_are_not_clipped_silently():
    """16-bit values held in int32 (some tools' arrays, an .h5ad's uns image) are scaled as 16-bit, not
    clipped to white; a normalised float image (negative values, z-scores) is refused, not clipped to black."""
    from data.readers import as_rgb_uint8
    rgb = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 9
    np.testing.assert_array_equal(as_rgb_uint8(rgb.astype(np.int32) * 257, "x"), rgb)
    np.testing.assert_array_equal(as_rgb_uint8(rgb.astype(np.int16), "x"), rgb)
    np.testing.assert_array_equal(as_rgb_uint8(rgb / 255.0, "x"), rgb)
    with pytest.raises(InputError, match="pixel values run from -1.* normalised or standardised"):
        as_rgb_uint8((rgb - rgb.mean()) / rgb.std(), "x")


def test_16_bit_images_scale_by_their_bit_depth_and_grey_images_warn(synthetic_slice, tmp_path, caplog):
    """A 16-bit image is scaled by the depth its values use: 16 bits as before (v // 257), a 12-bit
    camera's image by 255 / 4095 (it read near-black), with a warning; a grey image runs, with a warning; an
    image of one flat colour is refused."""
    import cv2

    from data.readers import as_rgb_uint8, read_image
    from image_process.patches import choose_image

    rgb = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    full = rgb.astype(np.uint16) * 257
    np.testing.assert_array_equal(as_rgb_uint8(full, "x"), rgb)
    np.testing.assert_array_equal(as_rgb_uint8(full - 7, "x"), (full - 7) // 257)
    twelve = (rgb.astype(np.uint32) * 4095 // 255).astype(np.uint16)
    cv2.imwrite(str(tmp_path / "he12.png"), twelve[..., ::-1])
    with caplog.at_level("WARNING", logger="stpipe"):
        got = read_image(tmp_path / "he12.png")
    assert np.abs(got.astype(int) - rgb).max() <= 1 and "read as 12-bit" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="stpipe"):
        assert choose_image(read_slide({"path": synthetic_slice})) is not None
    assert "no colour" not in caplog.text
    grey = cv2.cvtColor(cv2.imread(str(synthetic_slice / "spatial" / "tissue_hires_image.png")), cv2.COLOR_BGR2GRAY)
    cv2.imwrite(str(tmp_path / "grey.png"), grey)
    a = read_slide({"path": synthetic_slice, "image": tmp_path / "grey.png"})
    with caplog.at_level("WARNING", logger="stpipe"):
        image = choose_image(a, "fullres")
    assert image.pixels.shape[2] == 3 and "no colour (greyscale)" in caplog.text
    # one flat colour shows no tissue: refused, where it ran with the greyscale warning and identical features
    cv2.imwrite(str(tmp_path / "blank.png"), np.full_like(grey, 245))
    with pytest.raises(InputError, match=r"blank.png: the image is one flat colour \(RGB 245, 245, 245.*image.use=none"):
        choose_image(read_slide({"path": synthetic_slice, "image": tmp_path / "blank.png"}), "fullres")


def test_truncated_images_are_refused_not_decoded_grey(tmp_path):
    """A JPEG cut short (an interrupted copy) decoded without an error, its missing part flat grey;
    it is refused now, baseline and progressive alike, while complete files (with trailing bytes too)
    read as before. A tiled TIFF cut short stops with one line naming the file when its tiles are read."""
    import cv2
    import tifffile
    from PIL import Image

    from data.readers import read_image
    from data.wsi import open_whole_slide

    rng = np.random.default_rng(0)
    img = cv2.GaussianBlur(rng.integers(0, 256, (400, 500, 3), dtype=np.uint8), (9, 9), 3)
    files = {"baseline.jpg": lambda p: cv2.imwrite(str(p), img[..., ::-1]),
             "progressive.jpg": lambda p: Image.fromarray(img).save(p, progressive=True, quality=90)}
    for name, write in files.items():
        path = tmp_path / name
        write(path)
        whole = read_image(path)
        data = path.read_bytes()
        (tmp_path / "tail.jpg").write_bytes(data + b"\0" * 64)           # bytes after the end marker: fine
        np.testing.assert_array_equal(read_image(tmp_path / "tail.jpg"), whole)
        for keep in (0.5, 0.9, 0.99):
            cut = tmp_path / f"cut_{name}"
            cut.write_bytes(data[:int(len(data) * keep)])
            with pytest.raises(InputError, match="truncated"):
                read_image(cut)
    tif = tmp_path / "tiles.tif"
    tifffile.imwrite(tif, np.tile(img, (4, 4, 1)), photometric="rgb", tile=(128, 128), compression="zlib")
    (tmp_path / "cut.tif").write_bytes(tif.read_bytes()[: tif.stat().st_size // 2])
    with pytest.raises(InputError, match=r"cut.tif: the file ends at byte [\d,]+ but its tiles reach .* truncated"):
        open_whole_slide(tmp_path / "cut.tif", mpp=0.5)          # told when opened, not after a stage's first tiles


def test_damaged_tiled_tiff_is_one_line_and_a_quiet_exit(tmp_path):
    """A tiled TIFF whose tiles cannot be decoded (damaged in place, its length intact) stops with one line naming
    the file; zarr's other tile reads, left running, printed hundreds of lines of asyncio warnings as the process
    ended."""
    import subprocess
    import sys
    from pathlib import Path

    import tifffile
    from conftest import ZARR_IMPORTED_QUIETLY

    rng = np.random.default_rng(0)
    tif = tmp_path / "damaged.tif"
    tifffile.imwrite(tif, rng.integers(0, 256, (1600, 2000, 3), dtype=np.uint8), photometric="rgb", tile=(128, 128),
                     compression="zlib")
    data = bytearray(tif.read_bytes())
    with tifffile.TiffFile(tif) as tf:
        tiles = list(zip(tf.pages[0].dataoffsets, tf.pages[0].databytecounts))
    for offset, _ in tiles[3:40]:
        data[offset + 10:offset + 200] = b"\x55" * 190
    tif.write_bytes(bytes(data))
    code = ("import sys; from data.errors import InputError; from data.wsi import open_whole_slide\n"
            "slide = open_whole_slide(sys.argv[1])\n"
            "try:\n    slide.read_region(0, 0, 2000, 1600)\n"
            "except InputError as exc:\n    print(exc)\n    slide.close()\n    sys.exit(2)")
    run = subprocess.run([sys.executable, "-c", ZARR_IMPORTED_QUIETLY + code, str(tif)], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1])
    assert run.returncode == 2 and "damaged.tif: its pixels near" in run.stdout and "truncated or damaged" in run.stdout
    assert run.stderr.strip() == ""


def test_truncated_count_matrix_is_one_line(slice_copy):
    """A count matrix cut short (matrix.mtx.gz, an .h5) ended in an EOFError / OSError traceback from
    gzip or h5py; it is now one line naming the file. A positions file cut short says it may be."""
    import anndata as ad

    from data.readers import read_visium

    mex = slice_copy / "filtered_feature_bc_matrix" / "matrix.mtx.gz"
    data = mex.read_bytes()
    mex.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"filtered_feature_bc_matrix/matrix.mtx.gz: cannot be read as a 10x count matrix .*copy it again"):
        read_visium(slice_copy)                     # the MEX file at fault, not only its folder
    mex.write_bytes(data)
    a = read_visium(slice_copy)
    h5 = slice_copy / "filtered_feature_bc_matrix.h5"
    ad.AnnData(a.X).write_h5ad(h5)          # any HDF5 file, then cut short
    h5.write_bytes(h5.read_bytes()[:400])
    with pytest.raises(InputError, match=r"filtered_feature_bc_matrix.h5: cannot be read as a 10x count matrix"):
        read_visium(slice_copy)
    h5.unlink()
    pos = next((slice_copy / "spatial").glob("tissue_positions*.csv"))
    lines = pos.read_text().splitlines(keepends=True)
    pos.write_text("".join(lines[: len(lines) // 3]))      # cut at a line's end (mid-line: an empty value)
    with pytest.raises(InputError, match="is it complete, not cut short"):
        read_visium(slice_copy)


def _as_geo_files(slice_folder, flat, prefix, h5=False):
    """The slice's files as GEO stores them: flat in ``flat``, named ``<prefix>_<Space Ranger name>``, the
    positions, scale factors and images gzipped (with ``h5``, the counts as one .h5 instead of MEX files)."""
    import shutil
    flat.mkdir(exist_ok=True)
    if h5:
        a = read_slide({"path": slice_folder})
        write_10x_h5(flat / f"{prefix}_filtered_feature_bc_matrix.h5", a.X, a.obs_names, a.var_names)
    else:
        for f in (slice_folder / "filtered_feature_bc_matrix").iterdir():
            shutil.copyfile(f, flat / f"{prefix}_{f.name}")
    for f in (slice_folder / "spatial").iterdir():
        with open(f, "rb") as fin, gzip.open(flat / f"{prefix}_{f.name}.gz", "wb") as fout:
            fout.write(fin.read())


def test_geo_files_are_read_in_place_or_laid_out(synthetic_slice, tmp_path):
    """A folder of GEO-named files (prefixed, gzipped, flat; an unpacked GSE_RAW.tar holds several samples)
    was refused as "no count matrix". It now reads as the Space Ranger folder it came from, data.name
    picking one of several samples; python -m data.geo_layout writes one sample as such a folder."""
    from data.geo_layout import main as geo_layout

    from image_process.patches import choose_image

    def same_slide(a):
        assert a.obs_names.equals(ref.obs_names) and a.var_names.equals(ref.var_names)
        assert (a.X != ref.X).nnz == 0
        np.testing.assert_array_equal(a.obsm[keys.SPATIAL], ref.obsm[keys.SPATIAL])
        assert keys.scalefactors(a) == keys.scalefactors(ref)
        np.testing.assert_array_equal(choose_image(a).pixels, choose_image(ref).pixels)

    ref = read_slide({"path": synthetic_slice})
    flat = tmp_path / "GSE000_RAW"
    _as_geo_files(synthetic_slice, flat, "GSM0001_sliceA")
    a = read_slide({"path": flat})
    same_slide(a)
    assert keys.library_id(a) == "GSM0001_sliceA"
    assert a.uns[keys.SPATIAL_UNS]["GSM0001_sliceA"]["metadata"]["source"] == str(flat)
    assert keys.library_id(read_slide({"path": flat, "name": "A"})) == "A"     # one sample: a name only names it
    _as_geo_files(synthetic_slice, flat, "GSM0002_sliceB", h5=True)
    with pytest.raises(InputError, match=r"holds 2 Visium samples .* name one with data.name"):
        read_slide({"path": flat})
    same_slide(read_slide({"path": flat, "name": "sliceB"}))
    from pipeline.sections import check_disjoint           # two samples of one folder: two stage-5 sections,
    check_disjoint([{"path": str(flat), "name": "sliceA"}], [{"path": str(flat), "name": "sliceB"}])
    with pytest.raises(InputError, match=r"also a training section \(.*GSE000_RAW, GSM0001_sliceA\)"):
        check_disjoint([{"path": str(flat), "name": "sliceA"}], [{"path": str(flat), "name": "GSM0001"}])  # one by two names
    with pytest.raises(SystemExit) as code:
        geo_layout([str(flat), str(tmp_path / "out")])          # which sample? one line, exit status 2
    assert code.value.code == 2
    for sample in ("sliceA", "sliceB"):
        geo_layout([str(flat), str(tmp_path / sample), "--sample", sample])
        same_slide(read_slide({"path": tmp_path / sample}))
    with pytest.raises(SystemExit):                                  # never overwritten
        geo_layout([str(flat), str(tmp_path / "sliceA"), "--sample", "sliceA"])
    # a bad file is named as the user has it, not by its temporary copy
    with gzip.open(flat / "GSM0001_sliceA_scalefactors_json.json.gz", "wt") as f:
        f.write("{'spot_diameter_fullres': 89,")
    with pytest.raises(InputError, match=rf"^{flat / 'GSM0001_sliceA_scalefactors_json.json.gz'}: not valid JSON"):
        read_slide({"path": flat, "name": "sliceA"})
    barcodes = flat / "GSM0001_sliceA_barcodes.tsv.gz"                # a MEX file cut short: the user's file, not
    barcodes.write_bytes(barcodes.read_bytes()[:20])                  # a filtered_feature_bc_matrix/ that isn't there
    with pytest.raises(InputError, match=rf"^{barcodes}: cannot be read as a 10x count matrix"):
        read_slide({"path": flat, "name": "sliceA"})


def test_count_matrix_named_by_the_dataset_beside_spatial(slice_copy):
    """10x's dataset pages give V1_<dataset>_filtered_feature_bc_matrix.h5 beside the spatial/ folder (scanpy
    reads it with count_file=...): it was refused as "no count matrix"."""
    import shutil
    ref = read_slide({"path": slice_copy})
    shutil.rmtree(slice_copy / "filtered_feature_bc_matrix")
    write_10x_h5(slice_copy / "V1_Demo_filtered_feature_bc_matrix.h5", ref.X, ref.obs_names, ref.var_names)
    a = read_slide({"path": slice_copy})
    assert a.obs_names.equals(ref.obs_names) and (a.X != ref.X).nnz == 0
    np.testing.assert_array_equal(a.obsm[keys.SPATIAL], ref.obsm[keys.SPATIAL])
    write_10x_h5(slice_copy / "V1_Other_filtered_feature_bc_matrix.h5", ref.X, ref.obs_names, ref.var_names)
    with pytest.raises(InputError, match="2 count matrices .*V1_Demo_filtered_feature_bc_matrix.h5, V1_Other"):
        read_slide({"path": slice_copy})
    (slice_copy / "V1_Other_filtered_feature_bc_matrix.h5").unlink()
    import tarfile
    with tarfile.open(slice_copy / "V1_Demo_spatial.tar.gz", "w:gz") as tar:   # downloaded, not unpacked
        tar.add(slice_copy / "spatial", arcname="spatial")
    shutil.rmtree(slice_copy / "spatial")
    with pytest.raises(InputError, match=r"no spot positions. .* V1_Demo_spatial.tar.gz is here: unpack it"):
        read_slide({"path": slice_copy})


@pytest.mark.filterwarnings("ignore:Writing zarr v2 data:UserWarning")     # anndata's own, writing the test file
def test_anndata_zarr_is_read(synthetic_slice, tmp_path):
    """An AnnData written with write_zarr (a folder) was read as a Space Ranger folder ("no count matrix");
    it now reads as its .h5ad does (a SpatialData store: test_spatialdata_store.py)."""
    from image_process.patches import choose_image

    from data.readers import _anndata_reads_zarr3

    if _anndata_reads_zarr3():
        ref = read_slide({"path": synthetic_slice})
        out = _scanpy_style(ref, "A", float_images=False)
        out.write_h5ad(tmp_path / "s.h5ad")
        out.write_zarr(tmp_path / "s.zarr")
        a, b = read_slide({"path": tmp_path / "s.zarr"}), read_slide({"path": tmp_path / "s.h5ad"})
        assert a.obs_names.equals(b.obs_names) and (a.X != b.X).nnz == 0 and keys.library_id(a) == "A"
        np.testing.assert_array_equal(a.obsm[keys.SPATIAL], b.obsm[keys.SPATIAL])
        np.testing.assert_array_equal(choose_image(a).pixels, choose_image(b).pixels)
    else:                                       # anndata < 0.12 cannot read zarr 3: the fix, not its traceback
        for group in ("obs", "var", "X"):
            (tmp_path / "s.zarr" / group).mkdir(parents=True)
        (tmp_path / "s.zarr" / ".zattrs").write_text('{"encoding-type": "anndata"}')
        with pytest.raises(InputError, match="s.zarr: an AnnData .zarr folder, which anndata .* anndata 0.12 or newer"):
            read_slide({"path": tmp_path / "s.zarr"})


def test_a_gzipped_image_names_the_fix(synthetic_slice, tmp_path):
    """A gzip-compressed image (GEO serves them so) said only "cannot be read as an image"."""
    from data.readers import read_image
    gz = tmp_path / "he.png.gz"
    with open(synthetic_slice / "spatial" / "tissue_hires_image.png", "rb") as fin, gzip.open(gz, "wb") as fout:
        fout.write(fin.read())
    from data.wsi import open_whole_slide
    for read in (lambda: read_image(gz), lambda: read_slide({"path": synthetic_slice, "image": gz}),
                 lambda: open_whole_slide(gz)):
        with pytest.raises(InputError, match=rf"he.png.gz: the image is gzip-compressed .* gunzip -c {gz} > {tmp_path / 'he.png'}"):
            read()
