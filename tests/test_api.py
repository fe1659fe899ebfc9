"""The in-memory API (pipeline/api.py) gives what the stage scripts write, and refuses bad input as they do."""
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data import keys  # noqa: E402
from data.errors import InputError  # noqa: E402
from pipeline import api  # noqa: E402
from pipeline.config import load_config  # noqa: E402

QUICK = {"preprocess.n_top_genes": None, "model.epochs": 60, "model.n_clusters": 5, "plot.umap": True}


def test_domains_in_memory_equal_the_scripts_outputs(tmp_path, synthetic_slice):
    import anndata as ad

    from pipeline.runner import run_stages
    cfg = load_config(None, [f"data.path={synthetic_slice}", f"data.truth={synthetic_slice / 'truth.txt'}",
                             *(f"{k}={'null' if v is None else v}" for k, v in QUICK.items()), "plot.figures=false"])
    run_stages(cfg, tmp_path, "cpu", progress=False)
    want = ad.read_h5ad(tmp_path / "03_domains.h5ad")

    slide = api.read(synthetic_slice, truth=synthetic_slice / "truth.txt")
    before = slide.copy()
    got = api.domains(slide, settings=QUICK, device="cpu", progress=False)
    assert list(got.var_names) == list(want.var_names) and list(got.obs_names) == list(want.obs_names)
    np.testing.assert_array_equal(got.obsm[keys.IMAGE_FEATURES], want.obsm[keys.IMAGE_FEATURES])
    np.testing.assert_array_equal(got.layers[keys.ENHANCED], want.layers[keys.ENHANCED])
    np.testing.assert_array_equal(got.obsm[keys.EMBEDDING], want.obsm[keys.EMBEDDING])
    np.testing.assert_array_equal(got.obsm[keys.UMAP], want.obsm[keys.UMAP])      # seeded: the same view
    np.testing.assert_array_equal(got.layers[keys.DENOISED], want.layers[keys.DENOISED])
    assert (got.obs[keys.DOMAIN].astype(str) == want.obs[keys.DOMAIN].astype(str)).all()
    assert list(got.uns["domain_colors"]) == list(want.uns["domain_colors"])      # the figure's colours
    np.testing.assert_array_equal(got.uns[keys.PAGA]["connectivities"].toarray(),      # the domains' PAGA
                                  want.uns[keys.PAGA]["connectivities"].toarray())
    from pipeline.domains import marker_table
    pd.testing.assert_frame_equal(marker_table(got), marker_table(want))          # the domains' markers
    assert json.loads((tmp_path / "metrics.json").read_text())["n_clusters"] == got.uns[keys.MSTGCN]["n_clusters"]
    # the AnnData given is left as it was; the result is written as an .h5ad as it is
    named_layers = lambda a: set(a.layers) - {None}      # noqa: E731  (anndata >= 0.13 lists X as layers[None])
    assert set(slide.obsm) == set(before.obsm) and named_layers(slide) == named_layers(before) == set()
    assert (slide.X != before.X).nnz == 0
    got.write_h5ad(tmp_path / "api.h5ad")
    # stages one at a time, each from the previous one's result, give the same
    step = api.enhance(api.image_features(slide, settings=QUICK, device="cpu"), settings=QUICK, device="cpu")
    np.testing.assert_array_equal(step.layers[keys.ENHANCED], want.layers[keys.ENHANCED])
    again = api.domains(step, settings=QUICK, device="cpu", progress=False)
    np.testing.assert_array_equal(again.obsm[keys.EMBEDDING], want.obsm[keys.EMBEDDING])
    # another number of domains from the saved embedding: what retraining with it gives, without training
    three = api.recluster(got, 3, settings={**QUICK, "cluster.sweep": [2, 3]})
    full = api.domains(step, 3, settings=QUICK, device="cpu", progress=False)
    assert (three.obs[keys.DOMAIN].astype(str) == full.obs[keys.DOMAIN].astype(str)).all()
    assert three.obs[keys.domain_for_k(3)].astype(str).equals(three.obs[keys.DOMAIN].astype(str))   # cluster.sweep
    assert three.obs[keys.domain_for_k(2)].nunique() == 2 and keys.domain_for_k(2) not in got.obs
    assert three.uns[keys.MSTGCN]["n_clusters"] == 3
    assert len(three.uns["domain_colors"]) == three.obs[keys.DOMAIN].nunique()
    np.testing.assert_array_equal(three.obsm[keys.EMBEDDING], got.obsm[keys.EMBEDDING])
    pd.testing.assert_frame_equal(marker_table(three), marker_table(full))
    assert got.uns[keys.MSTGCN]["n_clusters"] != 3                                # the given AnnData unchanged
    with pytest.raises(InputError, match="not a stage-3 result"):
        api.recluster(slide, 3)
    # a stage-2 result made with other settings is not built on silently
    with pytest.raises(InputError, match="enhance.alpha: 0.5 then, 0.2 now"):
        api.domains(step, settings={**QUICK, "enhance.alpha": 0.2})
    with pytest.raises(InputError, match="already enhanced"):
        api.enhance(step)
    other = api.image_features(slide, settings={"image.options": {"scales": [1, 2]}}, device="cpu")
    redone = api.enhance(other, settings=QUICK, device="cpu")     # other image settings than these: stage 1 redone
    np.testing.assert_array_equal(redone.obsm[keys.IMAGE_FEATURES], want.obsm[keys.IMAGE_FEATURES])


