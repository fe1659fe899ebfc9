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


def test_joint_run_gives_one_set_of_domains_for_every_section(tmp_path, two_sections):
    from pipeline.metrics import clustering_scores

    out = tmp_path / "joint"
    argv = [str(r) for r in two_sections] + ["--out", str(out), "--device", "cpu"] + \
        [f"--set={k}={'null' if v is None else v}" for k, v in {**QUICK, "plot.umap": True}.items()]
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
    for f in (joint.MARKERS_CSV, joint.MARKERS_FIGURE, joint.EMBEDDING_FIGURE):
        assert (out / f).exists(), f
    assert list(out.glob("config.*.yaml"))    # the config it ran with (named after the script: config.joint.yaml)
    assert result.obsm[keys.EMBEDDING].shape == (result.n_obs, 64) and keys.DENOISED in result.layers
    # a rerun with the same runs and settings is skipped
    cfg = _config(**{"plot.umap": True})
    assert not joint.run_joint(two_sections, cfg, out, "cpu", progress=False)


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
    with pytest.raises(InputError, match="cluster.sweep: not available for joint domains"):
        joint.run_joint(two_sections, _config(**{"cluster.sweep": "[3, 4]"}), tmp_path / "o", "cpu")
    sections = joint.read_sections(two_sections)
    sections["right"] = sections["right"][:, 250:].copy()       # 50 genes of its own only... and 0 shared
    sections["left"] = sections["left"][:, :250].copy()
    with pytest.raises(InputError, match="only 0 modelled genes are shared"):
        joint.joint_slide(sections, cfg)
    with pytest.raises(SystemExit):            # no --out: refused before anything runs
        from pipeline.cli import run_main
        run_main(lambda: joint.main([str(r) for r in two_sections]))
