"""Visium HD runs (square bins, parquet positions): picking a bin size, summing bins, and the stages on them.

The folders are synthetic (data.synthetic.make_synthetic_visium_hd, laid out as Space Ranger 3 writes
binned_outputs/); no real Visium HD run is in ../shared/data."""
import json
import re
import shutil

import numpy as np
import pandas as pd
import pytest

from data import keys
from data.errors import InputError
from data.readers import read_slide


@pytest.fixture(scope="module")
def hd_run(tmp_path_factory):
    from data.synthetic import make_synthetic_visium_hd
    return make_synthetic_visium_hd(tmp_path_factory.mktemp("hd") / "outs", n_bins16=40, n_genes=200, cells=True)


def test_a_whole_run_needs_a_bin_size_and_lists_them(hd_run):
    with pytest.raises(InputError, match=r"8 um \([\d,]+ bins under tissue\), 16 um .*data\.bin_um") as err:
        read_slide({"path": hd_run})
    assert str(hd_run) in str(err.value)
    for bad, msg in [(12, "nor a whole multiple"), ("x", "whole number"), (-16, "whole number"),
                     (1600, r"data.bin_um=1600: no block of 100 x 100 bins of 16 um has 50% of its bins under tissue")]:
        with pytest.raises(InputError, match=msg):
            read_slide({"path": hd_run, "bin_um": bad})


def test_cells_of_space_rangers_segmentation_are_read_as_spots(hd_run, tmp_path):
    """Space Ranger 4's segmented_outputs/: one spot per cell of filtered_feature_cell_matrix.h5, at its outline's
    centroid (cell_segmentations.geojson, full-resolution px), a patch of the median cell's diameter; a whole run
    without data.bin_um names this choice beside the bin sizes."""
    from pipeline.expression_prediction import spot_size_um

    seg = hd_run / "segmented_outputs"
    a = read_slide({"path": seg})
    want = pd.read_csv(hd_run / "cell_centroids.csv", index_col=0)
    assert a.n_obs == len(want) and a.obs_names[0] == "cellid_000000001-1"
    np.testing.assert_allclose(a.obsm[keys.SPATIAL], want.loc[a.obs_names].to_numpy(), atol=2e-3)  # 3 decimals kept
    sf = keys.scalefactors(a)
    cell_px = 0.3 * 12 / sf["microns_per_pixel"]       # the generator's mean radius
    assert a.obs[keys.CELL_AREA].median() == pytest.approx(np.pi * cell_px ** 2, rel=0.1)
    assert sf["spot_diameter_fullres"] == pytest.approx(2 * np.sqrt(a.obs[keys.CELL_AREA].median() / np.pi), rel=0.01)
    assert "bin_size_um" not in sf and keys.ARRAY_ROW not in a.obs          # cells lie on no array
    assert keys.scalefactors(a)["tissue_hires_scalef"] and a.uns[keys.SPATIAL_UNS][keys.library_id(a)]["images"]
    diam_um, spacing_um = spot_size_um(a)                  # stage 5's platform: cells, not 55 um spots
    assert diam_um == pytest.approx(sf["spot_diameter_fullres"] * sf["microns_per_pixel"]) and 5 < spacing_um < 13
    with pytest.raises(InputError, match=rf"read Space Ranger's cells .*data.path={re.escape(str(seg))}"):
        read_slide({"path": hd_run})
    with pytest.raises(InputError, match="this is its cell segmentation .*Unset data.bin_um"):
        read_slide({"path": seg, "bin_um": 16})

    # other ways Space Ranger writes the outlines: the annotated file, cell ids as barcodes, MultiPolygons
    other = tmp_path / "outs" / "segmented_outputs"
    shutil.copytree(seg, other)
    geo = json.loads((other / "cell_segmentations.geojson").read_text())
    first = geo["features"][0]
    ring = np.asarray(first["geometry"]["coordinates"][0])
    first["geometry"] = {"type": "MultiPolygon", "coordinates": [[ring.tolist()], [(ring[::-1] + [0, 30]).tolist()]]}
    for f in geo["features"]:
        f["properties"]["cell_id"] = f"cellid_{f['properties']['cell_id']:09d}-1"
    geo["features"][1]["geometry"]["coordinates"] = [[[10.0, 20.0], [10.0, 20.0], [10.0, 20.0]]]   # no area
    (other / "cell_segmentations.geojson").unlink()
    (other / "graphclust_annotated_cell_segmentations.geojson").write_text(json.dumps(geo))
    b = read_slide({"path": other})
    np.testing.assert_allclose(b.obsm[keys.SPATIAL][2:], a.obsm[keys.SPATIAL][2:])
    assert list(b.obsm[keys.SPATIAL][1]) == [10.0, 20.0] and b.obs[keys.CELL_AREA].iloc[1] == 0
    np.testing.assert_allclose(b.obsm[keys.SPATIAL][0], a.obsm[keys.SPATIAL][0] + [0, 15], atol=0.5)  # two equal parts
    assert b.obs[keys.CELL_AREA].iloc[0] == pytest.approx(2 * a.obs[keys.CELL_AREA].iloc[0])