def test_an_anndata_read_by_scanpy_is_prepared_as_the_readers_read_the_folder(slice_copy):
    """scanpy's read_visium keeps images as floats in [0, 1] and the matrix with gene ids: prepared, they
    give the folder's own image features."""
    import h5py
    import scanpy as sc

    from data.synthetic import write_10x_h5
    if not hasattr(sc, "read_visium"):
        pytest.skip("this scanpy has no read_visium")
    slide = api.read(slice_copy)
    write_10x_h5(slice_copy / "filtered_feature_bc_matrix.h5", slide.X, list(slide.obs_names), list(slide.var_names))
    with h5py.File(slice_copy / "filtered_feature_bc_matrix.h5", "a") as f:   # what read_visium wants of Space Ranger's
        f.attrs["library_ids"] = np.array([b"slice"])
        f.attrs["chemistry_description"], f.attrs["software_version"] = "synthetic", "synthetic"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # read_visium's deprecation in newer scanpy
        theirs = sc.read_visium(slice_copy)
    assert theirs.uns["spatial"]["slice"]["images"]["hires"].dtype.kind == "f"
    got = api.image_features(theirs, device="cpu")
    want = api.image_features(slide, device="cpu")
    assert list(got.obs_names) == list(want.obs_names)
    np.testing.assert_array_equal(got.obsm[keys.IMAGE_FEATURES], want.obsm[keys.IMAGE_FEATURES])
    assert got.uns[keys.IMAGE_FEATURES_INFO]["image"] == "uns['spatial']['slice']['images']['hires']"
    assert want.uns[keys.IMAGE_FEATURES_INFO]["image"].endswith("tissue_hires_image.png")


