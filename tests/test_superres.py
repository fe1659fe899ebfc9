"""Stage 4: diffusion closed form and sampler, both models on a tiny slide, protocols that never
leak a scored spot, and clear errors on bad input."""
import json

import numpy as np
import pytest
import torch

from conftest import ROOT
from data import keys
from data.errors import InputError
from data.readers import read_slide
from models.diffst import DiffSTDenoiser, coexpression_graph
from models.diffusion import GaussianDiffusion
from models.superres_training import SuperresParams, fit_diffusion, fit_trihrge
from pipeline.config import load_config
from pipeline.superres import (Locations, make_split, pool_2x2, spots_as_locations, superres_grid,
                               thinned_log_expression)


def _tiny_net(G=12, d=22):
    return DiffSTDenoiser(G, d, coexpression_graph(torch.randn(50, G)))


def test_forward_noising_matches_closed_form():
    dm = GaussianDiffusion(_tiny_net(), steps=100, schedule="linear")
    betas = torch.linspace(1e-3, 0.2, 100, dtype=torch.float64)
    ab = torch.cumprod(1 - betas, 0)
    x0, noise = torch.randn(4, 12), torch.randn(4, 12)
    t = torch.tensor([0, 10, 50, 99])
    expected = ab[t].sqrt().float()[:, None] * x0 + (1 - ab[t]).sqrt().float()[:, None] * noise
    torch.testing.assert_close(dm.q_sample(x0, t, noise), expected, rtol=1e-5, atol=1e-5)
    assert torch.all(dm.alphas_cumprod[1:] < dm.alphas_cumprod[:-1])


def test_sampler_returns_finite_maps_of_the_right_shape():
    dm = GaussianDiffusion(_tiny_net(), steps=50)
    cond = dict(lowres=torch.randn(7, 12), cell=torch.randn(7, 22), tissue=torch.randn(7, 10, 22))
    out = dm.sample((7, 12), n_samples=3, n_steps=5, **cond)
    assert out.shape == (7, 12) and torch.isfinite(out).all()


def _problem(n=300, G=15, d=22, seed=0):
    rng = np.random.default_rng(seed)
    img = rng.normal(size=(n, 10, d)).astype(np.float32)
    truth = (img[:, 0, :G] * 0.8 + rng.normal(0, 0.3, (n, G))).astype(np.float32)
    lowres = (truth + rng.normal(0, 0.8, (n, G))).astype(np.float32)
    return img, lowres, truth


@pytest.mark.parametrize("model", ["trihrge", "diffusion"])
def test_models_learn_on_a_tiny_problem(model):
    img, lowres, truth = _problem()
    p = SuperresParams(steps=400, batch_size=64, hidden=64, diffusion_steps=50, seed=0)
    if model == "trihrge":
        _, hist = fit_trihrge(img[:, :2], lowres, np.zeros((len(truth), 2), np.float32), truth, p)
    else:
        _, hist = fit_diffusion(img[:, 0], img[:, 1:], lowres, truth, p)
    assert np.mean(hist[-20:]) < 0.8 * np.mean(hist[:20])


