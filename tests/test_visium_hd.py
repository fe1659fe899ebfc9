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
    return make_synthetic_visium_hd(tmp_path_factory.mktemp("hd") / "outs", n_bins16=40, n_genes=200)


def test_a_whole_run_needs_a_bin_size_and_lists_them(hd_run):
    with pytest.raises(InputError, match=r"8 um \([\d,]+ bins under tissue\), 16 um .*data\.bin_um") as err:
        read_slide({"path": hd_run})
    assert str(hd_run) in str(err.value)
    for bad, msg in [(12, "nor a whole multiple"), ("x", "whole number"), (-16, "whole number"),
                     (1600, r"data.bin_um=1600: no block of 100 x 100 bins of 16 um has 50% of its bins under tissue")]:
        with pytest.raises(InputError, match=msg):
            read_slide({"path": hd_run, "bin_um": bad})


def test_cell_segmentation_outputs_point_to_the_bins(hd_run, tmp_path):
    """Space Ranger 4's segmented_outputs/ (cells, filtered_feature_cell_matrix.h5) is not read as spots: the
    error names the run's outs/ and data.bin_um instead of only a missing filtered_feature_bc_matrix.h5."""
    outs = tmp_path / "outs"
    shutil.copytree(hd_run, outs)
    (outs / "segmented_outputs" / "spatial").mkdir(parents=True)
    (outs / "segmented_outputs" / "filtered_feature_cell_matrix.h5").write_bytes(b"")
    with pytest.raises(InputError, match=rf"cell segmentation .*set data.path={re.escape(str(outs))} and data.bin_um"):
        read_slide({"path": outs / "segmented_outputs"})
    assert read_slide({"path": outs, "bin_um": 16}).n_obs > 0          # the run beside it still reads


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