def test_bad_settings_and_input_are_refused_with_the_scripts_messages(synthetic_slice):
    slide = api.read(synthetic_slice)
    with pytest.raises(InputError, match="did you mean 'enhance.alpha'"):
        api.enhance(slide, settings={"enhance.alfa": 0.3})
    # data.* and the section lists are api.read's and the scripts': dropped without a word, now refused
    for unread, said in (({"data.truth": "labels.txt"}, "data.truth"), ({"data": {"path": "x"}}, "data.path"),
                         ({"test.sections": ["x"]}, "test.sections")):
        with pytest.raises(InputError, match=rf"^settings: {said} would not be used: .*api.read\(path, truth=..."):
            api.domains(slide, 3, settings=unread)
    with pytest.raises(InputError, match="enhance.kernel"):
        api.settings(settings={"enhance.kernel": "box"})
    with pytest.raises(InputError, match="unknown data key"):
        api.read(synthetic_slice, truht="labels.txt")
    with pytest.raises(InputError, match="expected an AnnData"):
        api.domains(np.zeros((3, 3)))
    with pytest.raises(InputError, match="device='gpu': choose one of auto, cpu, cuda"):   # was torch's RuntimeError
        api.enhance(slide, device="gpu")
    broken = slide.copy()
    del broken.obsm["spatial"]
    with pytest.raises(InputError, match=r"adata: obsm\['spatial'\] is missing"):
        api.image_features(broken)
    import anndata as ad
    two = ad.concat({"left": slide, "right": slide}, label="library_id", index_unique="-")    # two slides in one
    entry = slide.uns["spatial"][next(iter(slide.uns["spatial"]))]
    two.uns["spatial"] = {"left": entry, "right": entry}
    with pytest.raises(InputError, match="holds 2 libraries .* library_id=<library id>"):
        api.image_features(two)
    one = api.prepare(two, library_id="right")
    assert one.n_obs == slide.n_obs and list(one.uns["spatial"]) == ["right"]
    with pytest.raises(InputError, match="model.n_clusters is not set"):
        api.domains(slide)                       # no labels to count domains from
    with pytest.raises(InputError, match="image.use=none: stage 4"):
        api.super_resolve(slide, settings={"image.use": "none"})
    bare = slide.copy()                          # no image at all: the fix is named in this module's terms
    for entry in bare.uns["spatial"].values():
        entry["images"] = {}
    bare.uns.pop("fullres_image", None)
    for stage in (api.super_resolve, api.evaluate_superres):
        with pytest.raises(InputError, match=r"no image. Stage 4 .* prepare\(adata, image=PATH\)"):
            stage(bare)


def test_superres_in_memory_equals_the_script(tmp_path, synthetic_slice):
    import anndata as ad

    from train_superres import run_stage
    quick = {"superres.steps": 30, "superres.n_top_genes": 30, "superres.patch_cnn.use": False}
    run_stage(load_config(ROOT / "configs" / "superres.yaml", [f"data.path={synthetic_slice}", "data.truth=null",
                                                               *(f"{k}={v}" for k, v in quick.items()),
                                                               "plot.figures=false"]),
              tmp_path, progress=False)
    want = ad.read_h5ad(tmp_path / "04_superres.h5ad")
    got = api.super_resolve(api.read(synthetic_slice), settings=quick, device="cpu", progress=False)
    assert list(got.var_names) == list(want.var_names)
    np.testing.assert_array_equal(got.obsm[keys.SPATIAL], want.obsm[keys.SPATIAL])
    np.testing.assert_allclose(got.X, want.X, atol=1e-6)
    assert got.uns[keys.SUPERRES][keys.METRICS]["model"] == "trihrge"
    ev = api.evaluate_superres(api.read(synthetic_slice), "recovery",
                               settings={**quick, "eval.n_score_genes": 20}, device="cpu", progress=False)
    assert ev.n_obs == 576 // 2 and keys.MEASURED in ev.layers
    assert 0 < ev.uns[keys.METRICS]["pcc_all"] < 1 and ev.uns[keys.METRICS]["protocol"] == "recovery"