def test_bad_cell_segmentation_is_one_clear_error(hd_run, tmp_path):
    seg = tmp_path / "segmented_outputs"
    shutil.copytree(hd_run / "segmented_outputs", seg)
    geo_file = seg / "cell_segmentations.geojson"
    geo = json.loads(geo_file.read_text())
    geo_file.write_text(json.dumps({**geo, "features": geo["features"][5:]}))       # another run's outlines
    with pytest.raises(InputError, match=r"filtered_feature_cell_matrix.h5: 5 of \d+ cells \(e.g. 'cellid_000000001-1'\) "
                                         r"have no outline in .*cell_segmentations.geojson"):
        read_slide({"path": seg})
    point = dict(geo["features"][0], geometry={"type": "Point", "coordinates": [1.0, 2.0]})
    geo_file.write_text(json.dumps({**geo, "features": [point] + geo["features"][1:]}))
    with pytest.raises(InputError, match=r"cell 1 has no Polygon or MultiPolygon outline \(geometry type 'Point'\)"):
        read_slide({"path": seg})
    geo_file.write_text(json.dumps(geo)[:5000])
    with pytest.raises(InputError, match="cell_segmentations.geojson: not valid GeoJSON"):
        read_slide({"path": seg})
    geo_file.unlink()
    with pytest.raises(InputError, match=r"segmented_outputs: the cells' count matrix is here but not their outlines"):
        read_slide({"path": seg})


def test_bin_levels_as_space_ranger_writes_them(hd_run):
    a = read_slide({"path": hd_run, "bin_um": 16})
    sf = keys.scalefactors(a)
    assert sf["bin_size_um"] == 16 and sf["spot_diameter_fullres"] == pytest.approx(16 / sf["microns_per_pixel"])
    assert all(n.startswith("s_016um_") for n in a.obs_names)
    assert keys.library_id(a) == "outs"
    # the same level from binned_outputs/ or from its own folder
    for path in (hd_run / "binned_outputs", hd_run / "binned_outputs" / "square_016um"):
        b = read_slide({"path": path, "bin_um": 16})
        assert list(b.obs_names) == list(a.obs_names)
    level_alone = read_slide({"path": hd_run / "binned_outputs" / "square_016um"})
    assert level_alone.n_obs == a.n_obs
    a8 = read_slide({"path": hd_run, "bin_um": 8})
    assert a8.n_obs > 3 * a.n_obs and keys.scalefactors(a8)["bin_size_um"] == 8