@pytest.mark.parametrize("model", ["trihrge", "diffusion"])
def test_models_are_seeded(model):
    """The same seed gives the same weights to the last bit (CPU); another seed gives others."""
    img, lowres, truth = _problem(n=120)

    def fit(seed):
        p = SuperresParams(steps=30, batch_size=32, hidden=16, diffusion_steps=20, seed=seed)
        if model == "trihrge":
            return fit_trihrge(img[:, :2], lowres, np.zeros((len(truth), 2), np.float32), truth, p)[0]
        return fit_diffusion(img[:, 0], img[:, 1:], lowres, truth, p)[0]

    a, b, c = fit(0).state_dict(), fit(0).state_dict(), fit(1).state_dict()
    assert a.keys() == b.keys() and len(a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


def test_diffusion_with_a_zero_residual_weight_returns_the_base_unsampled(monkeypatch):
    """A calibrated residual weight of 0 makes the prediction the low-res base exactly; sampling,
    whose result would be multiplied by 0, is skipped."""
    from models.superres_training import predict_diffusion, residual_weight

    img, lowres, truth = _problem(n=120)
    p = SuperresParams(steps=20, batch_size=32, hidden=32, diffusion_steps=20, sampling_steps=4, seed=0)
    model, _ = fit_diffusion(img[:, 0], img[:, 1:], lowres, truth, p)
    assert 0.0 <= residual_weight(model) <= 1.0
    sampled = predict_diffusion(model, img[:, 0], img[:, 1:], lowres, p)
    model.shrink.zero_()
    monkeypatch.setattr(type(model), "sample", lambda *a, **k: pytest.fail("sampled with a zero weight"))
    base = predict_diffusion(model, img[:, 0], img[:, 1:], lowres, p)
    assert residual_weight(model) == 0.0 and base.dtype == np.float32 and sampled.shape == base.shape
    np.testing.assert_array_equal(base, lowres)


def test_thinned_share_of_a_coarse_location_by_hand():
    """Two coarse locations 100 px apart (library 10,000 each). Location 0 holds 1 molecule of gene
    0 and 300 of gene 1 and contains two queries placed symmetrically (equal shares, p = 1/2, each
    query gets half the library, so 2 CP10k per molecule); location 1 holds 3 molecules of gene 0
    and one query (its own value). Gene 0 at location 0: E[log1p(2 X)], X ~ Bin(1, 1/2)
    = 0.5 log1p(2); gene 1 (300 molecules, the delta method) ~ exact binomial expectation."""
    import scipy.sparse as sp
    from scipy.stats import binom

    ctx = Locations(xy=np.array([[0.0, 0.0], [100.0, 0.0]]), expr=None, spacing=100.0,
                    counts=sp.csr_matrix(np.array([[1.0, 300.0], [3.0, 0.0]])), totals=np.array([1e4, 1e4]))
    q = np.array([[0.0, -20.0], [0.0, 20.0], [100.0, 0.0]])
    out = thinned_log_expression(ctx, q)
    assert out.shape == (3, 2)
    np.testing.assert_allclose(out[:2, 0], 0.5 * np.log1p(2.0), rtol=1e-5)
    exact = (binom.pmf(np.arange(301), 300, 0.5) * np.log1p(2.0 * np.arange(301))).sum()
    np.testing.assert_allclose(out[:2, 1], exact, rtol=1e-4)
    np.testing.assert_allclose(out[2], [np.log1p(3.0), 0.0], rtol=1e-5)
    # queries off-centre: the one nearer the location with more of gene 0 gets the larger share
    out2 = thinned_log_expression(ctx, np.array([[-20.0, 0.0], [20.0, 0.0], [100.0, 0.0]]))
    assert out2[1, 0] > out2[0, 0]


def test_protocols_never_see_a_scored_spot(synthetic_slice):
    a = read_slide({"path": synthetic_slice})
    spots = spots_as_locations(a, list(a.var_names))
    rec = make_split(spots, "recovery", seed=0)
    assert len(rec.query_index) == a.n_obs // 2
    assert not np.isin(rec.context.index, rec.query_index).any()
    np.testing.assert_array_equal(rec.context.xy, spots.xy[np.setdiff1d(np.arange(a.n_obs), rec.query_index)])
    pool = make_split(spots, "pooling")
    assert len(pool.context.index) == 0 and len(pool.query_index) == a.n_obs
    # 2x2 pooling on a Visium grid: 4 spots per super-spot (24x24 spots), counts summed
    pooled, groups = pool_2x2(spots)
    assert np.bincount(groups).max() == 4 and len(pooled.xy) == a.n_obs // 4
    np.testing.assert_allclose(pooled.totals.sum(), spots.totals.sum())


def test_genes_chosen_from_counts_alone_as_from_expression(synthetic_slice):
    """Stage 4 picks genes on counts only (a full-width matrix is never densified); the context, the
    split and the scored genes are the same as with every gene log-normalised."""
    import pipeline.superres as S
    from pipeline.preprocess import lognormalize

    a = read_slide({"path": synthetic_slice})
    names = list(a.var_names)
    full = spots_as_locations(a, names)
    probe = spots_as_locations(a, names, with_expr=False)
    assert probe.expr is None
    dense = lognormalize(a.X, a.obs[keys.TOTAL_COUNTS].to_numpy())
    np.testing.assert_array_equal(lognormalize(a.X, a.obs[keys.TOTAL_COUNTS].to_numpy(), dense=False).toarray(), dense)
    old_chunk, S.GENE_CHUNK = S.GENE_CHUNK, 7   # several chunks on a 300-gene slide
    try:
        for protocol in ("recovery", "pooling"):
            f, p = make_split(full, protocol, seed=3), make_split(probe, protocol, seed=3)
            np.testing.assert_array_equal(f.context.xy, p.context.xy)
            assert p.context.expr is None and p.truth is None
            assert S.scoring_genes(f.context, names, 40) == S.scoring_genes(p.context, names, 40)
    finally:
        S.GENE_CHUNK = old_chunk


def test_grid_is_denser_and_on_tissue(synthetic_slice):
    a = read_slide({"path": synthetic_slice})
    spots = spots_as_locations(a, list(a.var_names)[:5])
    g = superres_grid(spots.xy, spots.spacing, 2)
    assert 3 * a.n_obs < len(g) < 6 * a.n_obs
    with pytest.raises(InputError, match="factor"):
        superres_grid(spots.xy, spots.spacing, 0.5)
    # with the array sites: exactly the spots' hexagonal cells, sqrt(3)/2 x 4 points per spot
    g = superres_grid(spots.xy, spots.spacing, 2, array=spots.array)
    assert len(g) == pytest.approx(a.n_obs * 4 * np.sqrt(3) / 2, rel=0.03)


def test_grid_fills_a_square_st_array_without_holes():
    """On a legacy ST array (square lattice, here rotated 5 degrees) the corners of a spot's cell lie
    0.71 spacings from it, so a grid kept within 0.6 spacings of a spot had a hole between every four
    spots. With the array sites every grid point of a spot's cell is kept (factor^2 per spot), none
    outside the cells, and the cell of a missing spot stays empty."""
    col, row = np.meshgrid(np.arange(12), np.arange(10))
    array = np.c_[col.ravel(), row.ravel()]
    array = array[~((array[:, 0] == 5) & (array[:, 1] == 4))]      # one spot missing inside
    theta, s = np.deg2rad(5), 200.0
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    xy = 1000 + array * s @ rot.T + np.random.default_rng(0).normal(0, 3, array.shape)
    for factor in (2, 3):
        g = superres_grid(xy, s, factor, array=array)
        assert len(g) == pytest.approx(len(array) * factor ** 2, abs=4 * factor)
        lattice = (g - 1000) @ rot / s                               # back in array units
        assert np.all(lattice > -0.52) and np.all(lattice[:, 0] < 11.52) and np.all(lattice[:, 1] < 9.52)
        assert np.abs(lattice - [5, 4]).max(1).min() > 0.48            # the missing spot's cell
        d = np.linalg.norm(g[:, None] - xy[None], axis=2).min(1)
        assert (d > 0.6 * s).sum() > 0.03 * len(g)     # the cells' corners (~5% of the area), kept
    # aligned with the spots (x2), grid points fall on cell borders: kept where a spot's cell has them
    g = superres_grid(1000 + array * s, s, 2, array=array)
    assert len(g) == 25 * 21 - 1                   # all but the missing spot's centre (its borders are shared)



@pytest.mark.filterwarnings("ignore:Use `squidpy.pl.spatial_scatter`:FutureWarning",
                            "ignore:The set_bad function:PendingDeprecationWarning")   # scanpy's own, drawing
def test_stage4_end_to_end_with_protocol(tmp_path, synthetic_slice):
    import subprocess
    import sys
    out = tmp_path / "sr"
    p = subprocess.run([sys.executable, "train_superres.py", "--out", str(out), "--set", f"data.path={synthetic_slice}",
                        "--set", "superres.steps=60", "--set", "superres.n_top_genes=40", "--set", "eval.protocol=recovery",
                        "--set", "eval.n_score_genes=30", "--set", "superres.patch_cnn.patch_budget=200"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    m = json.loads((out / "metrics.json").read_text())
    for k in ("pcc_all", "pcc_heg", "mse", "ssim", "n_genes", "seconds_train", "seconds_predict"):
        assert k in m
    assert m["n_genes"] == 30 and m["pcc_all"] > 0.1
    # the stage's seconds are the whole stage, not its training alone
    assert m["seconds"]["superres"] >= m["seconds_train"] + m["seconds_predict"] + m["seconds_predict_grid"]
    import anndata as ad
    grid = ad.read_h5ad(out / "04_superres.h5ad")
    assert grid.obsm[keys.SPATIAL].shape == (grid.n_obs, 2) and grid.n_obs > 2 * 24 * 24
    assert (out / "04_superres.png").exists() and (out / "04_eval.h5ad").exists()
    lib = keys.library_id(grid)   # scanpy draws the grid over the H&E
    assert grid.uns[keys.SPATIAL_UNS][lib]["images"]["hires"].ndim == 3
    import matplotlib
    matplotlib.use("Agg")
    import scanpy as sc
    sc.pl.spatial(grid, color=grid.var_names[0], show=False)
    # only superres.plot_genes changed: the figure is redrawn, the model is not retrained
    before, png = (out / "04_superres.h5ad").stat().st_mtime_ns, (out / "04_superres.png").stat().st_mtime_ns
    p = subprocess.run([sys.executable, "train_superres.py", "--out", str(out), "--set", f"data.path={synthetic_slice}",
                        "--set", "superres.steps=60", "--set", "superres.n_top_genes=40", "--set", "eval.protocol=recovery",
                        "--set", "eval.n_score_genes=30", "--set", "superres.patch_cnn.patch_budget=200",
                        "--set", f"superres.plot_genes=[{grid.var_names[1]}]"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0 and "figure redrawn" in p.stderr, p.stderr[-2000:]
    assert (out / "04_superres.h5ad").stat().st_mtime_ns == before and (out / "04_superres.png").stat().st_mtime_ns > png


@pytest.mark.parametrize("model", ["trihrge", "diffusion"])
def test_a_new_factor_predicts_the_grid_with_the_saved_model(tmp_path, synthetic_slice, model):
    """Only superres.factor changed: the grid is predicted by the saved model (04_model.pt), as a full rerun
    at that factor predicts it, without retraining; a model file that cannot be loaded is retrained."""
    import anndata as ad

    from train_superres import MODEL_FILE, run_stage

    base = [f"data.path={synthetic_slice}", f"model.name={model}", "superres.steps=40", "superres.n_top_genes=30",
            "eval.protocol=recovery", "eval.n_score_genes=20", "superres.patch_cnn.folds=2",
            "superres.patch_cnn.patch_budget=200", f"superres.patch_cnn.use={str(model == 'trihrge').lower()}",
            "plot.figures=false"]
    # factors 1.5 and 2 (a fractional one too): small grids keep the test quick
    x2, x3 = (load_config(ROOT / "configs" / "superres.yaml", base + [f"superres.factor={f}"]) for f in (1.5, 2))
    assert run_stage(x3, tmp_path / "full", progress=False)
    out = tmp_path / "rerun"
    assert run_stage(x2, out, progress=False)
    first = json.loads((out / "metrics.json").read_text())
    assert first["patch_cnn"] is (model == "trihrge")
    model_written = (out / MODEL_FILE).stat().st_mtime_ns
    assert run_stage(x3, out, progress=False)
    assert (out / MODEL_FILE).stat().st_mtime_ns == model_written
    got, want = ad.read_h5ad(out / "04_superres.h5ad"), ad.read_h5ad(tmp_path / "full" / "04_superres.h5ad")
    np.testing.assert_array_equal(got.obsm[keys.SPATIAL], want.obsm[keys.SPATIAL])
    np.testing.assert_allclose(got.X, want.X, rtol=1e-5, atol=1e-5)
    assert got.uns[keys.SUPERRES]["factor"] == 2.0
    m = json.loads((out / "metrics.json").read_text())
    assert m["grid_from_saved_model"] is True and m["superres"]["grid_from_saved_model"] is True
    assert m["n_grid"] == got.n_obs and m["pcc_all"] == first["pcc_all"] and m["seconds_train"] == first["seconds_train"]
    assert not run_stage(x3, out, progress=False)                    # up to date now
    assert not list(out.glob("*.png")) and not list((tmp_path / "full").glob("*.png"))    # plot.figures=false
    if model == "diffusion":
        return
    x3_drawn = load_config(ROOT / "configs" / "superres.yaml", base + ["superres.factor=2", "plot.figures=true"])
    assert not run_stage(x3_drawn, out, progress=False)               # drawn from the saved grid: not retrained
    assert (out / "04_superres.png").stat().st_size > 1000 and (out / MODEL_FILE).stat().st_mtime_ns == model_written
    assert not run_stage(x3, out, progress=False) and not (out / "04_superres.png").exists()   # off again: removed
    (out / MODEL_FILE).write_bytes(b"PK\x05\x06" + bytes(18))        # an empty zip: opens, but holds no model
    assert run_stage(x2, out, progress=False)                         # retrained, with a warning
    assert "grid_from_saved_model" not in json.loads((out / "metrics.json").read_text())
    # metrics.json gone: predicting the grid again would keep the training's and the protocol's scores from that
    # file, so stage 4 trains again and writes them all, the same as before
    (out / "metrics.json").unlink()
    assert run_stage(x2, out, progress=False)
    again = json.loads((out / "metrics.json").read_text())
    assert again["pcc_all"] == first["pcc_all"] and "grid_from_saved_model" not in again


def test_bad_input_is_clear(tmp_path, synthetic_slice):
    from train_superres import super_resolve

    a = read_slide({"path": synthetic_slice})
    cfg = load_config(ROOT / "configs" / "superres.yaml", ["superres.genes=[Gene0001, NotAGene]"])
    with pytest.raises(InputError, match="NotAGene"):
        super_resolve(a, cfg, progress=False)
    cfg = load_config(ROOT / "configs" / "superres.yaml", ["superres.factor=0.5"])
    with pytest.raises(InputError, match="factor"):
        super_resolve(a, cfg, progress=False)
    cfg = load_config(ROOT / "configs" / "superres.yaml", ["superres.factor=100"])     # 5.8 million locations (576 spots)
    with pytest.raises(InputError, match="at most 59 for this slide"):
        super_resolve(a, cfg, progress=False)
    cfg = load_config(ROOT / "configs" / "superres.yaml", ["image.use=none"])
    with pytest.raises(InputError, match="image.use=none: stage 4 .* set image.use=auto"):   # it said "set data.image"
        super_resolve(a, cfg, progress=False)
    bare = a.copy()          # an .h5ad without images: refused, not an AttributeError from the spots-on-image check
    for entry in bare.uns["spatial"].values():
        entry["images"] = {}
    with pytest.raises(InputError, match="needs the slide's H&E image"):
        super_resolve(bare, load_config(ROOT / "configs" / "superres.yaml"), progress=False)
    # 4 spots pooled 2 x 2 leave one super-spot: the gene ranking crashed the interpreter, and with named
    # genes training divided by zero; too few spots to learn from are now refused before either
    corner = a[(a.obs["array_row"] < 2) & (a.obs["array_col"] < 4)].copy()
    cfg = load_config(ROOT / "configs" / "superres.yaml", ["eval.protocol=pooling"])
    with pytest.raises(InputError, match=f"1 super-spot visible under the pooling protocol, of {corner.n_obs}"):
        super_resolve(corner, cfg, progress=False)
    # the patch CNN's settings are checked before the slide is read (they were refused ~15 s in)
    from train_superres import run_stage
    cfg = load_config(ROOT / "configs" / "superres.yaml", ["superres.patch_cnn.tta=3", "data.path=/nonexistent"])
    with pytest.raises(InputError, match="tta=3"):
        run_stage(cfg, tmp_path / "tta", progress=False)


def test_ridge_leave_one_out_matches_refitting():
    """The closed-form LOO error of the image ridge equals refitting without each training pair."""
    from sklearn.linear_model import Ridge

    from pipeline.superres import ridge_loo
    rng = np.random.default_rng(0)
    Z = rng.normal(size=(40, 6))
    R = Z @ rng.normal(size=(6, 3)) + rng.normal(0, 0.5, (40, 3))
    W, b, alpha, scores = ridge_loo(Z, R, alphas=(0.5, 5.0))
    for a, mse in scores.items():
        errs = []
        for i in range(len(Z)):
            keep = np.arange(len(Z)) != i
            m = Ridge(alpha=a).fit(Z[keep], R[keep])
            errs.append((m.predict(Z[i:i + 1]) - R[i]) ** 2)
        np.testing.assert_allclose(mse, np.mean(errs), rtol=1e-6)
    full = Ridge(alpha=alpha).fit(Z, R)
    np.testing.assert_allclose(Z @ W + b, full.predict(Z), rtol=1e-4, atol=1e-5)


def test_trains_on_other_sections_and_refuses_the_slide_itself(tmp_path, synthetic_slice):
    """train.sections: the model also learns from another section, posed the slide's own task
    (mirrored pairs); the scored slide may not be a training section; genes it lacks are zeros."""
    from data.synthetic import make_synthetic_visium
    from pipeline.superres import mirrored_pairs
    from train_superres import super_resolve

    other = make_synthetic_visium(tmp_path / "other", n_rows=24, n_cols=24, n_genes=300, seed=1)
    a = read_slide({"path": synthetic_slice})
    base = ["superres.steps=30", "superres.n_top_genes=30", "eval.protocol=recovery", "eval.n_score_genes=20",
            "superres.patch_cnn.patch_budget=200", "plot.figures=false"]
    cfg = load_config(ROOT / "configs" / "superres.yaml",
                      base + [f"train.sections=[{{path: {other}, name: other}}]", "superres.train_self=false"])
    res = super_resolve(a, cfg, progress=False, grid=False)
    assert set(res["metrics"]["training_pairs"]) == {"other"} and np.isfinite(res["metrics"]["pcc_all"])
    # the task posed on the other section: half predicted from the other half, disjoint
    b = read_slide({"path": other})
    spots = spots_as_locations(b, list(b.var_names)[:10])
    t, low, _ = mirrored_pairs(spots, "loo", seed=3)
    assert len(t.xy) == b.n_obs // 2 and not np.isin(t.index, low.index).any()
    t, low, _ = mirrored_pairs(spots, "coarsen")
    assert len(t.xy) == b.n_obs and len(low.xy) == b.n_obs // 4
    # a gene the other section lacks is a zero column there, the slide itself must have every gene
    z = spots_as_locations(b, list(b.var_names)[:3] + ["NotAGene"], allow_missing=True)
    assert z.expr.shape == (b.n_obs, 4) and np.all(z.expr[:, 3] == 0)
    with pytest.raises(InputError, match="NotAGene"):
        spots_as_locations(b, ["NotAGene"])
    cfg = load_config(ROOT / "configs" / "superres.yaml",
                      base + [f"data.path={synthetic_slice}", f"train.sections=[{{path: {synthetic_slice}}}]"])
    with pytest.raises(InputError, match="also a training section"):
        super_resolve(a, cfg, progress=False, grid=False)
    # a section with none of the genes (other identifiers, another species) is refused, not trained on as zeros
    renamed = b.copy()
    renamed.var_names = [f"ENSG{i:011d}" for i in range(renamed.n_vars)]
    renamed.write_h5ad(tmp_path / "ensembl.h5ad")
    cfg = load_config(ROOT / "configs" / "superres.yaml",
                      base + [f"train.sections=[{{path: {tmp_path / 'ensembl.h5ad'}, name: ens}}]"])
    with pytest.raises(InputError, match="train.sections ens: none of the slide's"):
        super_resolve(a, cfg, progress=False, grid=False)
    bare = b.copy()                  # a training section without an image is refused, saying why
    bare.uns.pop("spatial")
    bare.write_h5ad(tmp_path / "bare.h5ad")
    cfg = load_config(ROOT / "configs" / "superres.yaml",
                      base + [f"train.sections=[{{path: {tmp_path / 'bare.h5ad'}, name: bare}}]"])
    with pytest.raises(InputError, match="train.sections bare: no image. Stage 4 learns from the H&E"):
        super_resolve(a, cfg, progress=False, grid=False)
    cfg = load_config(ROOT / "configs" / "superres.yaml", base + ["superres.train_self=false"])
    with pytest.raises(InputError, match="nothing to train on"):
        super_resolve(a, cfg, progress=False, grid=False)


def _section_image(side=200, scale=1.0, diameter=20.0, seed=0):
    from image_process.patches import SlideImage
    from pipeline.superres import SectionImage
    px = np.random.default_rng(seed).integers(0, 255, (side, side, 3), dtype=np.uint8)
    return SectionImage(SlideImage(px, scale, "synthetic.png", "test"), diameter, 2 * diameter)


def test_patch_candidate_is_cross_fitted_and_seeded():
    """A training pair's candidate comes from a network that never saw its expression: changing one
    pair's target leaves its own out-of-fold value unchanged (and the rest of its fold's too)."""
    from pipeline.superres_patches import PatchCandidate, PatchCandidateSettings

    sec = _section_image()
    rng = np.random.default_rng(1)
    xy = rng.uniform(30, 170, (40, 2))
    y = rng.normal(size=(40, 5)).astype(np.float32)
    s = PatchCandidateSettings(px=16, width=4, dim=4, max_epochs=2, batch=8)

    def run(y):
        c = PatchCandidate(s, seed=0)
        oof = c.fit([(sec, xy[:25], y[:25]), (sec, xy[25:], y[25:])], sec, xy)
        return c, np.concatenate(oof)

    c, a = run(y)
    assert a.shape == (40, 5) and np.isfinite(a).all() and len(c.nets) == 2
    fold = np.random.default_rng(4242).permutation(40) % 2
    y2 = y.copy()
    y2[3] += 100.0
    _, b = run(y2)
    same = fold == fold[3]
    np.testing.assert_array_equal(a[same], b[same])          # pair 3's fold: its network never saw pair 3
    assert not np.allclose(a[~same], b[~same])               # the other network did
    _, a2 = run(y)
    np.testing.assert_array_equal(a, a2)                     # seeded
    q = c.predict(sec, rng.uniform(30, 170, (7, 2)))
    assert q.shape == (7, 5) and np.isfinite(q).all()


def test_patch_candidate_only_where_the_image_has_pixels(caplog):
    from pipeline.superres_patches import PatchCandidateSettings, patch_candidate_wanted

    fine, coarse = _section_image(diameter=20.0), _section_image(scale=0.1, diameter=20.0)  # 60 px vs 6 px patches
    auto = PatchCandidateSettings()
    assert patch_candidate_wanted(auto, {"slide": fine})
    assert not patch_candidate_wanted(auto, {"slide": fine, "other": coarse})
    assert patch_candidate_wanted(PatchCandidateSettings(use=True), {"slide": coarse})
    assert "upsampled" in caplog.text
    assert not patch_candidate_wanted(PatchCandidateSettings(use=False), {"slide": fine})
    with pytest.raises(InputError, match="unknown key"):
        PatchCandidateSettings.from_config({"epochs": 3})
    with pytest.raises(InputError, match="use="):
        PatchCandidateSettings.from_config({"use": "yes"})
    with pytest.raises(InputError, match="tta="):
        PatchCandidateSettings.from_config({"tta": 2})
    # any side from 16 px, as stage 5 takes (a multiple of 8 was asked here only): the network pools what is left
    from models.patch_cnn import PatchCNN
    assert PatchCandidateSettings.from_config({"px": 50}).px == 50
    assert PatchCNN(3, width=4, dim=4)(torch.zeros(2, 3, 50, 50))[0].shape == (2, 3)
    with pytest.raises(InputError, match="px >= 16"):
        PatchCandidateSettings.from_config({"px": 12})


def test_labels_are_not_part_of_stage4s_fingerprint(synthetic_slice):
    """Stage 4 does not use the domain labels: changing data.truth must not retrain it (a stage-3 config
    reused for stage 4, with labels changed for stage 3, used to)."""
    from pipeline.config import load_config
    from train_superres import fingerprint

    base = [f"data.path={synthetic_slice}"]
    with_labels = load_config(None, base + [f"data.truth={synthetic_slice / 'truth.txt'}", "data.truth_missing=[NA]"])
    assert fingerprint(with_labels, "cpu") == fingerprint(load_config(None, base + ["data.truth=null"]), "cpu")
    assert fingerprint(load_config(None, base + ["superres.factor=3"]), "cpu") != fingerprint(with_labels, "cpu")


def test_unmodelled_plot_genes_are_said_before_training(caplog):
    """A figure gene that will not be modelled is warned of when the genes are chosen, not only after
    training, when the figure silently has fewer panels."""
    from train_superres import warn_unmodelled_plot_genes

    assert warn_unmodelled_plot_genes(["Mobp", "NOPE"], ["Mobp", "Pcp4"]) == ["NOPE"]
    assert "superres.plot_genes NOPE are not among the 2 modelled genes" in caplog.text
    assert warn_unmodelled_plot_genes(None, ["Mobp"]) == []


def test_shared_blend_by_hand():
    from pipeline.superres import fit_stack, shared_blend
    prior, other = np.zeros((10, 3), np.float32), np.ones((10, 3), np.float32)
    assert shared_blend(prior, other, np.full((10, 3), 0.3)) == pytest.approx(0.3)
    assert shared_blend(prior, other, np.full((10, 3), 2.0)) == 1.0            # clipped to [0, 1]
    # with almost no pairs the stack stays at its prior, here the blend 0.7 x other + 0.3 x prior
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2, 3)).astype(np.float32), rng.normal(size=(2, 3)).astype(np.float32)
    w = fit_stack([a, b], 0.3 * a + 0.7 * b, prior=0, strength=1e6, blend=1)
    np.testing.assert_allclose(w[1:], [[0.3] * 3, [0.7] * 3], atol=1e-3)


def test_low_rank_kernel_borrows_strength_across_genes():
    """Genes that share one spatial programme: the projected kernel estimate is closer to the truth
    than the plain kernel, and the rank chosen on the context alone is small."""
    from pipeline.superres import Locations, kernel_predict, low_rank_kernel, standardiser

    rng = np.random.default_rng(0)
    xy = np.stack(np.meshgrid(np.arange(30), np.arange(30)), -1).reshape(-1, 2).astype(float)
    signal = np.sin(xy[:, :1] / 4.0) @ rng.uniform(0.5, 1.5, (1, 40))          # rank 1
    expr = (signal + rng.normal(0, 1.0, signal.shape)).astype(np.float32)
    ctx = Locations(xy=xy[::2], expr=expr[::2], spacing=1.0)
    q = xy[1::2]
    est, k = low_rank_kernel(ctx, q, 1.0, standardiser(ctx.expr))
    plain = kernel_predict(ctx, q, 1.0)
    assert est.shape == plain.shape == (len(q), 40) and k <= 4
    assert np.mean((est - signal[1::2]) ** 2) < 0.5 * np.mean((plain - signal[1::2]) ** 2)


def _two_domain_context(seed=0):
    """A 30 x 30 grid, two tissue states split at x = 15 (a step in 40 genes), unit noise; the
    context is every other location, the queries the rest."""
    from pipeline.superres import Locations

    rng = np.random.default_rng(seed)
    xy = np.stack(np.meshgrid(np.arange(30), np.arange(30)), -1).reshape(-1, 2).astype(float)
    signal = (xy[:, :1] >= 15) @ rng.uniform(1.0, 2.0, (1, 40))
    expr = (signal + rng.normal(0, 1.0, signal.shape)).astype(np.float32)
    return Locations(xy=xy[::2], expr=expr[::2], spacing=1.0), xy[1::2], signal[1::2]


def test_guided_kernel_keeps_a_boundary_sharp():
    """Across a step between two tissue states the expression-guided kernel, with every setting chosen
    by leave-one-out on the context, is closer to the truth than the low-rank kernel (which averages
    across the boundary), and its settings say it uses a guide."""
    from pipeline.superres import guided_kernel, loo_bandwidth, low_rank_kernel, standardiser

    ctx, q, truth = _two_domain_context()
    std = standardiser(ctx.expr)
    est, settings = guided_kernel(ctx, q, std)
    bw, _ = loo_bandwidth(ctx)
    plain, _ = low_rank_kernel(ctx, q, bw, std)
    assert est.shape == (len(q), 40) and np.isfinite(est).all()
    assert settings.guide_pcs is not None
    near = np.abs(q[:, 0] - 14.5) < 4
    assert np.mean((est - truth)[near] ** 2) < 0.85 * np.mean((plain - truth)[near] ** 2)


def test_guided_kernel_training_pair_never_sees_its_own_value():
    """With ``exclude_self`` (training pairs: the context estimates itself) a location's own
    expression reaches neither its weights nor any guide: changing it leaves its estimate unchanged
    (axes, standardisation and the guide's noise scale held fixed), while a neighbour's estimate moves."""
    from pipeline.superres import GuidedKernel, _guided_estimate, standardiser

    ctx, _, _ = _two_domain_context()
    std = standardiser(ctx.expr)
    _, _, vt = np.linalg.svd((ctx.expr - std[0]) / std[1], full_matrices=False)
    settings = GuidedKernel(bandwidth=3.0, guide_pcs=2, guide_field=1.0, guide_width=1.0, guide_noise=0.5, rank=None,
                            loo_mse=0.0)
    before = _guided_estimate(ctx, ctx.xy, std, vt, settings, exclude_self=True)
    j = 200
    ctx.expr[j] += 5.0
    after = _guided_estimate(ctx, ctx.xy, std, vt, settings, exclude_self=True)
    np.testing.assert_allclose(after[j], before[j], rtol=1e-5, atol=1e-5)
    neighbour = int(np.argsort(((ctx.xy - ctx.xy[j]) ** 2).sum(1))[1])
    assert np.abs(after[neighbour] - before[neighbour]).max() > 1e-3


def test_grid_maps_are_drawn_cell_by_cell(tmp_path, synthetic_slice):
    """A super-resolution grid is drawn as a raster, one cell per grid point (scattered square
    markers leave white lines and a moire there); spots on a hexagonal lattice are not a grid."""
    from pipeline.plotting import lattice_raster, spot_maps

    a = read_slide({"path": synthetic_slice})
    spots = spots_as_locations(a, list(a.var_names)[:3])
    grid = superres_grid(spots.xy, spots.spacing, 2)
    values = grid[:, 0] + 10 * grid[:, 1]
    raster, extent = lattice_raster(grid, values)
    step = spots.spacing / 2
    assert np.isfinite(raster).sum() == len(grid)
    cols = np.round((grid[:, 0] - grid[:, 0].min()) / step).astype(int)
    rows = np.round((grid[:, 1] - grid[:, 1].min()) / step).astype(int)
    np.testing.assert_array_equal(raster[rows, cols], values)
    assert extent[0] == pytest.approx(grid[:, 0].min() - step / 2)
    hexagonal = np.c_[np.arange(40) % 8 + 0.5 * (np.arange(40) // 8 % 2), np.arange(40) // 8 * np.sqrt(3) / 2]
    assert lattice_raster(hexagonal * 100, np.arange(40.0)) is None
    image = np.full((400, 400, 3), 200, np.uint8)
    path = spot_maps(spots.xy, {"measured": spots.expr[:, 0], "grid": (grid, values)}, tmp_path / "m.png",
                     image=image, image_scale=400 / spots.xy.max())
    assert path.stat().st_size > 0


def test_a_saved_model_predicts_another_slide_without_training(tmp_path, synthetic_slice):
    """superres.model_file: a 04_model.pt from another run predicts this slide without training, in the slide's
    own units (its standardiser and image statistics); on the slide it was trained on it gives that run's grid
    exactly. A model for another task, another model name, train.sections beside it, a slide without its
    genes and a file that is no model are refused naming the key."""
    import anndata as ad

    from data.synthetic import make_synthetic_visium
    from pipeline.superres import standardiser
    from train_superres import run_stage

    other = make_synthetic_visium(tmp_path / "other", n_rows=24, n_cols=24, n_genes=300, seed=1)
    quick = ["superres.steps=30", "superres.n_top_genes=30", "superres.patch_cnn.patch_budget=200", "plot.figures=false"]
    trained = tmp_path / "trained"
    run_stage(load_config(ROOT / "configs" / "superres.yaml", quick + [f"data.path={synthetic_slice}"]), trained,
              progress=False)
    model = trained / "04_model.pt"
    again = tmp_path / "again"                   # the model on its own slide: that run's grid, to the last bit
    run_stage(load_config(ROOT / "configs" / "superres.yaml",
                          quick + [f"data.path={synthetic_slice}", f"superres.model_file={model}"]), again,
              progress=False)
    want, got = ad.read_h5ad(trained / "04_superres.h5ad"), ad.read_h5ad(again / "04_superres.h5ad")
    assert list(got.var_names) == list(want.var_names)
    np.testing.assert_array_equal(got.X, want.X)
    m = json.loads((again / "metrics.json").read_text())["superres"]
    assert m["model_file"] == str(model.resolve()) and m["training_pairs"] == {"self": 576}
    # on another slide: its genes in the model's order, its own standardiser; scored under pooling
    cfg = load_config(ROOT / "configs" / "superres.yaml", quick + [f"data.path={other}", f"superres.model_file={model}",
                                                                  "eval.protocol=pooling"])
    out = tmp_path / "other_run"
    run_stage(cfg, out, progress=False)
    grid = ad.read_h5ad(out / "04_superres.h5ad")
    assert list(grid.var_names) == list(want.var_names) and np.isfinite(grid.X).all()
    m = json.loads((out / "metrics.json").read_text())["superres"]
    assert np.isfinite(m["pcc_all"]) and m["seconds_train"] < 30
    scored = ad.read_h5ad(out / "04_eval.h5ad").uns[keys.SCORE_GENES]   # the protocol's genes the model predicts
    assert 0 < m["n_genes"] == len(scored) <= 30 and set(scored) <= set(want.var_names)
    from pipeline.superres import Restorer
    saved, genes = Restorer.load(out / "04_model.pt")       # the copy this run keeps: adapted to this slide
    spots = spots_as_locations(read_slide({"path": other}), genes)
    ctx = make_split(spots, "pooling").context
    np.testing.assert_allclose(saved.std[0], standardiser(ctx.expr)[0], rtol=1e-6)
    for change, expect in ((["eval.protocol=recovery"], "trained for restoring spots from 2x2 super-spots; "
                                                         "eval.protocol=recovery asks for"),
                           (["model.name=diffusion"], "is a trihrge model, but model.name=diffusion"),
                           ([f"train.sections=[{synthetic_slice}]"], "train.sections .* would not be used"),
                           ([f"superres.model_file={synthetic_slice / 'truth.txt'}"], "not a stage-4 model"),
                           ([f"superres.model_file={tmp_path / 'none.pt'}"], "no such file")):
        cfg = load_config(ROOT / "configs" / "superres.yaml",
                          quick + [f"data.path={other}", f"superres.model_file={model}", *change])
        with pytest.raises(InputError, match=expect):
            run_stage(cfg, tmp_path / "refused", progress=False)
    cfg = load_config(ROOT / "configs" / "superres.yaml", quick + [f"data.path={synthetic_slice}",
                                                                  f"superres.model_file={model}"])
    with pytest.raises(InputError, match="is this --out's own model"):      # rewritten by the run it feeds
        run_stage(cfg, trained, progress=False)
    renamed = read_slide({"path": other})
    renamed.var_names = [f"X{g}" for g in renamed.var_names]
    renamed.write_h5ad(tmp_path / "renamed.h5ad")
    cfg = load_config(ROOT / "configs" / "superres.yaml", quick + [f"data.path={tmp_path / 'renamed.h5ad'}",
                                                                  f"superres.model_file={model}"])
    with pytest.raises(InputError, match="the slide lacks 30 of the model's 30 genes"):
        run_stage(cfg, tmp_path / "refused", progress=False)
