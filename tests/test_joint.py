"""Joint domains (pipeline/joint.py): one M-STGCN over several sections, domains shared by them."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data import keys  # noqa: E402
from data.errors import InputError  # noqa: E402
from pipeline import api, joint  # noqa: E402
from pipeline.config import load_config  # noqa: E402

QUICK = {"preprocess.n_top_genes": None, "model.epochs": 60, "model.n_clusters": 5}


@pytest.fixture(scope="module")
def two_sections(tmp_path_factory):
    """Two synthetic sections of one tissue (the same genes mark the same domains; counts, image and size differ),
    each a run folder holding its stage 2 (``02_enhanced.h5ad``) as the stage scripts leave it."""
    from data.synthetic import make_synthetic_visium

    root = tmp_path_factory.mktemp("joint")
    runs = []
    for name, seed, size in (("left", 1, 22), ("right", 2, 18)):
        folder = make_synthetic_visium(root / "data" / name, n_rows=size, n_cols=size, n_genes=300, seed=seed,
                                       program_seed=7)
        slide = api.read(folder, truth=folder / "truth.txt")
        enhanced = api.enhance(api.image_features(slide, device="cpu"), settings=QUICK, device="cpu")
        (root / name).mkdir()
        enhanced.write_h5ad(root / name / "02_enhanced.h5ad")
        runs.append(root / name)
    return runs


def _config(**settings):
    return load_config(None, [f"{k}={'null' if v is None else v}" for k, v in {**QUICK, **settings}.items()])


def test_sections_are_put_together_with_no_spatial_edge_between_them(two_sections):
    from pipeline.domains import spatial_graph

    sections = joint.read_sections(two_sections)
    cfg = _config()
    together = joint.joint_slide(sections, cfg)
    sizes = [a.n_obs for a in sections.values()]
    assert together.n_obs == sum(sizes) and list(together.obs[keys.SECTION].cat.categories) == ["left", "right"]
    assert together.obs_names[0] == f"{sections['left'].obs_names[0]}-left"
    assert set(together.uns[keys.SPATIAL_UNS]) == {"left", "right"}
    # each section's spatial graph as it has on its own, at its own spacing, and none across
    graph = spatial_graph(together, cfg).toarray()
    left = np.arange(sizes[0])
    right = np.arange(sizes[0], sum(sizes))
    assert graph[np.ix_(left, right)].sum() == 0
    for name, rows in (("left", left), ("right", right)):
        own = spatial_graph(sections[name], cfg).toarray()
        np.testing.assert_array_equal(graph[np.ix_(rows, rows)], own)
        view = joint.section_view(together, name)
        assert view.uns[keys.SPOT_SPACING] == sections[name].uns[keys.SPOT_SPACING]
        assert joint.barcodes(view, name) == list(sections[name].obs_names)
    # the API gives what the library gives, and leaves the sections as they were
    res = api.joint_domains(sections, settings=QUICK, device="cpu", progress=False)
    assert res.n_obs == together.n_obs and list(res.var_names) == list(together.var_names)
    assert keys.DOMAIN in res.obs and keys.DOMAIN not in sections["left"].obs
    with pytest.raises(InputError, match="two or more sections"):
        api.joint_domains({"left": sections["left"]})
    # image features standardised per section before their joint PCs
    assert together.obsm[keys.IMAGE_ENHANCED].shape[0] == together.n_obs > 0
    assert together.obsm[keys.IMAGE_ENHANCED].shape[1] > 0
    np.testing.assert_array_equal(together.layers[keys.ENHANCED][:sizes[0]],
                                  sections["left"][:, together.var_names].layers[keys.ENHANCED])


def test_per_section_gene_scaling_removes_a_sections_shift_and_scale_in_every_gene(two_sections):
    """joint.gene_scaling=per_section: a section whose enhanced genes are all shifted and scaled (a batch effect of
    that simple kind) gives the network the same input PCs as without it; the default keeps the difference."""
    from pipeline.domains import input_pcs

    together = joint.joint_slide(joint.read_sections(two_sections), _config())
    shifted = together.copy()
    right = (shifted.obs[keys.SECTION] == "right").to_numpy()
    shifted.layers[keys.ENHANCED][right] = 2.0 * shifted.layers[keys.ENHANCED][right] + 1.5
    per_section = _config(**{"joint.gene_scaling": "per_section"})
    np.testing.assert_allclose(input_pcs(shifted, per_section, 0), input_pcs(together, per_section, 0), atol=1e-2)
    assert np.abs(input_pcs(shifted, _config(), 0) - input_pcs(together, _config(), 0)).max() > 0.1
    # one slide: no sections, the option changes nothing; an unknown value is refused
    left = joint.read_sections(two_sections)["left"]
    np.testing.assert_array_equal(input_pcs(left, per_section, 0), input_pcs(left, _config(), 0))
    with pytest.raises(InputError, match="joint.gene_scaling='batch': choose one of together, per_section"):
        input_pcs(together, _config(**{"joint.gene_scaling": "batch"}), 0)


def test_joint_run_gives_one_set_of_domains_for_every_section(tmp_path, two_sections):
    from pipeline.metrics import clustering_scores

    out = tmp_path / "joint"
    argv = [str(r) for r in two_sections] + ["--out", str(out), "--device", "cpu"] + \
        [f"--set={k}={'null' if v is None else v}" for k, v in {**QUICK, "plot.umap": True,
                                                                  "model.posterior_layer": True}.items()]
    joint.main(argv)
    import anndata as ad

    result = ad.read_h5ad(out / joint.OUTPUT)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_sections"] == 2 and metrics["n_spots"] == result.n_obs == 22 * 22 + 18 * 18
    assert set(metrics["sections"]) == {"left", "right"}
    for name, scores in metrics["sections"].items():
        assert scores["ari"] > 0.6, (name, scores["ari"])         # each section's domains found
        assert {"pas", "chaos", "pas_truth", "n_spots", "domain_sizes"} <= set(scores)
        rows = result.obs[keys.SECTION] == name
        csv = (out / joint.section_file(name, "csv")).read_text().splitlines()
        assert csv[0] == "Barcode,M-STGCN domain" and len(csv) == rows.sum() + 1
        assert csv[1].split(",")[0] == result.obs_names[rows.to_numpy()][0][: -len(name) - 1]
        assert (out / joint.section_file(name, "png")).exists()
    # one set of domains: a layer is the same domain in both sections, so pooling the sections loses little
    assert metrics["ari"] > 0.6 and metrics["ari"] == pytest.approx(
        clustering_scores(result.obs[keys.DOMAIN], result.obs[keys.TRUTH])["ari"])
    assert "pas" not in metrics               # the sections' coordinates overlap: coherence per section only
    assert 0 <= metrics["section_mixing"]["other_section_neighbours"] <= 1
    assert metrics["section_mixing"]["if_mixed_at_random"] == pytest.approx(
        2 * 484 * 324 / (808 * 807))
    assert isinstance(metrics["single_section_domains"], dict)
    for f in (joint.MARKERS_CSV, joint.MARKERS_FIGURE, joint.EMBEDDING_FIGURE):
        assert (out / f).exists(), f
    assert list(out.glob("config.*.yaml"))    # the config it ran with (named after the script: config.joint.yaml)
    assert result.obsm[keys.EMBEDDING].shape == (result.n_obs, 64) and keys.DENOISED in result.layers
    post = result.layers[keys.DENOISED_POSTERIOR]           # model.posterior_layer: each spot's neighbours in its section
    assert post.shape == result.shape and np.isfinite(post).all()
    # a rerun with the same runs and settings is skipped
    cfg = _config(**{"plot.umap": True, "model.posterior_layer": True})
    assert not joint.run_joint(two_sections, cfg, out, "cpu", progress=False)


def test_new_clustering_settings_recluster_the_joint_embedding_without_training(tmp_path, two_sections, caplog):
    import logging

    import anndata as ad

    out = tmp_path / "joint"
    assert joint.run_joint(two_sections, _config(), out, "cpu", progress=False)
    first = ad.read_h5ad(out / joint.OUTPUT)
    seconds = json.loads((out / "metrics.json").read_text())["seconds"]
    other = _config(**{"model.n_clusters": 4, "cluster.sweep": "[3, 5]", "model.posterior_layer": "true"})
    with caplog.at_level(logging.INFO, logger="stpipe"):
        assert joint.run_joint(two_sections, other, out, "cpu", progress=False)
    assert "not retrained" in caplog.text and "computed from the saved network" in caplog.text
    again = ad.read_h5ad(out / joint.OUTPUT)
    np.testing.assert_array_equal(again.obsm[keys.EMBEDDING], first.obsm[keys.EMBEDDING])   # the same network
    assert again.uns[keys.MSTGCN]["n_clusters"] == 4
    # the domains a full run with these settings gives, and those api.recluster gives from the first result
    fresh = tmp_path / "fresh"
    assert joint.run_joint(two_sections, other, fresh, "cpu", progress=False)
    full = ad.read_h5ad(fresh / joint.OUTPUT)
    assert list(full.obs[keys.DOMAIN]) == list(again.obs[keys.DOMAIN])
    np.testing.assert_array_equal(full.obsm[keys.EMBEDDING], again.obsm[keys.EMBEDDING])
    np.testing.assert_array_equal(full.layers[keys.DENOISED_POSTERIOR], again.layers[keys.DENOISED_POSTERIOR])
    assert list(api.recluster(first, 4).obs[keys.DOMAIN]) == list(again.obs[keys.DOMAIN])
    # the sweep: each K over every section, scored and drawn per section; K = 5 groups the spots as the first run
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["seconds"] == seconds and metrics["n_clusters"] == 4      # training's time kept
    for name in ("left", "right"):      # the stability is the joint clustering's, the same in every section
        assert set(metrics["sections"][name]["by_k"]) == {"3", "5"}
        assert (out / joint.sweep_figure(name)).exists()
        assert [metrics["sections"][name]["by_k"][k]["stability"] for k in ("3", "5")] == [
            again.uns[keys.SWEEP_STABILITY][k]["stability"] for k in ("3", "5")]
    assert metrics["most_stable_k"] in (3, 5)
    from pipeline.domains import ari_band
    assert metrics["most_stable_k_band"] == ari_band(again.uns[keys.SWEEP_STABILITY][str(metrics["most_stable_k"])]
                                                     ["stability"])
    assert list(again.obs[keys.domain_for_k(5)].astype(str)) == list(first.obs[keys.DOMAIN].astype(str))
    # back to the first settings: the first domains, no sweep left behind
    assert joint.run_joint(two_sections, _config(), out, "cpu", progress=False)
    back = ad.read_h5ad(out / joint.OUTPUT)
    assert list(back.obs[keys.DOMAIN]) == list(first.obs[keys.DOMAIN]) and keys.domain_for_k(5) not in back.obs
    assert keys.DENOISED_POSTERIOR not in back.layers
    metrics = json.loads((out / "metrics.json").read_text())
    for name in ("left", "right"):
        assert not (out / joint.sweep_figure(name)).exists() and "by_k" not in metrics["sections"][name]
    assert not {"most_stable_k", "most_stable_k_band"} & set(metrics) and keys.SWEEP_STABILITY not in back.uns
    (out / "metrics.json").unlink()                 # removed: written again from the saved embedding, not retrained
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="stpipe"):
        assert joint.run_joint(two_sections, _config(), out, "cpu", progress=False)
    assert "values are gone" in caplog.text and "not retrained" in caplog.text
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_clusters"] == first.uns[keys.MSTGCN]["n_clusters"]
    assert metrics["seconds"] == seconds                                # the training's time put back


def test_labels_changed_in_a_section_rescore_the_joint_run_without_training(tmp_path, caplog):
    """A section's labels removed or given again after the joint run (its run rerun with another data.truth, which
    rewrites its 02_enhanced.h5ad and keeps stages 1-2) re-score the joint result from the saved embedding; they do
    not retrain it, as for one slide."""
    import logging

    import anndata as ad

    from data.synthetic import make_synthetic_visium
    from pipeline.runner import run_stages

    runs, settings = [], []
    for name, seed, size in (("left", 1, 16), ("right", 2, 14)):
        folder = make_synthetic_visium(tmp_path / "data" / name, n_rows=size, n_cols=size, n_genes=300, seed=seed,
                                       program_seed=7)
        settings.append(([f"data.path={folder}", "model.epochs=5", "model.n_clusters=5", "preprocess.n_top_genes=null",
                          "plot.figures=false"], folder / "truth.txt"))
        runs.append(tmp_path / name)
        run_stages(load_config(None, settings[-1][0] + [f"data.truth={settings[-1][1]}"]), runs[-1], "cpu",
                   progress=False)
    out, cfg = tmp_path / "joint", _config(**{"model.epochs": 20, "plot.figures": "false"})
    assert joint.run_joint(runs, cfg, out, "cpu", progress=False)
    first, trained = ad.read_h5ad(out / joint.OUTPUT), json.loads((out / "metrics.json").read_text())
    assert {"ari", "pas_truth"} <= set(trained["sections"]["right"])

    def relabel_right(truth):
        run_stages(load_config(None, settings[1][0] + [f"data.truth={truth}"]), runs[1], "cpu", progress=False)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="stpipe"):
            assert joint.run_joint(runs, cfg, out, "cpu", progress=False)
        assert "not retrained" in caplog.text
        result, metrics = ad.read_h5ad(out / joint.OUTPUT), json.loads((out / "metrics.json").read_text())
        np.testing.assert_array_equal(result.obsm[keys.EMBEDDING], first.obsm[keys.EMBEDDING])
        assert list(result.obs[keys.DOMAIN]) == list(first.obs[keys.DOMAIN])
        assert metrics["seconds"] == trained["seconds"]                             # the training's time kept
        return result, metrics

    result, metrics = relabel_right("null")
    right = (result.obs[keys.SECTION] == "right").to_numpy()
    assert result.obs[keys.TRUTH][right].isna().all()
    assert list(result.obs[keys.TRUTH][~right]) == list(first.obs[keys.TRUTH][~right])
    assert "ari" not in metrics["sections"]["right"] and "ari" in metrics["sections"]["left"]
    assert metrics["ari"] == pytest.approx(trained["sections"]["left"]["ari"])     # pooled: left's spots only
    result, metrics = relabel_right(settings[1][1])                               # given back: scored as before
    assert metrics["sections"]["right"]["ari"] == pytest.approx(trained["sections"]["right"]["ari"])
    assert metrics["ari"] == pytest.approx(trained["ari"])
    assert not joint.run_joint(runs, cfg, out, "cpu", progress=False)             # and then up to date
    assert not list(out.glob("*.png"))                                            # plot.figures=false
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="stpipe"):                          # figures on: drawn, not retrained
        assert joint.run_joint(runs, _config(**{"model.epochs": 20}), out, "cpu", progress=False)
    assert "not retrained" in caplog.text and (out / joint.section_file("right", "png")).stat().st_size > 1000


@pytest.mark.parametrize("options", [{}, {"joint.gene_scaling": "per_section", "joint.section_covariate": True}])
def test_a_saved_seed_network_gives_its_training_outputs_on_the_joint_result(tmp_path, two_sections, options):
    """With model.n_seeds > 1 a re-clustering that keeps another seed takes its outputs from that seed's saved
    network, run again on 03_domains.h5ad: the input PCs, the section-aware graphs and (with
    joint.section_covariate) the section codes built from the file must be those it was trained on (the PCs once
    differed: anndata.concat leaves the layers in Fortran order)."""
    import anndata as ad

    from pipeline.domains import decoder_rates, saved_decoder_outputs, saved_network_outputs

    cfg = _config(**{"model.n_seeds": 2, **options})
    networks = []
    res = joint.joint_domains(joint.read_sections(two_sections), cfg, "cpu", progress=False, networks=networks)
    res.write_h5ad(tmp_path / "joint.h5ad")
    back = ad.read_h5ad(tmp_path / "joint.h5ad")
    trained = np.split(np.asarray(back.obsm[keys.EMBEDDING_SEEDS]), len(networks), axis=1)
    for net, embedding in zip(networks, trained):
        np.testing.assert_array_equal(saved_network_outputs(back, cfg, net["state"])["embedding"], embedding)
    kept = [int(s) for s in back.uns[keys.MSTGCN]["seeds"]].index(int(back.uns[keys.MSTGCN]["seed_kept"]))
    rerun = saved_network_outputs(back, cfg, networks[kept]["state"])
    rate = decoder_rates(rerun["log_rate"])[1]
    assert np.abs(rate - np.asarray(back.layers[keys.DENOISED_MEAN])).max() < 1e-5    # the decoder as trained
    decoded = saved_decoder_outputs(back, cfg, networks[kept]["state"])      # the decoder alone, on obsm['embedding']
    for k in ("log_rate", "theta", "pi_logits"):
        np.testing.assert_array_equal(decoded[k], rerun[k])


def test_joint_domains_can_cluster_every_seeds_embedding_together(two_sections):
    """cluster.seeds=together on a joint run: the domains cluster every seed's embedding side by side (over every
    section's spots), and the joint metrics measure the sections' mixing in that embedding."""
    from pipeline.domains import cluster_embedding, domain_embedding, spatial_graph

    cfg = _config(**{"model.n_seeds": 2, "cluster.seeds": "together"})
    res = joint.joint_domains(joint.read_sections(two_sections), cfg, "cpu", progress=False)
    assert res.uns[keys.MSTGCN]["domains_from"] == "together"
    embedding, seed = domain_embedding(res)
    np.testing.assert_array_equal(embedding, res.obsm[keys.EMBEDDING_SEEDS])
    k = int(res.uns[keys.MSTGCN]["n_clusters"])
    want = cluster_embedding(embedding, spatial_graph(res, cfg), k, cfg, seed)[1]
    assert res.obs[keys.DOMAIN].astype(int).tolist() == want.tolist()
    assert 0 <= joint.joint_metrics(res, "cpu")["section_mixing"]["other_section_neighbours"] <= 1


def test_sections_that_lie_apart_are_measured_and_warned_about(caplog):
    """Without labels: how far the sections mix in the embedding (against random mixing), which domains are one
    section's own, and a warning naming the batch-correcting options when there are such domains."""
    import logging

    import anndata as ad
    import pandas as pd

    from pipeline.metrics import section_mixing

    apart = np.r_[np.arange(4.0), 100 + np.arange(4.0)][:, None]
    sections = ["a"] * 4 + ["b"] * 4
    mixing = section_mixing(apart, sections, k=3)
    assert mixing == {"other_section_neighbours": 0.0, "if_mixed_at_random": pytest.approx(2 * 4 * 4 / (8 * 7))}
    interleaved = np.arange(8.0)[:, None]
    assert section_mixing(interleaved, ["a", "b"] * 4, k=2)["other_section_neighbours"] > 0.8
    assert np.isnan(section_mixing(apart, ["a"] * 8)["other_section_neighbours"])
    obs = pd.DataFrame({keys.DOMAIN: pd.Categorical(["0"] * 10 + ["1"] * 10 + ["2"] * 20),
                        keys.SECTION: pd.Categorical(["a"] * 10 + ["b"] * 10 + ["a", "b"] * 10)},
                       index=[str(i) for i in range(40)])
    own = joint.single_section_domains(ad.AnnData(obs=obs))
    assert own == {"0": "a", "1": "b"}
    with caplog.at_level(logging.WARNING, logger="stpipe"):
        joint.warn_if_apart({"single_section_domains": own, "n_clusters": 3, "section_mixing": mixing})
    assert "2 of 3 domains lie in one section only (0 in a, 1 in b)" in caplog.text
    assert "joint.gene_scaling=per_section" in caplog.text and "joint.section_covariate=true" in caplog.text
    caplog.clear()
    joint.warn_if_apart({"single_section_domains": {}, "n_clusters": 3, "section_mixing": mixing})
    assert not caplog.text