def test_summed_bins_hold_the_sums_at_the_block_centres(hd_run):
    a16 = read_slide({"path": hd_run, "bin_um": 16})
    a32 = read_slide({"path": hd_run, "bin_um": 32})
    assert keys.scalefactors(a32)["bin_size_um"] == 32
    assert keys.scalefactors(a32)["spot_diameter_fullres"] == pytest.approx(2 * keys.scalefactors(a16)["spot_diameter_fullres"])
    block = pd.Series(list(zip(a16.obs[keys.ARRAY_ROW] // 2, a16.obs[keys.ARRAY_COL] // 2)), index=a16.obs_names)
    sizes = block.value_counts()
    assert sizes[sizes >= 2].size == a32.n_obs               # blocks with >= 2 of 4 bins under tissue kept
    X16 = a16.X.toarray()
    for i in range(0, a32.n_obs, 7):
        r, c = int(a32.obs[keys.ARRAY_ROW].iloc[i]), int(a32.obs[keys.ARRAY_COL].iloc[i])
        members = (block == (r, c)).to_numpy()
        assert a32.obs_names[i] == f"s_032um_{r:05d}_{c:05d}-1"
        np.testing.assert_array_equal(a32.X[i].toarray().ravel(), X16[members].sum(0))
        if members.sum() == 4:      # a full block sits at the mean of its bins, a partial one on the lattice too
            np.testing.assert_allclose(a32.obsm[keys.SPATIAL][i], a16.obsm[keys.SPATIAL][members].mean(0), atol=1e-6)
    # every block centre on one lattice: an affine map of the block indices
    A = np.c_[a32.obs[[keys.ARRAY_COL, keys.ARRAY_ROW]].to_numpy(float), np.ones(a32.n_obs)]
    fit = A @ np.linalg.lstsq(A, a32.obsm[keys.SPATIAL], rcond=None)[0]
    assert np.abs(fit - a32.obsm[keys.SPATIAL]).max() < 1e-6
    # 24 um = 3 x 3 bins of 8 um (the largest size that divides it)
    a24 = read_slide({"path": hd_run, "bin_um": 24})
    assert keys.scalefactors(a24)["bin_size_um"] == 24 and a24.obs_names[0].startswith("s_024um_")


def test_run_folder_images_in_outs_spatial_and_bad_positions(hd_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(hd_run, run / "outs")
    level = run / "outs" / "binned_outputs" / "square_016um"
    (run / "outs" / "spatial").mkdir()
    for name in ("tissue_hires_image.png", "tissue_lowres_image.png"):     # images only in outs/spatial/
        shutil.move(level / "spatial" / name, run / "outs" / "spatial" / name)
    a = read_slide({"path": run, "bin_um": 16})
    assert set(a.uns["spatial"][keys.library_id(a)]["images"]) == {"hires", "lowres"}
    pos = pd.read_parquet(level / "spatial" / "tissue_positions.parquet")
    pos.rename(columns={"pxl_row_in_fullres": "y"}).to_parquet(level / "spatial" / "tissue_positions.parquet")
    with pytest.raises(InputError, match="tissue_positions.parquet: expected the columns"):
        read_slide({"path": run, "bin_um": 16})
    pos[pos.barcode != a.obs_names[0]].to_parquet(level / "spatial" / "tissue_positions.parquet")
    with pytest.raises(InputError, match="are not in .*tissue_positions.parquet"):
        read_slide({"path": run, "bin_um": 16})
    data = (level / "spatial" / "tissue_positions.parquet").read_bytes()    # cut short: was pyarrow's traceback
    (level / "spatial" / "tissue_positions.parquet").write_bytes(data[:len(data) // 2])
    with pytest.raises(InputError, match="tissue_positions.parquet: cannot be read as Space Ranger's spot positions "
                                         r"table \(.*\); a file cut short"):
        read_slide({"path": run, "bin_um": 16})


def test_bin_um_only_for_hd_folders(hd_run, tmp_path):
    a = read_slide({"path": hd_run, "bin_um": 32})
    a.write_h5ad(tmp_path / "hd.h5ad")
    with pytest.raises(InputError, match="Visium HD Space Ranger folder only"):
        read_slide({"path": tmp_path / "hd.h5ad", "bin_um": 32})
    b = read_slide({"path": tmp_path / "hd.h5ad"})      # the summed bins saved and read back: the same slide
    assert list(b.obs_names) == list(a.obs_names) and keys.scalefactors(b)["bin_size_um"] == 32


def test_platform_spot_size_of_a_bin(hd_run):
    from pipeline.expression_prediction import spot_size_um
    assert spot_size_um(read_slide({"path": hd_run, "bin_um": 48})) == (48.0, 48.0)


def test_stages_1_to_3_find_the_domains_on_summed_bins(hd_run, tmp_path):
    """run_dlpfc.py on a Visium HD run with 32 um bins (2 x 2 bins of 16 um), H&E included."""
    import subprocess
    import sys

    from conftest import ROOT
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(ROOT / "run_dlpfc.py"), "--out", str(out),
                        "--set", f"data.path={hd_run}", "--set", "data.bin_um=32",
                        "--set", f"data.truth={hd_run / 'truth_032um.txt'}", "--set", "model.n_clusters=5"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["n_spots"] == read_slide({"path": hd_run, "bin_um": 32}).n_obs
    assert m["ari"] > 0.6


def test_stages_1_to_3_find_the_domains_of_cells(hd_run):
    """Stages 1-3 (the in-memory API, as the scripts run them) on Space Ranger's cells, H&E included."""
    from pipeline import api
    from sklearn.metrics import adjusted_rand_score

    cells = api.read(hd_run / "segmented_outputs", truth=hd_run / "truth_cells.txt")
    out = api.domains(cells, 5, settings={"model.epochs": 60}, device="cpu", progress=False)
    assert out.obsm[keys.IMAGE_FEATURES].shape[1] > 0
    assert adjusted_rand_score(out.obs[keys.TRUTH], out.obs[keys.DOMAIN]) > 0.6
    with pytest.raises(InputError, match=r"Cells \(Space Ranger's segmented_outputs/.* super-resolve its bins"):
        api.super_resolve(cells, device="cpu")             # stage 4 trains on spots pooled 2 x 2 on the array


def test_scale_factors_without_bin_size_or_diameter(hd_run, tmp_path):
    """Bin size from the level's folder name and bin side in px from the array when the scale factors
    lack them, so that every stage still sees a square bin of the right size."""
    level = tmp_path / "square_016um"
    shutil.copytree(hd_run / "binned_outputs" / "square_016um", level)
    sf_path = level / "spatial" / "scalefactors_json.json"
    sf = json.loads(sf_path.read_text())
    full = dict(sf)
    for key in ("bin_size_um", "spot_diameter_fullres"):
        sf.pop(key)
    sf_path.write_text(json.dumps(sf))
    a = read_slide({"path": level, "bin_um": 32})
    got = keys.scalefactors(a)
    assert got["bin_size_um"] == 32 and a.obs_names[0].startswith("s_032um_")
    assert got["spot_diameter_fullres"] == pytest.approx(2 * full["spot_diameter_fullres"], rel=1e-6)