def test_expression_model_in_memory_equals_the_script(tmp_path, tmp_path_factory):
    import anndata as ad

    from data.synthetic import make_synthetic_visium
    from predict_expression import run_stage
    base = tmp_path_factory.mktemp("api_pred")
    a, b = (make_synthetic_visium(base / f"s{i}", n_rows=16, n_cols=16, n_genes=120, seed=i) for i in (1, 2))
    quick = {"predict.epochs": 30, "predict.ae_epochs": 10, "predict.n_models": 1, "predict.n_genes": 30,
             "predict.patch_cnn.use": False}
    run_stage(load_config(ROOT / "configs" / "predict.yaml",
                          [f"train.sections=[{{path: {a}, name: A}}]", f"test.sections=[{{path: {b}, name: B}}]",
                           *(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in quick.items()),
                           "plot.figures=false"]),
              tmp_path, progress=False)
    want = ad.read_h5ad(tmp_path / "B" / "05_predicted.h5ad")
    model = api.train_expression_model({"A": api.read(a)}, settings=quick, device="cpu", progress=False)
    got = api.predict_expression(model, api.read(b), name="B", device="cpu")
    assert list(got.var_names) == list(want.var_names)
    np.testing.assert_allclose(got.X, want.X, atol=1e-6)
    scores = json.loads((tmp_path / "metrics.json").read_text())["sections"]["B"]
    assert got.uns[keys.PREDICTION][keys.SCORES]["pcc_all"] == pytest.approx(scores["pcc_all"], abs=1e-6)
    model.save(tmp_path / "model.pt")      # saved, it predicts the same from its file
    again = api.predict_expression(tmp_path / "model.pt", api.read(b), name="B", genes=list(got.var_names[:5]))
    np.testing.assert_allclose(again.X, got.X[:, :5], atol=1e-6)
    # an image without spots or sequencing (a whole slide), as the script predicts an image-only test section
    image = b / "spatial" / "tissue_hires_image.png"
    run_stage(load_config(ROOT / "configs" / "predict.yaml",
                          ["train.sections=[]", f"test.sections=[{{image: {image}, name: W}}]",
                           f"predict.model_file={tmp_path / 'model.pt'}", "wsi.mpp=4.0"]), tmp_path / "wsi", progress=False)
    want = ad.read_h5ad(tmp_path / "wsi" / "W" / "05_predicted.h5ad")
    got = api.predict_whole_slide(model, image, name="W", mpp=4.0, device="cpu", progress=False)
    assert got.n_obs > 50 and list(got.var_names) == list(want.var_names)
    np.testing.assert_array_equal(got.obsm[keys.SPATIAL], want.obsm[keys.SPATIAL])
    np.testing.assert_allclose(got.X, want.X, atol=1e-6)
    assert got.uns[keys.PREDICTION]["whole_slide"]["n_spots"] == got.n_obs


def test_leave_one_section_out_scores_each_section_by_a_model_that_never_saw_it(tmp_path_factory):
    from data.synthetic import make_synthetic_visium
    base = tmp_path_factory.mktemp("api_cv")
    slides = {f"S{i}": api.read(make_synthetic_visium(base / f"s{i}", n_rows=14, n_cols=14, n_genes=100, seed=i))
              for i in (1, 2, 3)}
    quick = {"predict.epochs": 20, "predict.ae_epochs": 10, "predict.n_models": 1, "predict.n_genes": 25,
             "predict.patch_cnn.use": False}
    table = api.cross_validate_expression(slides, settings=quick, device="cpu", progress=False)
    assert list(table.index) == ["S1", "S2", "S3"]
    for test, row in table.iterrows():
        assert test not in row["train_sections"].split(", ") and row["n_genes"] == 25
        assert np.isfinite([row["pcc_all"], row["ridge_pcc_all"], row["mse"]]).all()
    # the S3 fold is what training on S1 and S2 and predicting S3 gives
    model = api.train_expression_model({"S1": slides["S1"], "S2": slides["S2"]}, settings=quick, device="cpu",
                                       progress=False)
    scores = api.predict_expression(model, slides["S3"], name="S3", device="cpu").uns[keys.PREDICTION][keys.SCORES]
    assert table.loc["S3", "pcc_all"] == pytest.approx(scores["pcc_all"], abs=1e-6)
    with pytest.raises(InputError, match="at least 2 sections"):
        api.cross_validate_expression({"S1": slides["S1"]})