def test_bad_joint_input_is_refused_with_the_fix(tmp_path, two_sections):
    cfg = _config()
    with pytest.raises(InputError, match="two or more sections"):
        joint.run_joint(two_sections[:1], cfg, tmp_path / "o", "cpu")
    twin = tmp_path / "x" / two_sections[0].name
    twin.mkdir(parents=True)
    with pytest.raises(InputError, match="two runs are named 'left'"):
        joint.run_joint([two_sections[0], twin], cfg, tmp_path / "o", "cpu")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match=r"empty/02_enhanced.h5ad: not found .* run stages 1-2"):
        joint.run_joint([two_sections[0], empty], cfg, tmp_path / "o", "cpu")
    with pytest.raises(InputError, match="one of the runs"):
        joint.run_joint(two_sections, cfg, two_sections[1], "cpu")
    sections = joint.read_sections(two_sections)
    sections["right"] = sections["right"][:, 250:].copy()       # 50 genes of its own only... and 0 shared
    sections["left"] = sections["left"][:, :250].copy()
    with pytest.raises(InputError, match="only 0 modelled genes are shared"):
        joint.joint_slide(sections, cfg)
    with pytest.raises(SystemExit):            # no --out: refused before anything runs
        from pipeline.cli import run_main
        run_main(lambda: joint.main([str(r) for r in two_sections]))
