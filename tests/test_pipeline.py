"""Config, CLI contract, reruns, the --demo run and a real DLPFC slice end to end."""
import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from conftest import ROOT, shared
from data import keys
from data.errors import InputError
from pipeline.config import load_config, parse_override


# the shipped configs name ../shared/data, which a fresh clone lacks: setup() alone, with no input to check
NO_INPUTS = ["--set", "data.path=null", "--set", "data.truth=null"]


def run(*args, check=True):
    p = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(p.stderr[-3000:])
    return p


def test_set_overrides_are_yaml_and_checked():
    assert parse_override("model.n_clusters=7") == {"model": {"n_clusters": 7}}
    cfg = load_config(ROOT / "configs" / "dlpfc.yaml", ["image.options={scales: [1, 2]}", "data.image=null"])
    assert cfg["image"]["options"] == {"scales": [1, 2]} and cfg["data"]["image"] is None
    with pytest.raises(InputError, match="unknown config key 'model.n_clusterz'"):
        load_config(None, ["model.n_clusterz=3"])
    # every section is checked, the data keys and the top level too (a typo used to run on the defaults)
    for typo, fix in (("data.pth=x", "data.path"), ("modle.n_clusters=3", "model"),
                      ("train.section=[]", "train.sections")):
        with pytest.raises(InputError, match=f"did you mean '{fix}'"):
            load_config(None, [typo])
    assert load_config(None, ["image.options={arch: resnet50, init_values: 0.1}"])["image"]["options"]["arch"] \
        == "resnet50"                                           # free-form options stay free
    with pytest.raises(InputError) as err:
        load_config(None, ["data.path=[unclosed"])
    assert "\n" not in str(err.value)
    # values of the wrong type stop at once, not deep inside numpy or scikit-learn
    for bad, expect in (("model.n_clusters=abc", "whole number"), ("seed=-1", "negative"),
                        ("graph.gene_k=2.5", "whole number"), ("enhance.alpha=high", "a number"),
                        ("image.check_tissue=maybe", "true or false"),
                        # a count of 0 (n_top_genes=0 used to mean every gene; eval_every=0 divided by zero)
                        ("preprocess.n_top_genes=0", "at least 1 .*null selects every gene"),
                        ("superres.eval_every=0", "at least 1"), ("model.epochs=0", "at least 1"),
                        # probabilities and shares out of range (dropout=1.5 was a torch traceback)
                        ("model.dropout=1.5", r"\[0, 1\)"), ("predict.patch_cnn.dropout=1", r"\[0, 1\)"),
                        ("predict.patch_cnn.weight=1.2", r"\[0, 1\]"), ("superres.val_fraction=1", r"\[0, 1\)"),
                        ("model.decoder_batch=1", "at least 2"),       # was a BatchNorm traceback
                        ("predict.patch_cnn.batch=1", "never trained"), ("superres.patch_cnn.batch=1", "at least 2"),
                        # n_clusters=1 was refused only after stages 1-2; a size or resolution of 0 not here
                        ("model.n_clusters=1", "at least 2"), ("wsi.mpp=0", "greater than 0"),
                        ("image.patch_size_fullres=0", "greater than 0"),
                        ("enhance.radius=1000", "at most 10 spot spacings"),
                        ("enhance.radius=0.2", "at least 1 .*no spot has a neighbour"),   # ran, with an empty graph
                        ("enhance.sigma=0", "at least 0.1"), ("enhance.sigma=0.001", "at least 0.1"),     # the same
                        # a wrong word: refused here, not when its stage comes (enhance.kernel after stage 1)
                        ("enhance.kernel=box", "choose one of gaussian, uniform"),
                        ("cluster.covariance=EEE", "choose one of tied, full"), ("wsi.grid=hexa", "auto, square, hex"),
                        ("model.decoder_start=data", "choose one of zero, genes"),
                        ("superres.patch_cnn.use=1", "choose one of auto, true, false"),
                        ("predict.patch_cnn.use=sometimes", "choose one of auto, true, false"),
                        # ran silently: a learning rate of 0 trains nothing; one fold cross-fits nothing
                        ("superres.lr=0", "greater than 0"), ("predict.patch_cnn.lr=0", "random start"),
                        ("superres.patch_cnn.folds=1", "at least 2"),
                        # sizes in pixels far beyond sense: arrays of terabytes failed deep in NumPy
                        ("superres.sampling_steps=5000", "more than superres.diffusion_steps=200"),   # ran for minutes
                        ("model=5", "model is a section of settings"),    # an AttributeError once a stage ran
                        ("image.options=3", "set its keys, e.g. --set image.options.KEY=VALUE"),
                        ("graph.gene_k=100000", "at most 100 .*dense"),     # ran: a complete graph, n^2 edges
                        ("wsi.tile_px=1000000", "at most 16384"), ("wsi.tile_px=8", "at least 256"),
                        ("superres.patch_cnn.px=100000", "at most 512"), ("predict.patch_cnn.px=8", "at least 16"),
                        # every loss term of a decoder at 0: its random output was written as the result
                        ("model.zinb_weight=0", "nothing would train the ZINB decoder"),
                        ("eval.protocol=recover", "choose one of recovery, pooling or null")):
        with pytest.raises(InputError, match=expect):
            load_config(None, [bad])
    cfg = load_config(None, ["model.n_clusters=7", "enhance.alpha=1", "superres.patch_cnn.use=false",
                             "preprocess.n_top_genes=null", "seed=0", "preprocess.min_spots=0", "predict.n_gcn=0"])
    assert cfg["model"]["n_clusters"] == 7 and cfg["enhance"]["alpha"] == 1
    with pytest.raises(InputError, match="mse_weight=0 and predict.pcc_weight=0: nothing would train the GCN decoder"):
        load_config(None, ["predict.mse_weight=0", "predict.pcc_weight=0"])
    load_config(None, ["predict.mse_weight=0", "predict.align_weight=0", "model.spatial_weight=0"])   # one term left
    # 1e-4 is a number, on the command line and in a config file (PyYAML alone reads it as a string)
    assert load_config(None, ["model.lr=1e-4", "predict.lr=2E-3"])["model"]["lr"] == 1e-4
    assert parse_override("data.name=1e5x") == {"data": {"name": "1e5x"}}
    # the defaults decide a key's type and the keys of a mapping, not what a config file or an earlier
    # --set made of them (use: false in a file refused --set ...use=auto as "expected true or false")
    cfg = load_config(None, ["superres.patch_cnn.use=false", "superres.patch_cnn.use=auto",
                             "image.options={scales: [1, 2]}", "image.options.size=16"])
    assert cfg["superres"]["patch_cnn"]["use"] == "auto" and cfg["image"]["options"] == {"scales": [1, 2], "size": 16}
    with pytest.raises(InputError, match=r"expected a whole number \(default 3000\)"):
        load_config(None, ["preprocess.n_top_genes=null", "preprocess.n_top_genes=x"])
    from pipeline.config import choices
    from pipeline.preprocess import GENE_FLAVORS
    assert choices("preprocess.flavor") == GENE_FLAVORS
    # a single word for a list key is a one-item list (it was iterated letter by letter: superres.genes=MOBP
    # asked for genes M, O, B, P; data.truth_missing=Layer1 left Layer1 annotated)
    cfg = load_config(None, ["superres.genes=MOBP", "plot.genes=MOBP, PCP4", "data.truth_missing=not annotated"])
    assert cfg["superres"]["genes"] == ["MOBP"] and cfg["plot"]["genes"] == ["MOBP", "PCP4"]
    assert cfg["data"]["truth_missing"] == ["not annotated"]
    with pytest.raises(InputError, match="expected a list of names"):
        load_config(None, ["predict.genes={ERBB2: 1}"])



def test_a_key_given_twice_in_a_config_file_is_refused(tmp_path):
    """PyYAML keeps the last of two equal keys: a second ``model:`` section silently dropped the first's
    n_clusters. Refused with both lines named; YAML merge keys (``<<``) still work."""
    twice = tmp_path / "twice.yaml"
    twice.write_text("model:\n  n_clusters: 7\nenhance:\n  alpha: 1\nmodel:\n  lr: 0.01\n")
    with pytest.raises(InputError, match=r"twice.yaml: .*key 'model' is given twice \(lines 1 and 5\)") as err:
        load_config(twice)
    assert "\n" not in str(err.value) and "unicode string" not in str(err.value)
    merged = tmp_path / "merged.yaml"
    merged.write_text("model: &m\n  n_clusters: 7\nsuperres:\n  patch_cnn:\n    <<: {use: false}\n    px: 32\n")
    cfg = load_config(merged)
    assert cfg["model"]["n_clusters"] == 7 and cfg["superres"]["patch_cnn"]["use"] is False
    # a section left empty (its keys commented out) keeps the defaults; a section given a value is refused
    empty = tmp_path / "empty.yaml"
    empty.write_text("model:\n#  n_clusters: 7\npredict:\n")
    assert load_config(empty)["model"] == load_config(None)["model"]
    empty.write_text("model: 7\n")
    with pytest.raises(InputError, match="model=7: model is a section of settings"):
        load_config(empty)
    # --config given a folder or a binary file: one line, not IsADirectoryError / UnicodeDecodeError
    with pytest.raises(InputError, match="a folder, not a config file.*dlpfc.yaml"):
        load_config(ROOT / "configs")
    (tmp_path / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    with pytest.raises(InputError, match="cannot be read as a YAML config"):
        load_config(tmp_path / "image.png")


def test_configs_read_the_same_with_libyaml_as_with_pure_python_yaml():
    """Configs are parsed with libyaml (PyYAML's C parser, ~10 times faster on configs/defaults.yaml, which
    every config load reads): every shipped config and a set of values read the same as with the pure-Python
    parser, and a text libyaml refuses gets the pure-Python parser's error, which quotes its line."""
    import yaml

    from pipeline.config import ConfigLoader, PythonConfigLoader, yaml_value
    texts = [p.read_text() for p in sorted((ROOT / "configs").glob("*.yaml"))]
    texts += ["1e-4", "-1.5E+3", "'1e-4'", "1e5x", "0x1F", "1_000", "yes", "~", ".inf", "[1, 2]", "{a: 1e-3, b: null}",
              "MOBP, PCP4", "5-8", "m: &m {x: 1}\nn: {<<: *m, y: 2}\n", ""]
    for text in texts:
        got = yaml.load(text, Loader=ConfigLoader)                        # noqa: S506 -- SafeLoader subclasses
        want = yaml.load(text, Loader=PythonConfigLoader)                 # noqa: S506
        assert got == want and type(got) is type(want), text[:40]
    for bad, line in (("a: b: c\n", "a: b: c"), ("model:\n  x: 1\nmodel:\n  y: 2\n", "line 3, column 1:\n    model:"),
                      ("[unclosed", "column 1:\n    [unclosed")):
        with pytest.raises(yaml.YAMLError) as err:
            yaml_value(bad)
        with pytest.raises(yaml.YAMLError) as python_err:
            yaml.load(bad, Loader=PythonConfigLoader)                     # noqa: S506
        assert str(err.value) == str(python_err.value) and line in str(err.value)
    assert not yaml.__with_libyaml__ or issubclass(ConfigLoader, yaml.CSafeLoader)


def test_out_that_is_a_file_is_refused(tmp_path):
    """--out naming an existing file (a typo for its folder) is refused as such, in one line; an empty --out
    too (it wrote into output.dir)."""
    from pipeline.cli import build_parser, setup
    (tmp_path / "results").write_text("not a folder")
    args = build_parser("test").parse_args(["--out", str(tmp_path / "results")])
    with pytest.raises(InputError, match="results: a file, not a folder; --out names the folder"):
        setup(args)
    with pytest.raises(InputError, match="--out is empty"):            # `--out "$OUT"` with OUT unset
        setup(build_parser("test").parse_args(["--out", " "]))


def test_choice_keys_with_a_wrong_value_name_the_choices(synthetic_slice):
    """A misspelt choice stops with the valid ones, before training (a wrong GMM covariance type used to
    end, after the whole M-STGCN training, in a scikit-learn traceback)."""
    from image_process.patches import choose_image
    from pipeline.clustering import check_covariance
    from data.readers import read_slide

    a = read_slide({"path": synthetic_slice})
    with pytest.raises(InputError, match="choose auto, fullres, hires, lowres or none"):
        choose_image(a, "hirez")
    with pytest.raises(InputError, match="has no fullres image .it has: hires, lowres"):
        choose_image(a, "fullres")
    with pytest.raises(InputError, match="choose one of tied, full, diag, spherical"):
        check_covariance("ful")


def test_model_name_picks_each_scripts_model(tmp_path):
    """``model.name`` (the issues' key) names the model of the script; its stage-4 alias agrees."""
    from pipeline.config import model_name
    from train_superres import superres_model

    sr = ROOT / "configs" / "superres.yaml"
    assert superres_model(load_config(sr)) == "trihrge"
    assert superres_model(load_config(sr, ["model.name=diffusion"])) == "diffusion"
    assert superres_model(load_config(sr, ["superres.model=diffusion"])) == "diffusion"
    with pytest.raises(InputError, match="set only one"):
        superres_model(load_config(sr, ["model.name=trihrge", "superres.model=diffusion"]))
    with pytest.raises(InputError, match="model.name='mstgcn': this script runs 'trihrge' or 'diffusion'"):
        superres_model(load_config(sr, ["model.name=mstgcn"]))
    assert model_name(load_config(ROOT / "configs" / "dlpfc.yaml"), ("mstgcn",), "mstgcn") == "mstgcn"
    # a stage-4 model given to the stages 1-3 runner stops before stage 1, in one line
    p = run("run_dlpfc.py", "--demo", "--out", str(tmp_path / "x"), "--set", "model.name=diffusion", check=False)
    assert p.returncode == 2 and p.stderr.strip() == "error: model.name='diffusion': this script runs 'mstgcn'."
    assert not (tmp_path / "x" / "01_image_features.npy").exists()
    # the default config of a script is found from any working folder
    q = subprocess.run([sys.executable, str(ROOT / "predict_expression.py"), "--out", str(tmp_path / "y"),
                        "--set", "model.name=diffusion"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert q.returncode == 2 and "this script runs 'hespotex'" in q.stderr


def test_the_demo_slice_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """cv2.imwrite's False on a full disk was ignored: the demo slice lost its hires image without a word, and the
    folder (its truth.txt written) was trusted by every later --demo, which then ran on the lowres image. The slide
    is now written whole or not at all, a full disk is one error naming it, and a folder cut short before is made
    again."""
    import errno

    from data import synthetic
    from data.errors import OutputError
    from pipeline.demo import demo_slice

    real, small = synthetic.write_png, dict(n_rows=6, n_cols=6, n_genes=20)

    def full_disk(path, rgb):
        if "hires" in Path(path).name:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, rgb)

    monkeypatch.setattr(synthetic, "write_png", full_disk)
    with pytest.raises(OutputError, match="demo_slice: the disk filled up while writing it"):
        demo_slice(tmp_path, **small)
    assert list(tmp_path.iterdir()) == []              # neither the slide nor its temporary folder
    monkeypatch.setattr(synthetic, "write_png", real)
    folder = demo_slice(tmp_path, **small)
    assert all((folder / f).is_file() for f in synthetic.SYNTHETIC_VISIUM_FILES)
    (folder / "spatial" / "tissue_hires_image.png").unlink()       # cut short before (its truth.txt is there)
    assert demo_slice(tmp_path, **small) == folder and (folder / "spatial" / "tissue_hires_image.png").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["demo_slice"]


def test_stage4_and_stage5_demos_use_generated_slides(tmp_path):
    """--demo of train_superres.py / predict_expression.py: the config's inputs replaced by synthetic
    slides (stage 5: two sections of one synthetic tissue, so a model of one applies to the other)."""
    from data.readers import read_slide
    from pipeline.demo import prepare_predict_demo, prepare_superres_demo

    cfg4 = prepare_superres_demo(load_config(ROOT / "configs" / "superres.yaml"), tmp_path)
    assert cfg4["data"]["path"] == str(tmp_path / "demo_slice") and cfg4["data"]["image"] is None
    assert cfg4["eval"]["protocol"] == "recovery" and cfg4["train"]["sections"] == []
    cfg5 = prepare_predict_demo(load_config(ROOT / "configs" / "predict.yaml"), tmp_path)
    (train,), (test,) = cfg5["train"]["sections"], cfg5["test"]["sections"]
    a, b = read_slide({"path": train["path"]}), read_slide({"path": test["path"]})
    assert a.n_obs == b.n_obs == 24 * 24 and not np.array_equal(a.X.toarray(), b.X.toarray())
    truth_a = pd.read_csv(Path(train["path"]) / "truth.txt", sep="\t", header=None, index_col=0)[1]
    truth_b = pd.read_csv(Path(test["path"]) / "truth.txt", sep="\t", header=None, index_col=0)[1]
    def domain_profiles(x, truth):     # mean log1p(CP10k) per domain and gene
        logn = np.log1p(1e4 * x.X.toarray() / x.X.toarray().sum(1, keepdims=True))
        return np.stack([logn[(truth.reindex(x.obs_names) == d).to_numpy()].mean(0) for d in sorted(set(truth))])
    pa, pb = domain_profiles(a, truth_a), domain_profiles(b, truth_b)
    contrast = lambda p: (p - p.mean(0)).ravel()         # which genes mark which domain
    assert np.corrcoef(contrast(pa), contrast(pb))[0, 1] > 0.6      # 0.85 here; -0.02 with unshared programmes
    shown = subprocess.run([sys.executable, str(ROOT / "predict_expression.py"), "--demo", "--show-config"],
                           capture_output=True, text=True, cwd=ROOT)
    assert shown.returncode == 0 and "--demo: the inputs below" in shown.stdout


def test_demo_says_which_set_inputs_it_does_not_use(caplog):
    """--demo replaces the inputs: a --set of one (``--demo --set data.truth=mine.txt`` scored against the
    demo's own labels) is named as unused; other keys are not."""
    from pipeline.demo import warn_replaced_overrides

    with caplog.at_level("WARNING", logger="stpipe"):
        warn_replaced_overrides(["data.truth=mine.txt", "test.sections=[{path: x}]", "model.epochs=5",
                                 "data.truth_missing=[NA]"])
    assert "--set data.truth=mine.txt is not used" in caplog.text
    assert "--set test.sections=[{path: x}] is not used" in caplog.text
    assert "model.epochs" not in caplog.text and "truth_missing" not in caplog.text


def test_inputs_a_script_does_not_read_are_named(tmp_path, caplog, monkeypatch):
    """predict_expression.py --set data.path=mine predicted the config's test sections and never read mine,
    without a word; stages 1-3 and 4 ignore test.sections alike. Each input set that the script does not read
    is now named in a warning, and its files are not checked (a stale data.path does not stop stage 5)."""
    from pipeline.cli import build_parser, setup

    def warnings_of(script, reads, *sets):
        monkeypatch.setattr("sys.argv", [script])
        args = build_parser("x").parse_args(["--out", str(tmp_path / "out")] + [a for s in sets for a in ("--set", s)])
        caplog.clear()
        with caplog.at_level("WARNING", logger="stpipe"):
            setup(args, reads=reads)
        return [r.getMessage() for r in caplog.records]

    said = warnings_of("predict_expression.py", ("train", "test"), "data.path=/nonexistent/mine")
    assert said == ["predict_expression reads train.sections and test.sections: data.path=/nonexistent/mine is set "
                    "but not used (a slide to predict is a test section: --set 'test.sections=[{path: ...}]')"]
    assert warnings_of("train_superres.py", ("data", "train"), "data.path=null", "test.sections=[{path: a}]") == \
        ["train_superres reads data.* and train.sections: test.sections is set but not used"]
    assert warnings_of("run_dlpfc.py", ("data",), "data.path=null", "train.sections=[{path: a}]") == \
        ["run_dlpfc reads data.*: train.sections is set but not used"]
    assert warnings_of("predict_expression.py", ("train", "test"), "test.sections=[{path: a}]") == []
    with pytest.raises(InputError, match="no such file or folder .data.path."):     # read: checked as before
        warnings_of("run_dlpfc.py", ("data",), "data.path=/nonexistent/mine")


def test_demo_end_to_end_and_rerun(tmp_path):
    out = tmp_path / "demo"
    run("run_dlpfc.py", "--demo", "--out", str(out), "--set", "model.epochs=80", "--device", "cpu")
    m = json.loads((out / "metrics.json").read_text())
    assert m["ari"] > 0.6 and m["n_clusters"] == 5 and m["device"] == "cpu"
    assert 0 < m["chaos"] < m["chaos_unrefined"] * 1.5 and 0 <= m["pas"] <= m["pas_unrefined"] < 0.1   # label-free
    assert m["pas_truth"] < 0.1 and m["chaos_truth"] > 0
    assert sum(m["domain_sizes"].values()) == m["n_spots"] and len(m["domain_sizes"]) == 5
    assert set(m["seconds"]) == {"image_features", "enhancement", "domains"}
    assert 0.1 < m["peak_memory_gb"] < 8 and "cuda_peak_gb" not in m
    assert len(m["software"]["code"]) == 16 and m["software"]["torch"] and m["software"]["scanpy"]
    a = ad.read_h5ad(out / "03_domains.h5ad")
    assert a.obs[keys.DOMAIN].dtype.name == "category"
    # scanpy/squidpy plots take the figure's colours: each domain in the colour of its matched layer
    from pipeline.stage_domains import label_colors
    from pipeline.plotting import scanpy_colors
    colors = label_colors(a)
    assert list(a.uns["domain_colors"]) == scanpy_colors(a.obs[keys.DOMAIN].cat.categories, colors["M-STGCN domains"])
    assert len(a.uns["truth_colors"]) == len(a.obs[keys.TRUTH].cat.categories)
    assert set(a.uns["domain_colors"]) & set(a.uns["truth_colors"])
    assert a.obsm[keys.EMBEDDING].shape == (a.n_obs, 64)
    assert keys.UMAP not in a.obsm and not (out / "03_embedding.png").exists()     # plot.umap: off by default
    from pipeline.stage_domains import background_image       # 03_domains.png shows it beside the domains
    he, scale = background_image(a)
    assert he.ndim == 3 and scale == a.uns[keys.SPATIAL_UNS]["demo"]["scalefactors"]["tissue_hires_scalef"]
    assert a.layers[keys.DENOISED].shape == a.shape
    theta = a.var[keys.ZINB_THETA].to_numpy()             # each gene's refit dispersion, inside the search's range
    assert np.isfinite(theta).all() and theta.min() >= 0.0099 and theta.max() <= 1000.0 and theta.std() > 0
    assert a.obsm[keys.SPATIAL].shape == (a.n_obs, 2)
    from pipeline.metrics import morans_i           # the spatially variable genes, ranked on the measured values
    np.testing.assert_allclose(a.var[keys.MORANS_I], morans_i(a.layers[keys.LOGNORM], a.obsm[keys.SPATIAL]), rtol=1e-5)
    assert a.var[keys.MORANS_I].max() > 0.3 and abs(a.var[keys.MORANS_I].median()) < 0.05     # a few domain genes
    csv = pd.read_csv(out / "03_domains.csv", dtype=str)             # Loupe Browser's clustering layout
    assert list(csv.columns) == ["Barcode", "M-STGCN domain"] and list(csv["Barcode"]) == list(a.obs_names)
    assert list(csv["M-STGCN domain"]) == list(a.obs[keys.DOMAIN].astype(str))
    feats = np.load(out / "01_image_features.npy")
    assert feats.shape[0] == a.n_obs and (out / "01_image_features.spots.txt").exists()
    for png in ("01_image_features.png", "02_enhanced.png", "03_domains.png", "03_denoised.png"):
        assert (out / png).stat().st_size > 1000
    import yaml
    used = yaml.safe_load((out / "config.run_dlpfc.yaml").read_text())     # the config the run used
    assert used["model"]["epochs"] == 80 and used["data"]["path"] == str(out / "demo_slice")
    p = run("run_dlpfc.py", "--demo", "--set", "model.epochs=7", "--show-config", "--out", str(tmp_path / "none"))
    assert yaml.safe_load(p.stdout)["model"]["epochs"] == 7 and not (tmp_path / "none").exists()
    # rerun: every stage is skipped; --set of a stage-3 key redoes stage 3 only
    before = (out / "03_domains.h5ad").stat().st_mtime_ns
    p = run("run_dlpfc.py", "--demo", "--out", str(out), "--set", "model.epochs=80", "--device", "cpu")
    assert p.stderr.count("up to date, skipped") == 3
    assert (out / "03_domains.h5ad").stat().st_mtime_ns == before
    # only plot.genes changed: the figure is redrawn from 03_domains.h5ad, nothing is retrained
    png = (out / "03_denoised.png").stat().st_mtime_ns
    p = run("run_dlpfc.py", "--demo", "--out", str(out), "--set", "model.epochs=80", "--device", "cpu",
            "--set", f"plot.genes=[{a.var_names[0]}]")
    assert "figures redrawn" in p.stderr and p.stderr.count("up to date, skipped") == 2
    assert (out / "03_domains.h5ad").stat().st_mtime_ns == before and (out / "03_denoised.png").stat().st_mtime_ns > png
    p = run("run_dlpfc.py", "--demo", "--out", str(out), "--set", "model.epochs=2", "--device", "cpu")   # a quick retrain
    assert p.stderr.count("up to date, skipped") == 2
    # each run's log lines are appended to log.run_dlpfc.txt, under a header naming its command line
    text = (out / "log.run_dlpfc.txt").read_text()
    assert text.count("=== ") == 4 and text.count("--demo --out") == 4 and "model.epochs=2 --device cpu" in text
    assert text.count("INFO stage 3 (M-STGCN domains): 5 domains in") == 2 and text.count("up to date, skipped") == 7
    p = run("run_dlpfc.py", "--demo", "--out", str(out), "--set", "image.use=fullres", check=False)
    assert p.returncode == 2
    assert (out / "log.run_dlpfc.txt").read_text().rstrip().endswith(p.stderr.strip().splitlines()[-1])   # its error


def test_a_rerun_drops_the_scores_its_stage_no_longer_backs(tmp_path):
    """metrics.json is shared by the stages: a stage-3 rerun without truth kept the last run's ari and nmi
    (printed in the run's "done" line, beside domains they never scored). A stage's keys of its last
    run that this run does not write are dropped; other stages' keys stay."""
    from pipeline import stages

    stages.update_metrics(tmp_path, {"n_spots": 10, "spot_spacing_px": 3.0}, {"enhancement": 1.0}, stage="enhancement")
    stages.update_metrics(tmp_path, {"n_spots": 10, "ari": 0.5, "nmi": 0.6}, {"domains": 2.0}, stage="domains")
    m = stages.update_metrics(tmp_path, {"n_spots": 10, "n_clusters": 4}, {"domains": 2.5}, stage="domains")
    assert "ari" not in m and "nmi" not in m and m["n_clusters"] == 4 and m["spot_spacing_px"] == 3.0
    assert m["seconds"] == {"enhancement": 1.0, "domains": 2.5}
    assert json.loads((tmp_path / "metrics.json").read_text()) == m


@pytest.mark.parametrize("damage", [b"\xff\xfe\x00garbage", b"[1, 2]"])
def test_damaged_stamps_and_metrics_are_redone_not_a_traceback(tmp_path, caplog, damage):
    """A stamp or metrics.json holding bytes that are not UTF-8 text (a disk fault, a crash outside the
    pipeline's atomic writes) ended a rerun in a UnicodeDecodeError, and valid JSON that is not a mapping in
    an AttributeError: the stage is redone, the metrics started again, a later stage warned."""
    from pipeline import stages

    (tmp_path / "out.txt").write_text("x")
    stages.write_stamp(tmp_path, "enhancement", "fp1")
    assert stages.is_fresh(tmp_path, "enhancement", "fp1", ["out.txt"]) and stages.read_stamp(tmp_path, "enhancement") == "fp1"
    (tmp_path / stages.STAMP_DIR / "enhancement.json").write_bytes(damage)
    assert not stages.is_fresh(tmp_path, "enhancement", "fp1", ["out.txt"])
    assert stages.read_stamp(tmp_path, "enhancement") is None
    with caplog.at_level("WARNING"):
        stages.check_upstream(tmp_path, "enhancement", "fp1", tmp_path / "out.txt", "run_enhancement.py")
    assert "no readable record of what it was made from" in caplog.text
    (tmp_path / "metrics.json").write_bytes(damage)
    m = stages.update_metrics(tmp_path, {"n_spots": 10}, {"enhancement": 1.0}, stage="enhancement")
    assert m["n_spots"] == 10 and json.loads((tmp_path / "metrics.json").read_text()) == m


def test_stages_4_and_5_share_a_folder_without_losing_other_stages_metrics(tmp_path, caplog):
    """Stage 4 run into stages 1-3's --out overwrote stage 2's n_genes_modelled, stage 5 stage 4's pcc_all
    without a word, and a stage-4 rerun without a protocol then removed stage 5's scores as its own stale
    ones. The top level keeps the issues' contract keys (the last writer's), stage 4 and 5 also keep
    their own copy under 'superres' / 'predict', a replaced value is named in a warning, and a stage only
    drops keys it wrote last."""
    from pipeline import stages

    stages.update_metrics(tmp_path, {"n_spots": 10, "n_genes_modelled": 3000}, stage="enhancement")
    stages.update_metrics(tmp_path, {"model": "trihrge", "n_genes_modelled": 250, "pcc_all": 0.4}, stage="superres",
                          section="superres", section_only=("n_genes_modelled",))
    with caplog.at_level("WARNING", logger="stpipe"):
        stages.update_metrics(tmp_path, {"model": "hespotex", "pcc_all": 0.2}, stage="predict", section="predict")
    assert "stage 'predict' replaces stage 'superres''s model, pcc_all" in caplog.text
    assert "stay under 'superres'" in caplog.text
    m = stages.update_metrics(tmp_path, {"model": "trihrge", "n_genes_modelled": 250}, stage="superres",
                              section="superres", section_only=("n_genes_modelled",), drop=("pcc_all",))
    assert m["n_genes_modelled"] == 3000 and m["n_spots"] == 10
    assert m["superres"] == {"model": "trihrge", "n_genes_modelled": 250}        # its stale pcc_all is gone
    assert m["predict"] == {"model": "hespotex", "pcc_all": 0.2} and m["pcc_all"] == 0.2   # stage 5's stays
    assert m["model"] == "trihrge"
    # stage 5 rerun without scores drops its own pcc_all, now that it is its last writer
    m = stages.update_metrics(tmp_path, {"model": "hespotex"}, stage="predict", section="predict", drop=("pcc_all",))
    assert "pcc_all" not in m and m["predict"] == {"model": "hespotex"}
    # a folder written before owners were kept: a key another stage's keys file names is that stage's
    legacy = tmp_path / "legacy"
    stages.update_metrics(legacy, {"n_spots": 10, "n_genes_modelled": 3000}, stage="enhancement")
    stages.update_metrics(legacy, {"pcc_all": 0.4, "n_grid": 9}, stage="superres")
    (legacy / ".stamps" / "metrics_owners.json").unlink()
    m = stages.update_metrics(legacy, {"n_grid": 9}, stage="superres", section="superres",
                              drop=("pcc_all", "n_genes_modelled"))
    assert "pcc_all" not in m and m["n_grid"] == 9 and m["n_genes_modelled"] == 3000


def test_a_stage_whose_values_left_metrics_json_is_not_up_to_date(tmp_path):
    """stages.metrics_kept: metrics.json must still hold the values a stage's last run wrote there and still owns;
    a value another stage took over and then dropped is not damage, and a stage that wrote none is kept."""
    from pipeline import stages

    stages.update_metrics(tmp_path, {"n_spots": 10, "spot_spacing_px": 3.0}, stage="enhancement")
    stages.update_metrics(tmp_path, {"pcc_all": 0.4}, stage="superres", section="superres")
    stages.update_metrics(tmp_path, {"pcc_all": 0.2}, stage="predict", section="predict")      # takes pcc_all over
    stages.update_metrics(tmp_path, {}, stage="predict", section="predict", drop=("pcc_all",))  # and drops it
    assert all(stages.metrics_kept(tmp_path, s) for s in ("enhancement", "superres", "predict", "image_features"))
    m = json.loads((tmp_path / "metrics.json").read_text())
    del m["spot_spacing_px"]
    (tmp_path / "metrics.json").write_text(json.dumps(m))                # edited outside the pipeline
    assert not stages.metrics_kept(tmp_path, "enhancement") and stages.metrics_kept(tmp_path, "superres")
    (tmp_path / "metrics.json").write_text('{"n_spots": 1')               # cut short
    assert not stages.metrics_kept(tmp_path, "superres") and stages.metrics_kept(tmp_path, "image_features")


def test_metrics_json_removed_or_cut_short_is_written_again_without_training(tmp_path, synthetic_slice, caplog):
    """A finished run whose metrics.json was removed or cut short: every stage was skipped, so none wrote it again,
    and the runner's read of it was a traceback (JSONDecodeError). A stage whose values are gone is now redone,
    each the least it can: stages 1-2 run (seconds), stage 3 clusters its saved embedding again (the same
    domains, no training) and puts back the training's time, kept beside its stamps."""
    from pipeline.runner import run_stages

    cfg = load_config(None, [f"data.path={synthetic_slice}", "data.truth=null", "model.n_clusters=4",
                             "model.epochs=10", "plot.figures=false"])
    out = tmp_path / "run"
    first = run_stages(cfg, out, "cpu", progress=False)
    same = ("n_clusters", "domain_sizes", "pas", "chaos", "n_genes_modelled")
    for damage in (lambda p: p.unlink(), lambda p: p.write_text(p.read_text()[:40])):
        damage(out / "metrics.json")
        caplog.clear()
        with caplog.at_level("INFO", logger="stpipe"):
            again = run_stages(cfg, out, "cpu", progress=False)
        assert caplog.text.count("values are gone") == 3 and "clustered again from its embedding" in caplog.text
        assert "M-STGCN:" not in caplog.text                                  # not retrained
        assert {k: again[k] for k in same} == {k: first[k] for k in same}
        assert again == json.loads((out / "metrics.json").read_text())
        assert set(again["seconds"]) == {"image_features", "enhancement", "domains"}
        assert again["seconds"]["domains"] == first["seconds"]["domains"]   # the training's, not the re-clustering's
    caplog.clear()
    with caplog.at_level("INFO", logger="stpipe"):
        run_stages(cfg, out, "cpu", progress=False)
    assert caplog.text.count("up to date, skipped") == 3 and "values are gone" not in caplog.text


def test_stages_run_alone_and_no_image(tmp_path, synthetic_slice):
    out = tmp_path / "alone"
    common = ["--out", str(out), "--set", f"data.path={synthetic_slice}", "--set", "model.n_clusters=5",
              "--set", "image.use=none", "--set", "model.epochs=20", "--set", "plot.figures=false"]
    run("image_process/main.py", *common)
    assert np.load(out / "01_image_features.npy").shape[1] == 0
    run("positions_enhancement/run_enhancement.py", *common)
    run("pipeline/stage_domains.py", *common)
    a = ad.read_h5ad(out / "03_domains.h5ad")
    assert list(a.uns["mstgcn"]["graphs"]) == ["spatial", "gene"]
    # another slide with the same barcodes (as every Visium slide has) run stage by stage into the folder:
    # stage 2 took the first slide's features, stage 3 its counts, silently; now each names the stage to rerun
    from data.synthetic import make_synthetic_visium
    other = make_synthetic_visium(tmp_path / "other", n_rows=24, n_cols=24, n_genes=300, seed=7)
    mixed = [c if c != f"data.path={synthetic_slice}" else f"data.path={other}" for c in common]
    p = run("positions_enhancement/run_enhancement.py", *mixed, check=False)
    assert p.returncode == 2 and "01_image_features.npy: made by image_process/main.py with other inputs" in p.stderr
    p = run("pipeline/stage_domains.py", *mixed, "--force", check=False)
    assert p.returncode == 2 and "02_enhanced.h5ad: made by positions_enhancement/run_enhancement.py" in p.stderr
    run("image_process/main.py", *mixed)
    run("positions_enhancement/run_enhancement.py", *mixed)


def test_changed_labels_rescore_without_retraining(tmp_path, synthetic_slice, caplog):
    """data.truth only scores (with model.n_clusters set): changing it, or removing it, re-scores the
    finished domains instead of redoing stages 1-3; with n_clusters from the labels it retrains stage 3."""
    from pipeline.metrics import clustering_scores
    from pipeline.runner import run_stages

    out = tmp_path / "run"
    truth = pd.read_csv(synthetic_slice / "truth.txt", sep="\t", header=None, index_col=0)[1]
    merged = truth.replace({"D2": "D1"})                          # another annotation: two layers as one
    merged.iloc[::4] = "undetermined"
    merged.to_csv(tmp_path / "merged.txt", sep="\t", header=False)
    base = [f"data.path={synthetic_slice}", "model.n_clusters=5", "model.epochs=10", "plot.figures=false"]
    run_stages(load_config(None, base + [f"data.truth={synthetic_slice / 'truth.txt'}"]), out, "cpu", progress=False)
    stamps = {f.name: f.read_text() for f in (out / ".stamps").glob("*.json") if f.stem in
              ("image_features", "enhancement", "domains")}
    domains = ad.read_h5ad(out / "03_domains.h5ad").obs[keys.DOMAIN]

    caplog.clear()
    with caplog.at_level("INFO", logger="stpipe"):
        m = run_stages(load_config(None, base + [f"data.truth={tmp_path / 'merged.txt'}"]), out, "cpu", progress=False)
    assert "re-scored against the changed labels, not retrained" in caplog.text
    assert stamps == {f: (out / ".stamps" / f).read_text() for f in stamps}          # nothing redone
    a = ad.read_h5ad(out / "03_domains.h5ad")
    assert a.obs[keys.DOMAIN].equals(domains)
    expect = clustering_scores(domains, a.obs[keys.TRUTH])
    assert a.obs[keys.TRUTH].notna().sum() == expect["n_annotated"] == m["n_annotated"] < len(truth)
    assert m["ari"] == expect["ari"] and set(a.obs[keys.TRUTH].dropna()) == {"D1", "D3", "D4", "D5"}
    assert keys.TRUTH in ad.read_h5ad(out / "02_enhanced.h5ad").obs

    m = run_stages(load_config(None, base + ["data.truth=null"]), out, "cpu", progress=False)
    assert "ari" not in m and "n_annotated" not in m
    assert keys.TRUTH not in ad.read_h5ad(out / "03_domains.h5ad").obs
    assert keys.TRUTH not in ad.read_h5ad(out / "02_enhanced.h5ad").obs

    caplog.clear()      # the number of domains taken from the labels: the saved embedding is clustered again
    cfg = load_config(None, [f"data.path={synthetic_slice}", "model.n_clusters=null", "model.epochs=10",
                             f"data.truth={tmp_path / 'merged.txt'}"])
    with caplog.at_level("INFO", logger="stpipe"):
        m = run_stages(cfg, out, "cpu", progress=False)
    assert m["n_clusters"] == 4 and "re-scored" not in caplog.text
    assert "4 domains clustered again from its embedding" in caplog.text
    kept = {f: v for f, v in stamps.items() if f != "domains.json"}                 # stages 1 and 2
    assert kept == {f: (out / ".stamps" / f).read_text() for f in kept}


def test_domain_markers_rank_each_domains_measured_genes_and_follow_their_settings(tmp_path, synthetic_slice, caplog):
    """Stage 3 ranks every modelled gene for every domain against the other spots (scanpy's test, on the
    measured log1p(CP10k), uns['rank_genes_groups'] in scanpy's layout, 03_domain_markers.csv/png); a new
    markers.method ranks them again from the saved domains without training, plot.marker_genes only redraws,
    and null removes them."""
    import scanpy as sc

    from pipeline.runner import run_stages

    base = [f"data.path={synthetic_slice}", "data.truth=null", "model.epochs=10", "model.n_clusters=5"]
    out = tmp_path / "run"
    run_stages(load_config(None, base), out, "cpu", progress=False)
    a = ad.read_h5ad(out / "03_domains.h5ad")
    table = pd.read_csv(out / "03_domain_markers.csv", dtype={"domain": str})
    domains = a.obs[keys.DOMAIN].astype(str)
    assert list(table.columns) == ["domain", "rank", "gene", "score", "log2_fold_change", "pval", "pval_adj",
                                   "pct_in_domain", "pct_elsewhere"]
    assert len(table) == domains.nunique() * a.n_vars and set(table["domain"]) == set(domains)
    x = a.layers[keys.LOGNORM]
    for d, rows in table.groupby("domain"):
        assert list(rows["rank"]) == list(range(1, a.n_vars + 1)) and rows["score"].is_monotonic_decreasing
        inside = (domains == d).to_numpy()
        j = a.var_names.get_indexer(rows["gene"])
        np.testing.assert_allclose(rows["pct_in_domain"], (x[inside][:, j] > 0).mean(0), atol=1e-6)
        np.testing.assert_allclose(rows["pct_elsewhere"], (x[~inside][:, j] > 0).mean(0), atol=1e-6)
        top = rows.iloc[0]        # the synthetic domains' programmes raise their genes 1.8-3.5 fold
        k = a.var_names.get_loc(top["gene"])
        assert x[inside, k].mean() > x[~inside, k].mean() and top["log2_fold_change"] > 0.5 and top["pval_adj"] < 1e-6
    from pipeline.domains import domain_markers, marker_table
    lone = a.copy()                    # a domain of one spot (smoothing can leave one) has no spread to test
    lone.obs[keys.DOMAIN] = lone.obs[keys.DOMAIN].cat.add_categories(["99"])
    lone.obs.iloc[0, lone.obs.columns.get_loc(keys.DOMAIN)] = "99"
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)     # scanpy 1.12 warned of the one-spot domain by its index
        domain_markers(lone, "t-test")
    assert set(marker_table(lone)["domain"]) == set(domains) and "99" not in set(marker_table(lone)["domain"])
    got = sc.get.rank_genes_groups_df(a, str(domains.iloc[0]))       # scanpy reads what the stage wrote
    assert list(got["names"][:5]) == list(table[table["domain"] == str(domains.iloc[0])]["gene"][:5])
    assert (out / "03_domain_markers.png").stat().st_size > 1000
    stamps = {f.name: f.read_text() for f in (out / ".stamps").glob("*.json")}
    caplog.clear()
    with caplog.at_level("INFO", logger="stpipe"):
        run_stages(load_config(None, base + ["markers.method=wilcoxon"]), out, "cpu", progress=False)
    assert "clustered again from its embedding" in caplog.text and "M-STGCN:" not in caplog.text
    again = pd.read_csv(out / "03_domain_markers.csv", dtype={"domain": str})
    assert again["domain"].equals(table["domain"]) and not np.allclose(again["score"], table["score"])
    assert ad.read_h5ad(out / "03_domains.h5ad").uns["rank_genes_groups"]["params"]["method"] == "wilcoxon"
    before = (out / "03_domain_markers.csv").read_bytes()
    caplog.clear()
    with caplog.at_level("INFO", logger="stpipe"):
        run_stages(load_config(None, base + ["markers.method=wilcoxon", "plot.marker_genes=1"]), out, "cpu",
                   progress=False)
    assert "figures redrawn" in caplog.text and (out / "03_domain_markers.csv").read_bytes() == before
    caplog.clear()
    with caplog.at_level("INFO", logger="stpipe"):        # the embedding's UMAP: made without training
        run_stages(load_config(None, base + ["markers.method=wilcoxon", "plot.umap=true"]), out, "cpu", progress=False)
    assert "clustered again from its embedding" in caplog.text and "M-STGCN:" not in caplog.text
    with_view = ad.read_h5ad(out / "03_domains.h5ad")
    view = with_view.obsm[keys.UMAP]
    assert view.shape == (a.n_obs, 2) and np.isfinite(view).all() and (out / "03_embedding.png").stat().st_size > 1000
    n_domains = len(with_view.obs[keys.DOMAIN].cat.categories)         # and the domains' PAGA graph over it
    assert with_view.uns[keys.PAGA]["connectivities"].shape == (n_domains, n_domains)
    assert with_view.uns[keys.DOMAIN_SIZES].sum() == a.n_obs
    run_stages(load_config(None, base + ["markers.method=null"]), out, "cpu", progress=False)
    without = ad.read_h5ad(out / "03_domains.h5ad")
    assert keys.UMAP not in without.obsm and not (out / "03_embedding.png").exists()
    assert keys.PAGA not in without.uns and keys.DOMAIN_SIZES not in without.uns
    assert not (out / "03_domain_markers.csv").exists() and not (out / "03_domain_markers.png").exists()
    assert "rank_genes_groups" not in ad.read_h5ad(out / "03_domains.h5ad").uns
    assert stamps["enhancement.json"] == (out / ".stamps" / "enhancement.json").read_text()
    with pytest.raises(InputError, match="markers.method='welch'"):
        load_config(None, ["markers.method=welch"])


def test_domains_are_named_after_a_reference_slices_by_their_expression(tmp_path, caplog):
    """cluster.reference names each domain after the reference slice's domain with the most similar expression
    profile (no labels): two synthetic sections of one tissue get the same name, colour and markers for the same
    tissue domain; a change of the reference renames without training; bad references are refused."""
    from data.synthetic import make_synthetic_visium
    from pipeline.runner import run_stages

    runs = {}
    for name, seed in (("A", 1), ("B", 2)):     # sections of one tissue: the same programmes, other counts
        folder = make_synthetic_visium(tmp_path / name, n_rows=24, n_cols=24, n_genes=300, seed=seed, program_seed=7)
        runs[name] = [f"data.path={folder}", f"data.truth={folder / 'truth.txt'}", "model.epochs=40",
                      "model.n_clusters=5", "plot.figures=false"]
        run_stages(load_config(None, runs[name]), tmp_path / f"run{name}", "cpu", progress=False)
    ref = tmp_path / "runA" / "03_domains.h5ad"
    a, before = ad.read_h5ad(ref), ad.read_h5ad(tmp_path / "runB" / "03_domains.h5ad")
    caplog.clear()
    with caplog.at_level("INFO", logger="stpipe"):
        run_stages(load_config(None, runs["B"] + [f"cluster.reference={ref}"]), tmp_path / "runB", "cpu",
                   progress=False)
    assert "clustered again from its embedding" in caplog.text and "M-STGCN:" not in caplog.text
    b = ad.read_h5ad(tmp_path / "runB" / "03_domains.h5ad")
    np.testing.assert_array_equal(b.obsm[keys.EMBEDDING], before.obsm[keys.EMBEDDING])

    def majority(x):
        return x.obs.groupby(keys.DOMAIN, observed=True)[keys.TRUTH].agg(lambda t: t.value_counts().index[0])
    assert majority(b).to_dict() == majority(a).to_dict()          # the same tissue domain has the same name
    colour = dict(zip(a.obs[keys.DOMAIN].cat.categories, a.uns["domain_colors"]))
    assert dict(zip(b.obs[keys.DOMAIN].cat.categories, b.uns["domain_colors"])) == \
        {d: colour[d] for d in b.obs[keys.DOMAIN].cat.categories}
    table = pd.DataFrame({k: b.uns[keys.DOMAIN_MATCHING][k]
                          for k in ("domain", "reference_domain", "correlation", "name")})
    assert (table["reference_domain"] == table["name"]).all() and (table["correlation"] > 0.5).all()
    m = json.loads((tmp_path / "runB" / "metrics.json").read_text())
    assert m["reference"] == str(ref) and m["reference_correlation"] == dict(zip(table["name"], table["correlation"]))
    relabel = dict(zip(table["domain"], table["name"]))        # the same spots, only renamed
    assert b.obs[keys.DOMAIN].astype(str).equals(before.obs[keys.DOMAIN].astype(str).map(relabel))
    assert b.obs[keys.DOMAIN_UNREFINED].astype(str).equals(before.obs[keys.DOMAIN_UNREFINED].astype(str).map(relabel))
    assert list(pd.read_csv(tmp_path / "runB" / "03_domains.csv", dtype=str)["M-STGCN domain"]) == \
        list(b.obs[keys.DOMAIN].astype(str))
    assert set(pd.read_csv(tmp_path / "runB" / "03_domain_markers.csv", dtype={"domain": str})["domain"]) == \
        set(b.obs[keys.DOMAIN].astype(str))
    for bad, why in ((tmp_path / "runB" / "03_domains.h5ad", "this --out's own 03_domains.h5ad"),
                     (tmp_path / "nothing.h5ad", "no such file"),
                     (tmp_path / "runA" / "03_domains.csv", "not an .h5ad file")):
        with pytest.raises(InputError, match=why):
            run_stages(load_config(None, runs["B"] + [f"cluster.reference={bad}"]), tmp_path / "runB", "cpu",
                       progress=False)
    run_stages(load_config(None, runs["B"]), tmp_path / "runB", "cpu", progress=False)    # the reference removed
    again = ad.read_h5ad(tmp_path / "runB" / "03_domains.h5ad")
    assert again.obs[keys.DOMAIN].equals(before.obs[keys.DOMAIN]) and keys.DOMAIN_MATCHING not in again.uns
    assert "reference" not in json.loads((tmp_path / "runB" / "metrics.json").read_text())


def test_domain_matching_rules_more_domains_opposite_profiles_and_few_genes(tmp_path):
    """match_domains pairs one to one by profile correlation: a domain beyond the reference's number, or one
    without a positively correlated partner, gets a new name the reference does not use; a reference sharing
    too few genes is refused. api.match_domains does it on a copy."""
    from pipeline import api
    from pipeline.domains import MIN_SHARED_GENES, match_domains, pair_by_correlation

    rng = np.random.default_rng(0)
    n_genes, per = 120, 40
    programmes = rng.normal(0, 1, (4, n_genes))

    def slide(labels, names, genes=None):
        x = np.log1p(np.exp(programmes[labels] + rng.normal(0, 0.3, (len(labels), n_genes))))
        a = ad.AnnData(np.zeros_like(x, np.float32), layers={keys.LOGNORM: x.astype(np.float32)})
        a.var_names = genes if genes is not None else [f"G{j}" for j in range(n_genes)]
        a.obs_names = [f"s{i}" for i in range(len(labels))]
        a.obs[keys.DOMAIN] = pd.Categorical([names[k] for k in labels],
                                            categories=sorted(set(names[k] for k in labels)))
        a.obs[keys.DOMAIN_UNREFINED] = a.obs[keys.DOMAIN].copy()
        return a

    ref = slide(np.repeat([0, 1, 2], per), {0: "7", 1: "2", 2: "4"})
    ref.uns["domain_colors"] = ["#111111", "#222222", "#333333"]        # domains 2, 4, 7
    ours = slide(np.repeat([2, 0, 1, 3], per), {0: "0", 1: "1", 2: "2", 3: "3"})    # 3: a programme of its own
    table = match_domains(ours, ref, "ref.h5ad")
    got = dict(zip(table["domain"], table["name"]))
    assert got["0"] == "7" and got["1"] == "2" and got["2"] == "4" and got["3"] == "8"   # new: after the largest
    assert table.set_index("domain").loc["3", "reference_domain"] == ""
    assert list(ours.obs[keys.DOMAIN].cat.categories) == ["2", "4", "7", "8"]          # the reference's order first
    assert list(ours.uns["domain_colors"][:3]) == ["#111111", "#222222", "#333333"] and \
        ours.uns["domain_colors"][3] not in ref.uns["domain_colors"]
    # the best one-to-one total here pairs row 1 with column 1 at r -0.5: not the same region, left unpaired
    assert pair_by_correlation(np.array([[0.9, 0.1], [-0.2, -0.5]])) == [(0, 0)]
    few = slide(np.repeat([0, 1], per), {0: "0", 1: "1"}, genes=[f"H{j}" for j in range(n_genes - MIN_SHARED_GENES + 1)]
                + [f"G{j}" for j in range(MIN_SHARED_GENES - 1)])
    with pytest.raises(InputError, match=f"shares {MIN_SHARED_GENES - 1} of its modelled genes"):
        match_domains(few, ref, "ref.h5ad")
    mine = slide(np.repeat([1, 0], per), {0: "0", 1: "1"})
    copy = api.match_domains(mine, ref)
    assert set(copy.obs[keys.DOMAIN].cat.categories) == {"7", "2"} and keys.DOMAIN_MATCHING not in mine.uns
    named = slide(np.repeat([0, 1], per), {0: "white matter", 1: "layer 1"})      # names a user gave the reference
    theirs = match_domains(slide(np.repeat([1, 0, 2], per), {0: "0", 1: "1", 2: "2"}), named)
    assert dict(zip(theirs["domain"], theirs["name"])) == {"0": "white matter", "1": "layer 1", "2": "2"}
    ref.write_h5ad(tmp_path / "ref.h5ad")                   # or the reference's file
    from_file = api.match_domains(mine, tmp_path / "ref.h5ad")
    assert from_file.obs[keys.DOMAIN].equals(copy.obs[keys.DOMAIN])
    assert list(from_file.uns["domain_colors"]) == list(copy.uns["domain_colors"])
    with pytest.raises(InputError, match="no such file"):
        api.match_domains(mine, tmp_path / "none.h5ad")


def test_a_new_number_of_domains_reclusters_as_a_full_rerun_would(tmp_path, synthetic_slice, caplog):
    """model.n_clusters and cluster.* only cluster the trained network's embedding: changing them clusters
    the saved embedding again (seconds) instead of retraining, with the domains a full rerun (--force)
    gives; the embedding and denoised expression are kept. With several seeds (n_seeds > 1) every seed's
    embedding is clustered again and the consensus retaken: the same kept seed re-clusters, another retrains."""
    from pipeline.runner import run_stages

    base = [f"data.path={synthetic_slice}", "data.truth=null", "model.epochs=10", "plot.figures=false"]
    out = tmp_path / "run"
    run_stages(load_config(None, base + ["model.n_clusters=5"]), out, "cpu", progress=False)
    first = ad.read_h5ad(out / "03_domains.h5ad")
    for change in (["model.n_clusters=3"], ["model.n_clusters=3", "cluster.refine=false", "cluster.covariance=full"]):
        caplog.clear()
        with caplog.at_level("INFO", logger="stpipe"):
            m = run_stages(load_config(None, base + change), out, "cpu", progress=False)
        assert "3 domains clustered again from its embedding" in caplog.text and "M-STGCN:" not in caplog.text
        again = ad.read_h5ad(out / "03_domains.h5ad")
        np.testing.assert_array_equal(again.obsm[keys.EMBEDDING], first.obsm[keys.EMBEDDING])
        np.testing.assert_array_equal(again.layers[keys.DENOISED], first.layers[keys.DENOISED])
        full = tmp_path / f"full{len(change)}"
        run_stages(load_config(None, base + change), full, "cpu", progress=False)
        assert again.obs[keys.DOMAIN].equals(ad.read_h5ad(full / "03_domains.h5ad").obs[keys.DOMAIN])
        assert m["n_clusters"] == 3 and again.obs[keys.DOMAIN].nunique() <= 3
        assert list(pd.read_csv(out / "03_domains.csv", dtype=str)["M-STGCN domain"]) == \
            list(again.obs[keys.DOMAIN].astype(str))
    caplog.clear()
    seeds = base + ["model.n_seeds=3"]
    with caplog.at_level("INFO", logger="stpipe"):
        run_stages(load_config(None, seeds + ["model.n_clusters=3"]), out, "cpu", progress=False)
    assert "clustered again" not in caplog.text and "seeds, kept seed" in caplog.text     # n_seeds: a new network
    assert ad.read_h5ad(out / "03_domains.h5ad").obsm[keys.EMBEDDING_SEEDS].shape[1] == 3 * first.obsm[keys.EMBEDDING].shape[1]
    def change_to(k):
        caplog.clear()
        with caplog.at_level("INFO", logger="stpipe"):
            run_stages(load_config(None, seeds + [f"model.n_clusters={k}"]), out, "cpu", progress=False)
        full = tmp_path / f"seeds{k}"
        if not full.exists():
            run_stages(load_config(None, seeds + [f"model.n_clusters={k}"]), full, "cpu", progress=False)
        a, b = ad.read_h5ad(out / "03_domains.h5ad"), ad.read_h5ad(full / "03_domains.h5ad")
        assert a.obs[keys.DOMAIN].equals(b.obs[keys.DOMAIN]) and a.uns["mstgcn"]["seed_kept"] == b.uns["mstgcn"]["seed_kept"]
        for key in (keys.DENOISED, keys.DENOISED_MEAN):
            np.testing.assert_array_equal(a.layers[key], b.layers[key])
        np.testing.assert_array_equal(a.obsm[keys.EMBEDDING], b.obsm[keys.EMBEDDING])
        assert a.uns["mstgcn"]["loss"].tolist() == b.uns["mstgcn"]["loss"].tolist()
        reclustered = f"{k} domains clustered again" in caplog.text
        assert reclustered != ("seeds, kept seed" in caplog.text)        # re-clustered, or retrained
        switched = "its outputs come from its saved network" in caplog.text
        return ("switched" if switched else "same seed") if reclustered else "retrained"

    outcomes = {change_to(k) for k in (4, 5, 2)}
    assert outcomes == {"same seed", "switched"}          # another seed's outputs from its saved network
    (out / "03_seed_networks.pt").unlink()                # without it, a switch retrains
    assert any(change_to(k) == "retrained" for k in (4, 5, 2))     # stops at the first retraining


def test_cluster_sweep_clusters_the_saved_embedding_into_each_k(tmp_path, synthetic_slice, caplog):
    """cluster.sweep clusters the trained network's embedding into each number of domains it lists, as
    model.n_clusters would (its own K groups the spots as obs['domain']), without training: obs['domain_k<K>'],
    metrics.json's by_k (coherence, and ARI/NMI with labels), 03_domains_by_k.png; null removes them all."""
    import json

    from pipeline.runner import run_stages

    assert load_config(None, ["cluster.sweep=5-8"])["cluster"]["sweep"] == [5, 6, 7, 8]
    assert load_config(None, ["cluster.sweep=[9, 4, 4]"])["cluster"]["sweep"] == [4, 9]
    assert load_config(None, ["cluster.sweep=6"])["cluster"]["sweep"] == [6]
    for bad in ("[1, 3]", "[]", "8-5", "[4.5]", "many", "[true]"):
        with pytest.raises(InputError, match="cluster.sweep=.*numbers of domains, each at least 2"):
            load_config(None, [f"cluster.sweep={bad}"])
    base = [f"data.path={synthetic_slice}", "data.truth=null", "model.epochs=10", "model.n_clusters=4"]
    out = tmp_path / "run"
    run_stages(load_config(None, base), out, "cpu", progress=False)
    assert not (out / "03_domains_by_k.png").exists() and "by_k" not in json.loads((out / "metrics.json").read_text())
    caplog.clear()
    with caplog.at_level("INFO", logger="stpipe"):
        run_stages(load_config(None, base + ["cluster.sweep=[2, 4, 6]"]), out, "cpu", progress=False)
    assert "clustered again from its embedding" in caplog.text and "M-STGCN:" not in caplog.text
    sweep_line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("cluster.sweep:"))
    a = ad.read_h5ad(out / "03_domains.h5ad")
    assert [c for c in a.obs.columns if c.startswith("domain_k")] == [keys.domain_for_k(k) for k in (2, 4, 6)]
    assert a.obs[keys.domain_for_k(4)].astype(str).equals(a.obs[keys.DOMAIN].astype(str))
    assert [a.obs[keys.domain_for_k(k)].nunique() for k in (2, 6)] == [2, 6]
    metrics = json.loads((out / "metrics.json").read_text())
    by_k = metrics["by_k"]
    assert list(by_k) == ["2", "4", "6"]
    assert all(set(v) == {"chaos", "pas", "stability", "stability_sd"} for v in by_k.values())
    assert all(-0.5 <= v["stability"] <= 1 for v in by_k.values())
    assert metrics["most_stable_k"] == max((2, 4, 6), key=lambda k: (by_k[str(k)]["stability"], -k))
    # its stability read by Steinley's bands for ARI, in metrics.json and the log line ("no K is stable" if poor)
    from pipeline.domains import ari_band
    band = ari_band(by_k[str(metrics["most_stable_k"])]["stability"])
    assert metrics["most_stable_k_band"] == band
    assert f"K = {metrics['most_stable_k']}, gives partitions" in sweep_line and f"({band}, by Steinley" in sweep_line
    assert ("no K is stable" in sweep_line) == (band == "poor")
    assert set(a.uns[keys.SWEEP_STABILITY]) == {"2", "4", "6"}
    assert (out / "03_domains_by_k.png").stat().st_size > 1000
    caplog.clear()
    with caplog.at_level("INFO", logger="stpipe"):        # labels given later: each K scored, nothing retrained
        run_stages(load_config(None, base + ["cluster.sweep=[2, 4, 6]", f"data.truth={synthetic_slice / 'truth.txt'}"]),
                   out, "cpu", progress=False)
    assert "re-scored against the changed labels" in caplog.text
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["by_k"]["4"]["ari"] == pytest.approx(metrics["ari"]) and 0 <= metrics["by_k"]["2"]["nmi"] <= 1
    run_stages(load_config(None, base + ["cluster.sweep=[2, 4, 6]", "cluster.sweep_resamples=0"]), out, "cpu",
               progress=False)            # no stability: the maps and coherence only
    metrics = json.loads((out / "metrics.json").read_text())
    assert "most_stable_k" not in metrics and all(set(v) == {"chaos", "pas"} for v in metrics["by_k"].values())
    assert "most_stable_k_band" not in metrics
    assert keys.SWEEP_STABILITY not in ad.read_h5ad(out / "03_domains.h5ad").uns
    with pytest.raises(InputError, match="sweep_resamples=1: .*pairs"):
        run_stages(load_config(None, base + ["cluster.sweep=[2, 4]", "cluster.sweep_resamples=1"]), out, "cpu",
                   progress=False)
    run_stages(load_config(None, base + ["cluster.sweep=null"]), out, "cpu", progress=False)
    a = ad.read_h5ad(out / "03_domains.h5ad")
    assert not [c for c in a.obs.columns if c.startswith("domain_k")] and not (out / "03_domains_by_k.png").exists()
    assert "by_k" not in json.loads((out / "metrics.json").read_text())
    assert "most_stable_k" not in json.loads((out / "metrics.json").read_text())
    with pytest.raises(InputError, match="5000 domains but the slide has"):
        run_stages(load_config(None, base + ["cluster.sweep=[3, 5000]"]), out, "cpu", progress=False)


def test_sweep_with_several_seeds_reports_their_agreement_at_each_k(tmp_path, synthetic_slice):
    """With model.n_seeds > 1, cluster.sweep also clusters every seed's embedding into each K, as the kept seed's,
    and reports the mean ARI between the seeds' domains (by_k's seed_agreement; uns['sweep_stability']): the
    training's spread, label-free; without resamples it stands alone and no most stable K is named."""
    import json

    from pipeline.domains import cluster_embedding, spatial_graph
    from pipeline.metrics import labeling_agreement
    from pipeline.runner import run_stages

    cfg = load_config(None, [f"data.path={synthetic_slice}", "data.truth=null", "model.epochs=10", "model.n_clusters=4",
                             "model.n_seeds=2", "cluster.sweep=[2, 4]", "cluster.sweep_resamples=0"])
    out = tmp_path / "run"
    run_stages(cfg, out, "cpu", progress=False)
    metrics = json.loads((out / "metrics.json").read_text())
    assert all(set(v) == {"chaos", "pas", "seed_agreement"} for v in metrics["by_k"].values())
    assert "most_stable_k" not in metrics
    a = ad.read_h5ad(out / "03_domains.h5ad")
    kept, seeds = int(a.uns["mstgcn"]["seed_kept"]), [int(s) for s in a.uns["mstgcn"]["seeds"]]
    embeddings = np.split(np.asarray(a.obsm[keys.EMBEDDING_SEEDS]), 2, axis=1)
    for k in (2, 4):
        labels = [cluster_embedding(e, spatial_graph(a, cfg), k, cfg, s)[1] for s, e in zip(seeds, embeddings)]
        assert a.obs[keys.domain_for_k(k)].astype(int).tolist() == labels[seeds.index(kept)].tolist()
        want = labeling_agreement(labels)[0, 1]
        assert metrics["by_k"][str(k)]["seed_agreement"] == pytest.approx(want, abs=1e-4)
        assert a.uns[keys.SWEEP_STABILITY][str(k)]["seed_agreement"] == pytest.approx(want, abs=1e-4)
    assert (out / "03_domains_by_k.png").stat().st_size > 1000


def test_seeds_together_cluster_every_seeds_embedding_side_by_side(tmp_path, synthetic_slice, caplog):
    """cluster.seeds=together (with model.n_seeds > 1): obs['domain'] clusters every seed's embedding side by side
    (obsm['embedding_seeds']) as one embedding is clustered, recorded in uns['mstgcn']['domains_from'], and the
    sweep's entry at model.n_clusters groups the spots the same way; the kept seed still gives the embedding and
    denoised layer; switching back to medoid re-clusters without training and gives the kept seed's domains; an
    unknown word is refused before any work."""
    from pipeline.domains import cluster_embedding, domain_embedding, spatial_graph
    from pipeline.runner import run_stages

    with pytest.raises(InputError, match="cluster.seeds='mean': choose one of medoid, together"):
        load_config(None, ["cluster.seeds=mean"])
    caplog.clear()
    with caplog.at_level("WARNING", logger="stpipe"):      # one seed: nothing to combine, and said so
        run_stages(load_config(None, [f"data.path={synthetic_slice}", "data.truth=null", "model.epochs=2",
                                      "model.n_clusters=4", "cluster.seeds=together", "plot.figures=false"]),
                   tmp_path / "one", "cpu", progress=False)
    assert "model.n_seeds is 1" in caplog.text
    assert "domains_from" not in ad.read_h5ad(tmp_path / "one" / "03_domains.h5ad").uns["mstgcn"]
    base = [f"data.path={synthetic_slice}", "data.truth=null", "model.epochs=10", "model.n_clusters=4",
            "model.n_seeds=2", "cluster.sweep_resamples=0", "plot.figures=false"]
    out = tmp_path / "run"
    cfg = load_config(None, base + ["cluster.seeds=together", "cluster.sweep=[3, 4]"])
    run_stages(cfg, out, "cpu", progress=False)
    a = ad.read_h5ad(out / "03_domains.h5ad")
    assert a.uns["mstgcn"]["domains_from"] == "together"
    assert a.obs[keys.DOMAIN_UNCERTAINTY].dtype == np.float32 and a.obs[keys.DOMAIN_UNCERTAINTY].between(0, 0.75).all()
    together, seed = domain_embedding(a)
    assert together.shape == (a.n_obs, 2 * a.obsm[keys.EMBEDDING].shape[1]) and seed == 0
    want = cluster_embedding(np.asarray(a.obsm[keys.EMBEDDING_SEEDS]), spatial_graph(a, cfg), 4, cfg, 0)[1]
    assert a.obs[keys.DOMAIN].astype(int).tolist() == want.tolist()
    assert a.obs[keys.domain_for_k(4)].astype(str).equals(a.obs[keys.DOMAIN].astype(str))
    kept = int(a.uns["mstgcn"]["seed_kept"])
    split = np.split(np.asarray(a.obsm[keys.EMBEDDING_SEEDS]), 2, axis=1)
    np.testing.assert_array_equal(a.obsm[keys.EMBEDDING], split[kept])
    denoised = np.asarray(a.layers[keys.DENOISED]).copy()
    caplog.clear()
    with caplog.at_level("INFO", logger="stpipe"):
        run_stages(load_config(None, base + ["cluster.seeds=medoid"]), out, "cpu", progress=False)
    assert "clustered again from its embedding" in caplog.text and "M-STGCN:" not in caplog.text   # not retrained
    b = ad.read_h5ad(out / "03_domains.h5ad")
    assert "domains_from" not in b.uns["mstgcn"] and int(b.uns["mstgcn"]["seed_kept"]) == kept
    np.testing.assert_array_equal(np.asarray(b.layers[keys.DENOISED]), denoised)
    mine = cluster_embedding(np.asarray(b.obsm[keys.EMBEDDING]), spatial_graph(b, cfg), 4, cfg, kept)[1]
    assert b.obs[keys.DOMAIN].astype(int).tolist() == mine.tolist()


def test_domain_uncertainty_is_one_minus_the_mixtures_posterior_of_its_label():
    """gaussian_mixture_fit: the labels a plain scikit-learn fit gives (the domains do not move), and each spot's
    uncertainty, 1 - the posterior probability of its label: ~0 inside well-separated groups, higher for points
    halfway between two, never above 1 - 1/K."""
    from sklearn.mixture import GaussianMixture

    from pipeline.clustering import gaussian_mixture_fit, mixture_input

    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0], [12, 0], [0, 12]])
    Z = np.vstack([c + rng.normal(size=(100, 2)) for c in centres] + [np.array([[6.0, 0], [6, 0.5], [6, -0.5]])])
    labels, uncertainty = gaussian_mixture_fit(Z, 3, None, "tied", 0, 4)
    plain = GaussianMixture(3, covariance_type="tied", random_state=0, n_init=4, reg_covar=1e-5,
                            max_iter=300).fit_predict(mixture_input(Z, None, 0))
    np.testing.assert_array_equal(labels, plain)
    assert uncertainty.dtype == np.float32 and uncertainty.shape == (303,)
    assert np.median(uncertainty[:300]) < 1e-3 and uncertainty[300:].min() > 0.1
    assert uncertainty.min() >= 0 and uncertainty.max() <= 1 - 1 / 3 + 1e-6


def test_uncertainty_panel_is_a_colour_bar_from_zero_to_its_maximum(monkeypatch, tmp_path):
    """03_domains.png's uncertainty panel: a confident mixture's few distinct values (0 and a few 1e-11s, as on the
    demo slice) are drawn with a colour bar over (0, 1 - 1/K), not as one legend entry per value and not stretched
    so that 1e-6 looks as unsure as it gets; domain labels, even numeric-looking ones, keep their legend."""
    import anndata as ad

    import pipeline.plotting as plotting
    from pipeline.domains import domain_categorical
    from pipeline.stage_domains import UNCERTAINTY_PANEL, uncertainty_panel

    assert plotting.numeric_panel(np.array([0.0, 1e-11, 0.0], np.float32))
    assert not plotting.numeric_panel(np.array(["0", "1", "1"])) and not plotting.numeric_panel(np.arange(5))
    assert plotting.numeric_panel(np.arange(30))
    adata = ad.AnnData(np.zeros((40, 1), np.float32))
    adata.obs[keys.DOMAIN_UNREFINED] = domain_categorical(np.arange(40) % 5)
    adata.obs[keys.DOMAIN] = adata.obs[keys.DOMAIN_UNREFINED]
    adata.obs[keys.DOMAIN_UNCERTAINTY] = np.where(np.arange(40) == 3, 3e-6, 0.0).astype(np.float32)
    panels, ranges = uncertainty_panel(adata)
    assert ranges == {UNCERTAINTY_PANEL: (0.0, pytest.approx(0.8))}
    figures = []
    monkeypatch.setattr(plotting, "_save_figure", lambda fig, path: figures.append(fig) or Path(path))
    xy = np.c_[np.arange(40) % 8, np.arange(40) // 8] * 100.0
    plotting.spot_maps(xy, {"domains": adata.obs[keys.DOMAIN].astype(str).to_numpy(), **panels}, tmp_path / "d.png",
                       value_ranges=ranges)
    domains_ax, uncertainty_ax = figures[0].axes[:2]
    assert domains_ax.get_legend() is not None and uncertainty_ax.get_legend() is None
    assert uncertainty_ax.collections[0].get_clim() == (0.0, pytest.approx(0.8))
    assert uncertainty_panel(ad.AnnData(np.zeros((2, 1), np.float32))) == ({}, {})   # a file from before the key


def test_feature_maps_clip_a_few_extreme_spots_with_arrows_on_the_colour_bar(monkeypatch, tmp_path):
    """01_image_features.png's colour bars span the 1st-99th percentiles (a few spots half off the tissue no longer
    squeeze every other spot into one colour), with an arrow at each clipped end; a constant panel keeps a range."""
    import pipeline.plotting as plotting

    values = np.r_[np.linspace(0.0, 1.0, 198), -50.0, 40.0]
    ranges = plotting.percentile_ranges({"pc": values, "flat": np.zeros(200), "none": np.full(3, np.nan)})
    assert ranges["pc"][0] > -1 and ranges["pc"][1] < 2 and ranges["flat"] == (0.0, 0.0) and "none" not in ranges
    figures = []
    monkeypatch.setattr(plotting, "_save_figure", lambda fig, path: figures.append(fig) or Path(path))
    xy = np.c_[np.arange(200) % 20, np.arange(200) // 20] * 100.0
    plotting.spot_maps(xy, {"pc": values, "raw": values}, tmp_path / "f.png", value_ranges={"pc": ranges["pc"]})
    assert [ax.collections[0].colorbar.extend for ax in figures[0].axes[:2]] == ["both", "neither"]


def test_mixture_stability_is_high_for_the_true_number_of_groups():
    """The resampling stability of the mixture (cluster.sweep's label-free score): four well-separated groups give
    the same partition on every 80% subset at K = 4 (ARI ~1), also when each fit sees at most 80 spots (the cap that
    bounds its cost on large slides), and less at K = 7, where the extra clusters cut the groups arbitrarily; it
    is seeded; fewer than 2 resamples are refused."""
    from pipeline.clustering import mixture_stability

    rng = np.random.default_rng(0)
    centres = rng.normal(scale=10, size=(4, 6))
    Z = np.vstack([c + rng.normal(size=(150, 6)) for c in centres])
    at4, sd4 = mixture_stability(Z, 4, n_pcs=None, n_init=2, n_resamples=4)
    at7, sd7 = mixture_stability(Z, 7, n_pcs=None, n_init=2, n_resamples=4)
    assert at4 > 0.99 and sd4 < 0.01 and at7 < at4 - 0.05
    assert mixture_stability(Z, 7, n_pcs=None, n_init=2, n_resamples=4) == (at7, sd7)
    assert mixture_stability(Z, 4, n_pcs=None, n_init=2, n_resamples=3, max_spots=80)[0] > 0.99   # fits of 80 spots
    with pytest.raises(InputError, match="at least 2"):
        mixture_stability(Z, 4, n_resamples=1)


def test_the_most_stable_k_is_read_by_steinleys_bands_for_ari():
    """A sweep's stability is an ARI between resampled partitions; Steinley (2004) calls an ARI above 0.90
    excellent, above 0.80 good, above 0.65 moderate, else poor: 'poor' at the most stable K says no K is stable."""
    from pipeline.domains import ari_band, most_stable_k, most_stable_k_band

    assert [ari_band(v) for v in (1.0, 0.91, 0.90, 0.81, 0.80, 0.66, 0.65, 0.2, -0.1)] == [
        "excellent", "excellent", "good", "good", "moderate", "moderate", "poor", "poor", "poor"]
    a = ad.AnnData(np.zeros((3, 1), np.float32))
    assert most_stable_k(a) is None and most_stable_k_band(a) is None
    a.uns[keys.SWEEP_STABILITY] = {"3": {"stability": 0.42, "stability_sd": 0.1}, "5": {"stability": 0.61,
                                                                                      "stability_sd": 0.1}}
    assert most_stable_k(a) == 5 and most_stable_k_band(a) == "poor"
    a.uns[keys.SWEEP_STABILITY]["4"] = {"stability": 0.97, "stability_sd": 0.01}
    assert most_stable_k(a) == 4 and most_stable_k_band(a) == "excellent"


def test_summary_puts_runs_metrics_side_by_side(tmp_path):
    """python -m pipeline.summary: every number of each run's metrics.json in one CSV row (nested keys dotted),
    the chosen metrics first and in a figure; a folder that is not a finished run, or a metric no run has, is
    refused in one line."""
    runs = []
    for name, ari, extra in (("151673", 0.58, {"by_k": {"7": {"ari": 0.58}}}), ("151674", 0.57, {}),
                             ("C2", None, {"pcc_all": 0.3, "sections": {"C2": {"pcc_all": 0.3}}})):
        folder = tmp_path / "runs" / name
        folder.mkdir(parents=True)
        metrics = {"n_spots": 100, "device": "cpu", "seconds": {"domains": 3.5}, "graphs": ["spatial"], **extra}
        if ari is not None:
            metrics.update(ari=ari, nmi=ari + 0.1)
        (folder / "metrics.json").write_text(json.dumps(metrics))
        runs.append(str(folder))
    out = tmp_path / "summary"
    p = run("-m", "pipeline.summary", *runs, "--out", str(out))
    table = pd.read_csv(out / "summary.csv", index_col="run", dtype={"run": str})
    assert list(table.index) == ["151673", "151674", "C2"] and list(table.columns[:3]) == ["ari", "nmi", "pcc_all"]
    assert table.loc["151673", "by_k.7.ari"] == 0.58 and np.isnan(table.loc["C2", "ari"])
    assert table.loc["C2", "sections.C2.pcc_all"] == 0.3 and table.loc["151674", "seconds.domains"] == 3.5
    assert "device" not in table.columns and "graphs" not in table.columns          # numbers only
    assert (out / "summary.png").stat().st_size > 1000 and "3 runs" in p.stdout
    read_end, write_end = os.pipe()        # `| head`, its reader gone before the table is printed
    piped = subprocess.Popen([sys.executable, "-m", "pipeline.summary", *runs, "--out", str(out)], cwd=ROOT,
                             stdout=write_end, stderr=subprocess.PIPE, text=True)
    os.close(write_end)
    os.close(read_end)
    _, err = piped.communicate(timeout=120)
    assert piped.returncode == 1 and err == ""                   # was a BrokenPipeError traceback
    p = run("-m", "pipeline.summary", runs[0], str(tmp_path / "runs"), "--out", str(out), check=False)
    assert p.returncode == 2 and p.stderr.startswith("error: ") and "metrics.json: not found" in p.stderr
    p = run("-m", "pipeline.summary", *runs, "--out", str(out), "--metrics", "ari", "pcc_hg", check=False)
    assert p.returncode == 2 and "--metrics pcc_hg: no run has it" in p.stderr and "Traceback" not in p.stderr


def test_summary_figure_keeps_equal_scores_names_apart():
    """summary.png names each run beside its point: runs with equal or close scores (two slices both at ARI 0.58)
    get labels one label-height apart, in the order of their values, each as near its value as that allows."""
    from pipeline.plotting import spread_labels

    values = np.array([0.58, 0.30, 0.58, 0.99, 0.581])
    y = spread_labels(values, height_in=4.2)
    gap = np.diff(np.sort(y))
    assert gap.min() > 0.02 and list(np.argsort(y, kind="stable")) == list(np.argsort(values, kind="stable"))
    assert abs(y[1] - 0.30) < 1e-9 and abs(y[3] - 0.99) < 1e-9          # lone values keep their place
    assert np.abs(y[[0, 2, 4]].mean() - values[[0, 2, 4]].mean()) < 1e-9  # a cluster spreads around its values
    assert spread_labels(np.array([0.5]), 4.2).tolist() == [0.5]


def test_h5ad_outputs_compressed_on_request_read_back_the_same(tmp_path, synthetic_slice):
    """output.compression=gzip writes the .h5ad outputs with gzip-compressed arrays (smaller, read back
    equal); it is not a setting of any stage, so it does not redo finished stages."""
    import h5py

    from pipeline.runner import run_stages

    base = [f"data.path={synthetic_slice}", "data.truth=null", "model.n_clusters=5", "model.epochs=5",
            "plot.figures=false"]
    plain, packed = tmp_path / "plain", tmp_path / "packed"
    run_stages(load_config(None, base), plain, "cpu", progress=False)
    run_stages(load_config(None, base + ["output.compression=gzip"]), packed, "cpu", progress=False)
    for name in ("02_enhanced.h5ad", "03_domains.h5ad"):
        with h5py.File(packed / name) as f:
            assert f["layers/lognorm"].compression == "gzip"
        assert (packed / name).stat().st_size < 0.8 * (plain / name).stat().st_size
        a, b = ad.read_h5ad(plain / name), ad.read_h5ad(packed / name)
        np.testing.assert_array_equal(a.layers[keys.LOGNORM], b.layers[keys.LOGNORM])
    stamps = {f.name: f.read_text() for f in (plain / ".stamps").glob("*.json")}
    run_stages(load_config(None, base + ["output.compression=gzip"]), plain, "cpu", progress=False)
    assert stamps == {f.name: f.read_text() for f in (plain / ".stamps").glob("*.json")}


def test_a_damaged_output_is_redone_not_read_into_a_traceback(tmp_path, synthetic_slice, caplog):
    """An output cut short outside the pipeline (a disk error, a partial copy of the folder) with a valid
    stamp ended in h5py's "truncated file" traceback on the next run; it is redone, with a warning."""
    from pipeline.runner import run_stages

    cfg = load_config(None, [f"data.path={synthetic_slice}", "data.truth=null", "model.n_clusters=5",
                             "model.epochs=5"])
    out = tmp_path / "run"
    run_stages(cfg, out, "cpu", progress=False)
    domains = ad.read_h5ad(out / "03_domains.h5ad").obs[keys.DOMAIN]
    for name in ("02_enhanced.h5ad", "03_domains.h5ad", "01_image_features.npy"):
        data = (out / name).read_bytes()
        (out / name).write_bytes(data[:len(data) // 3])
    with caplog.at_level("WARNING", logger="stpipe"):
        run_stages(cfg, out, "cpu", progress=False)
    for name in ("01_image_features.npy", "02_enhanced.h5ad", "03_domains.h5ad"):
        assert f"{name}: cannot be read (damaged or cut short outside the pipeline)" in caplog.text
    assert ad.read_h5ad(out / "03_domains.h5ad").obs[keys.DOMAIN].equals(domains)
    # a figure or table cut short is redone too: the figure redrawn from the outputs, which are kept
    png = (out / "03_domains.png").read_bytes()
    (out / "03_domains.png").write_bytes(png[:len(png) // 2])
    caplog.clear()
    with caplog.at_level("WARNING", logger="stpipe"):
        run_stages(cfg, out, "cpu", progress=False)
    from pipeline.stages import readable
    assert "03_domains.png: cannot be read" in caplog.text and readable(out / "03_domains.png")
    assert readable(out / "03_domains.csv")
    table = (out / "03_domains.csv").read_bytes()
    (out / "03_domains.csv").write_bytes(table[:len(table) // 2 + 3])
    assert not readable(out / "03_domains.csv")
    caplog.clear()
    with caplog.at_level("INFO", logger="stpipe"):      # the table is written again from the saved embedding
        run_stages(cfg, out, "cpu", progress=False)
    assert "clustered again from its embedding" in caplog.text and (out / "03_domains.csv").read_bytes() == table
    # stage 5's model file, reused from --out when fresh, is checked the same way
    import torch

    torch.save({"w": torch.zeros(100)}, tmp_path / "05_model.pt")
    assert readable(tmp_path / "05_model.pt")
    data = (tmp_path / "05_model.pt").read_bytes()
    (tmp_path / "05_model.pt").write_bytes(data[:len(data) // 2])
    assert not readable(tmp_path / "05_model.pt")


def test_cli_bad_input_is_one_line(tmp_path, synthetic_slice):
    p = run("run_dlpfc.py", "--out", str(tmp_path / "typo"), "--set", "data.path=/nonexistent/slide", check=False)
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and "/nonexistent/slide" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "typo").exists()         # named before the output folder is made (and before torch loads)
    # a legacy ST section asked for beside the config's data.path: it ran on the config's slide
    p = run("run_dlpfc.py", "--out", str(tmp_path / "both"), "--set", "data.counts=c.tsv", "--set", "data.spots=s.tsv",
            check=False)
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and "--set data.path=null" in p.stderr
    p = run("positions_enhancement/run_enhancement.py", "--out", str(tmp_path / "empty"),
            "--set", "data.path=/nonexistent", check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    # no model.n_clusters and no labels to count: refused before stage 1 runs, not after stages 1-2
    p = run("run_dlpfc.py", "--out", str(tmp_path / "k"), "--set", f"data.path={synthetic_slice}",
            "--set", "data.truth=null", check=False)
    assert p.returncode == 2 and "model.n_clusters is not set" in p.stderr
    assert not (tmp_path / "k" / "01_image_features.npy").exists()


def test_more_domains_than_spots_refused_before_stage_1(tmp_path, synthetic_slice):
    """A number of domains the slide cannot have was refused by stage 3, after stages 1-2 had run."""
    p = run("run_dlpfc.py", "--out", str(tmp_path), "--set", f"data.path={synthetic_slice}",
            "--set", "data.truth=null", "--set", "model.n_clusters=100000", check=False)
    assert p.returncode == 2 and "model.n_clusters=100000" in p.stderr and "on this slide" in p.stderr
    assert not (tmp_path / "01_image_features.npy").exists()


def test_out_of_memory_is_one_line(capsys):
    """An allocation that fails (a config value far beyond its default: model.hidden=100000000 asked torch
    for 40 GB) ended in a traceback from deep inside NumPy or torch; it is one line and status 1. Other
    runtime errors still raise."""
    from pipeline.cli import run_main

    def fails(exc):
        def fn():
            raise exc
        return fn

    for exc, expect in ((MemoryError("Unable to allocate 2.73 TiB for an array with shape (1000048, 1000048, 3)"),
                         r"out of memory on this machine \(Unable to allocate 2.73 TiB"),
                        (RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate "
                                      "memory: you tried to allocate 40000000000 bytes."),
                         r"out of memory on this machine \(can't allocate memory: you tried to allocate 40000000000"),
                        (RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB"), "on the GPU .*--device cpu")):
        with pytest.raises(SystemExit) as stop:
            run_main(fails(exc))
        err = capsys.readouterr().err
        assert stop.value.code == 1 and err.count("\n") == 1 and re.search(expect, err), err
    with pytest.raises(RuntimeError, match="something else"):
        run_main(fails(RuntimeError("something else")))


def test_output_folder_problems_are_one_line(tmp_path):
    """A full disk or an unwritable --out is named in one line, and no temporary file is left."""
    import errno

    from data.errors import OutputError
    from pipeline.stages import atomic_write

    def fails(exc):
        def write(tmp):
            Path(tmp).write_bytes(b"partial")
            raise exc
        return write

    for exc, words in [(OSError(errno.ENOSPC, "No space left on device"), "disk filled up"),
                       (OSError("[Errno 28] Can't close file (file write failed: errno = 28)"), "disk filled up"),   # h5py
                       (OSError("2000000 requested and 393200 written"), "disk filled up"),                           # numpy
                       (OSError(errno.EROFS, "Read-only file system"), "cannot write here")]:
        with pytest.raises(OutputError, match=words):
            atomic_write(tmp_path / "x.h5ad", fails(exc))
        assert list(tmp_path.iterdir()) == []
    with pytest.raises(OSError, match="something else") as info:    # other errors are not relabelled
        atomic_write(tmp_path / "x.h5ad", fails(OSError(errno.EIO, "something else")))
    assert not isinstance(info.value, OutputError)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    p = run("run_dlpfc.py", "--demo", "--out", str(blocker / "out"), check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr and str(blocker / "out") in p.stderr


def test_an_anndata_that_cannot_write_pandas_text_is_named_before_any_work(tmp_path, monkeypatch):
    """pandas 3 beside an anndata without a writer for its Arrow-backed text (0.12.6, which pip pairs with pandas 3)
    stopped after stage 1's work with a traceback from inside anndata. Simulated here (pandas reported as 3.1.1,
    anndata's writer failing as 0.12.6's does): the scripts stop before creating --out, and ``save_h5ad`` (the
    Python API's writes) too, with one line naming both versions and the fix. With a writer that works (this
    environment's, pandas reported as 3) the probe passes."""
    from pipeline import stages
    from pipeline.cli import build_parser, setup

    def no_writer(self, *args, **kwargs):
        raise TypeError("No method registered for writing <class 'pandas.arrays.ArrowStringArray'> into "
                        "<class 'h5py._hl.group.Group'>\nError raised while writing key '_index' to /obs")

    stages.h5ad_writer_problem.cache_clear()
    try:
        if int(pd.__version__.split(".")[0]) < 3:               # pandas 2 writes with any anndata: run the real probe
            monkeypatch.setattr(pd, "__version__", "3.0.0")
            assert stages.h5ad_writer_problem() is None
            stages.h5ad_writer_problem.cache_clear()
        monkeypatch.setattr(pd, "__version__", "3.1.1")
        monkeypatch.setattr(ad.AnnData, "write_h5ad", no_writer)
        args = build_parser("test").parse_args(["--out", str(tmp_path / "out")])
        with pytest.raises(InputError, match=r"^anndata \S+ cannot write pandas 3\.1\.1's text .*ArrowStringArray.*"
                                             r"pip install 'pandas<3'") as info:
            setup(args)
        assert "\n" not in str(info.value) and not (tmp_path / "out").exists()
        with pytest.raises(InputError, match="pandas<3"):
            stages.save_h5ad(tmp_path / "x.h5ad", ad.AnnData(np.zeros((1, 1), dtype=np.float32)))
        assert list(tmp_path.iterdir()) == []
    finally:
        stages.h5ad_writer_problem.cache_clear()


def test_a_second_run_into_the_same_folder_is_refused(tmp_path, synthetic_slice):
    """Two runs into one --out would mix their stage files; the second stops at once, naming the
    first. The lock is the OS's, so it goes with the process holding it (no stale lock)."""
    from pipeline.cli import output_lock

    with output_lock(tmp_path):
        p = run("image_process/main.py", "--out", str(tmp_path), "--set", f"data.path={synthetic_slice}", check=False)
        assert p.returncode == 2 and "Traceback" not in p.stderr and p.stderr.strip().count("\n") == 0
        assert "another run is writing into this folder" in p.stderr and "pid" in p.stderr
        with pytest.raises(InputError, match="another run"):     # also within one process
            with output_lock(tmp_path):
                pass
    p = run("image_process/main.py", "--out", str(tmp_path), "--set", "data.path=/nonexistent", check=False)
    assert p.returncode == 2 and "another run" not in p.stderr and "/nonexistent" in p.stderr



def test_a_folder_that_cannot_be_locked_runs_with_a_warning(tmp_path, monkeypatch, caplog):
    """Some network file systems have no locks (ENOLCK): that is not 'another run is writing here'."""
    import errno

    import pipeline.cli as cli

    def no_locks(fd):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(cli, "_lock", no_locks)
    with caplog.at_level("WARNING", logger="stpipe"), cli.output_lock(tmp_path):
        pass
    assert "cannot be locked (No locks available)" in caplog.text


def test_real_dlpfc_151673(tmp_path):
    folder = shared("dlpfc", "151673")
    out = tmp_path / "151673"
    run("run_dlpfc.py", "--out", str(out), "--device", "cpu",
        "--set", f"data.path={folder}", "--set", f"data.truth={folder / '151673_truth.txt'}")
    m = json.loads((out / "metrics.json").read_text())
    assert m["n_spots"] == 3639 and m["n_annotated"] == 3611
    assert m["ari"] > 0.3        # far above chance; the benchmark reports the real number
    a = ad.read_h5ad(out / "03_domains.h5ad")
    assert a.obs[keys.DOMAIN].nunique() == 7
    assert np.isfinite(a.layers[keys.DENOISED]).all()


def test_find_domains_is_deterministic(synthetic_slice):
    """Same config, same seed -> identical embedding and domains (through the sparse CSR path); the posterior layer
    (model.posterior_layer) is added beside the others without changing them."""
    from data.readers import read_slide
    from pipeline.domains import find_domains
    from positions_enhancement.run_enhancement import enhance_slide

    cfg = load_config(None, ["model.n_clusters=5", "model.epochs=15", "preprocess.n_top_genes=null"])
    a = read_slide({"path": synthetic_slice})
    sub = enhance_slide(a, np.zeros((a.n_obs, 0), np.float32), cfg)
    r1 = find_domains(sub.copy(), cfg, progress=False)
    with_posterior = load_config(None, ["model.n_clusters=5", "model.epochs=15", "preprocess.n_top_genes=null",
                                        "model.posterior_layer=true"])
    r2 = find_domains(sub.copy(), with_posterior, progress=False)        # an extra layer; training untouched
    np.testing.assert_array_equal(r1.obsm[keys.EMBEDDING], r2.obsm[keys.EMBEDDING])
    assert (r1.obs[keys.DOMAIN] == r2.obs[keys.DOMAIN]).all()
    np.testing.assert_array_equal(r1.layers[keys.DENOISED], r2.layers[keys.DENOISED])
    assert keys.DENOISED_POSTERIOR not in r1.layers and "posterior_neighbours" not in r1.uns[keys.MSTGCN]
    assert r2.uns[keys.MSTGCN]["posterior_neighbours"] == 6
    post = r2.layers[keys.DENOISED_POSTERIOR]
    assert post.shape == r2.shape and np.isfinite(post).all() and post.min() >= 0
    # it sits between the decoder's layer and the measured values: closer to the counts than the decoder
    assert np.abs(post - r2.layers[keys.LOGNORM]).mean() < np.abs(r2.layers[keys.DENOISED] - r2.layers[keys.LOGNORM]).mean()
    with pytest.raises(InputError, match="posterior_neighbours"):         # refused before training
        find_domains(sub.copy(), load_config(None, ["model.n_clusters=5", "model.posterior_neighbours=-1"]),
                     progress=False)


def test_plot_figures_false_draws_no_png_and_true_draws_them_without_training(tmp_path, synthetic_slice, caplog):
    """plot.figures=false: stages 1-3 write their outputs and no PNG, and remove those an earlier run drew (they
    would show other outputs); set true again on the finished run, stage 3 draws its figures from the saved
    outputs without training (stages 1-2 draw theirs when they next run), and false again removes them. Without
    an image stage 1 has no features to draw: an earlier run's figure of them is removed too."""
    from pipeline.runner import run_stages

    base = [f"data.path={synthetic_slice}", "data.truth=null", "model.epochs=2", "model.n_clusters=4"]
    out = tmp_path / "run"
    run_stages(load_config(None, base), out, "cpu", progress=False)
    drawn = {p.name for p in out.glob("*.png")}
    assert {"01_image_features.png", "02_enhanced.png", "03_domains.png", "03_denoised.png"} <= drawn
    base.append("image.use=none")
    run_stages(load_config(None, base), out, "cpu", progress=False)
    assert {p.name for p in out.glob("*.png")} == drawn - {"01_image_features.png"}
    run_stages(load_config(None, base + ["plot.figures=false"]), out, "cpu", force=True, progress=False)
    assert not list(out.glob("*.png")) and (out / "03_domains.h5ad").exists()

    def rerun(figures):
        caplog.clear()
        with caplog.at_level("INFO", logger="stpipe"):
            run_stages(load_config(None, base + [f"plot.figures={figures}"]), out, "cpu", progress=False)
        assert "M-STGCN:" not in caplog.text and "clustered again" not in caplog.text     # not trained, not clustered
        return {p.name for p in out.glob("*.png")}
    assert rerun("true") == drawn - {"01_image_features.png", "02_enhanced.png"}
    assert "figures redrawn" in caplog.text
    assert rerun("false") == set() and "plot.figures is false" in caplog.text
    assert rerun("false") == set() and "up to date, skipped" in caplog.text


def test_posterior_settings_update_a_finished_run_without_training(tmp_path, synthetic_slice, caplog):
    """model.posterior_layer / posterior_neighbours only add a layer computed after training (DEVLOG 332): turning
    it on, changing its neighbours or turning it off on a finished run updates that layer from the saved network
    (03_seed_networks.pt, kept for one seed too) without training, to what a full run writes; a run without that
    file retrains."""
    from pipeline.runner import run_stages

    base = [f"data.path={synthetic_slice}", "data.truth=null", "model.epochs=10", "model.n_clusters=5",
            "plot.figures=false"]
    out = tmp_path / "run"
    run_stages(load_config(None, base), out, "cpu", progress=False)
    net = out / "03_seed_networks.pt"
    first, written = ad.read_h5ad(out / "03_domains.h5ad"), net.stat().st_mtime_ns
    full = {}
    for change in (["model.posterior_layer=true"], ["model.posterior_layer=true", "model.posterior_neighbours=2"]):
        caplog.clear()
        with caplog.at_level("INFO", logger="stpipe"):
            run_stages(load_config(None, base + change), out, "cpu", progress=False)
        assert "computed from the saved network" in caplog.text and net.stat().st_mtime_ns == written
        got = ad.read_h5ad(out / "03_domains.h5ad")
        run_stages(load_config(None, base + change), tmp_path / f"full{len(change)}", "cpu", progress=False)
        full[len(change)] = want = ad.read_h5ad(tmp_path / f"full{len(change)}" / "03_domains.h5ad")
        np.testing.assert_array_equal(got.layers[keys.DENOISED_POSTERIOR], want.layers[keys.DENOISED_POSTERIOR])
        assert got.uns[keys.MSTGCN]["posterior_neighbours"] == want.uns[keys.MSTGCN]["posterior_neighbours"]
        np.testing.assert_array_equal(got.obsm[keys.EMBEDDING], first.obsm[keys.EMBEDDING])
        np.testing.assert_array_equal(got.layers[keys.DENOISED], first.layers[keys.DENOISED])
        assert got.obs[keys.DOMAIN].equals(first.obs[keys.DOMAIN])
    run_stages(load_config(None, base), out, "cpu", progress=False)            # off again: the layer dropped
    got = ad.read_h5ad(out / "03_domains.h5ad")
    assert keys.DENOISED_POSTERIOR not in got.layers and "posterior_neighbours" not in got.uns[keys.MSTGCN]
    assert net.stat().st_mtime_ns == written
    net.unlink()                        # as in a folder written before the network was kept for one seed
    caplog.clear()
    with caplog.at_level("INFO", logger="stpipe"):
        run_stages(load_config(None, base + ["model.posterior_layer=true"]), out, "cpu", progress=False)
    assert "was not saved; retraining" in caplog.text and net.exists()
    np.testing.assert_array_equal(ad.read_h5ad(out / "03_domains.h5ad").layers[keys.DENOISED_POSTERIOR],
                                  full[1].layers[keys.DENOISED_POSTERIOR])


def test_consensus_keeps_the_medoid_seed():
    """The labeling that agrees best with the others is kept; label names do not matter."""
    from pipeline.domains import consensus_run

    a = np.repeat([0, 1, 2], 20)
    b = np.repeat([5, 4, 3], 20)                     # a, renamed
    c = a.copy(); c[:3] = 1                          # a, three spots moved
    odd = np.tile([0, 1, 2], 20)                     # a different solution
    best, agreement = consensus_run([odd, c, a, b])
    assert best == 2 and agreement[2] == agreement[3] > agreement[1] > agreement[0]
    assert consensus_run([a]) == (0, [1.0])


def test_several_seeds_keep_one_of_them(synthetic_slice):
    """model.n_seeds=2: every output comes from one of the two seeded runs, which is recorded."""
    from data.readers import read_slide
    from pipeline.domains import _train_and_cluster, build_graphs, decoder_start, find_domains
    from pipeline.preprocess import pca

    from positions_enhancement.run_enhancement import enhance_slide

    cfg = load_config(None, ["model.n_clusters=5", "model.epochs=10", "preprocess.n_top_genes=null", "seed=3",
                             "model.n_seeds=2"])
    a = read_slide({"path": synthetic_slice})
    sub = enhance_slide(a, np.zeros((a.n_obs, 0), np.float32), cfg)
    both = find_domains(sub.copy(), cfg, progress=False)
    info = both.uns["mstgcn"]
    assert info["seeds"] == [3, 4] and info["seed_kept"] in (3, 4) and len(info["seed_agreement"]) == 2
    feats = pca(sub.layers[keys.ENHANCED], cfg["model"]["input_pcs"], seed=3)
    kept = _train_and_cluster(sub, cfg, feats, build_graphs(sub, cfg, feats), 5, info["seed_kept"], "cpu", False,
                              decoder_start(sub, cfg, 3))
    np.testing.assert_array_equal(both.obsm[keys.EMBEDDING], kept["embedding"])
    with pytest.raises(InputError):
        find_domains(sub.copy(), load_config(None, ["model.n_clusters=5", "model.n_seeds=0"]), progress=False)


def test_a_handful_of_spots_gives_a_clear_error_or_a_result(tmp_path):
    """Tiny slides: the seurat_v3 gene ranking cannot fit its loess on a few spots (a clear error that
    says how to avoid it); clustering with fewer spots than PCs still runs; metrics stay strict JSON."""
    import scipy.sparse as sp

    from pipeline.clustering import gaussian_mixture_labels
    from pipeline.preprocess import seurat_v3_top_genes
    from pipeline.stages import save_json

    counts = sp.csr_matrix(np.random.default_rng(0).poisson(0.5, (8, 400)).astype(np.float32))
    with pytest.raises(InputError, match="8 spots.*superres.genes"):
        seurat_v3_top_genes(counts, 50, "name the genes: --set 'superres.genes=[GENE1, GENE2]'")
    with pytest.raises(InputError, match="at least 2 spots, and there is 1"):    # one spot crashed the interpreter
        seurat_v3_top_genes(counts[:1], 50, "name the genes")
    # asked for as many genes as there are (stage 4 on an 8-gene file): all kept, no loess to fail
    assert seurat_v3_top_genes(counts[:, :50], 50, "name the genes").all()
    labels = gaussian_mixture_labels(np.random.default_rng(1).normal(size=(8, 32)), 3, n_pcs=20)
    assert labels.shape == (8,) and len(set(labels)) <= 3
    save_json(tmp_path / "m.json", {"ssim": float("nan"), "pcc": np.float32(0.5), "v": np.array([1.0, np.inf])})
    assert json.loads((tmp_path / "m.json").read_text()) == {"ssim": None, "pcc": 0.5, "v": [1.0, None]}


@pytest.mark.parametrize("side", [20, 120])
def test_spot_maps_tile_the_tissue_at_any_spot_count(tmp_path, side):
    """Markers are sized from the spot spacing, so a 400-spot and a 14,400-spot hexagonal slide both
    fill their tissue (a fixed marker area left the large one as faint dots on white)."""
    from PIL import Image

    from pipeline.graphs import median_nearest_distance
    from pipeline.plotting import spot_maps

    i = np.arange(side * side)
    xy = np.c_[i % side + 0.5 * (i // side % 2), i // side * np.sqrt(3) / 2] * 100.0
    assert median_nearest_distance(xy) == pytest.approx(100.0)
    path = spot_maps(xy, {"v": np.zeros(len(xy))}, tmp_path / "m.png", ncols=1)
    rgb = np.asarray(Image.open(path).convert("RGB"), float)
    data = (np.abs(rgb - [255, 255, 255]).sum(2) > 30) & (np.abs(rgb - rgb[..., :1]).sum(2) > 30)   # coloured
    rows, cols = np.flatnonzero(data.any(1)), np.flatnonzero(data.any(0))
    inner = data[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    inner = inner[inner.shape[0] // 10: -inner.shape[0] // 10, inner.shape[1] // 10: -inner.shape[1] // 10]
    assert inner.mean() > 0.75

def test_domain_colours_follow_the_truth_layer_they_overlap(tmp_path):
    """The domains panel draws each domain in the colour of the truth label it shares most spots with
    (one to one); a domain left over gets a colour no label uses; unannotated spots take no part."""
    from pipeline.plotting import matched_label_colors, spot_maps

    domains = np.array(["0", "0", "0", "1", "1", "2", "2", "3", "3"])
    truth = np.array(["L2", "L2", "L1", "L1", "L1", "L2", "L2", None, None], dtype=object)
    dom_colors, truth_colors = matched_label_colors(domains, truth)
    assert set(truth_colors) == {"L1", "L2"}
    assert dom_colors["1"] == truth_colors["L1"]
    assert dom_colors["2"] == truth_colors["L2"] or dom_colors["0"] == truth_colors["L2"]
    assert len({dom_colors[d] for d in "0123"}) == 4          # one to one: leftovers get new colours
    assert {dom_colors[d] for d in "0123"} - set(truth_colors.values())                  # some are new
    xy = np.c_[np.arange(9), np.zeros(9)] * 100.0
    path = spot_maps(xy, {"domains": domains, "truth": truth}, tmp_path / "d.png",
                     colors={"domains": dom_colors, "truth": truth_colors})
    assert path.exists()
    he = np.full((20, 900, 3), 200, np.uint8)                      # the H&E beside the maps, not under them
    path = spot_maps(xy, {"domains": domains, "H&E": None}, tmp_path / "he.png", image=he, image_scale=1.0,
                     under_spots=False, colors={"domains": dom_colors})
    assert path.stat().st_size > 1000
    with pytest.raises(ValueError):
        matched_label_colors(domains, truth[:5])
    from matplotlib.colors import to_hex

    from pipeline.plotting import scanpy_colors
    assert scanpy_colors(["0", "1", "2", "3"], dom_colors) == [to_hex(dom_colors[d]) for d in "0123"]
    assert scanpy_colors(["10", "2"]) == [to_hex(c) for c in reversed(scanpy_colors(["2", "10"]))]   # natural order


def test_labels_with_missing_values_under_pandas_3s_text():
    """pandas 3 keeps a missing value missing under ``astype(str)``, where pandas 2 wrote 'nan': the figures' label
    strings then crashed the domain colours of every slide with unannotated spots (DLPFC's) and would have
    crashed the message for a spot given two labels. Run under pandas 3's text: pandas 2.3's preview of it
    (``future.infer_string``) here, the real thing under pandas 3 (DEVLOG 357)."""
    import contextlib

    from data.readers import _check_one_label_per_spot
    from pipeline.plotting import _label_strings, matched_label_colors

    if int(pd.__version__.split(".")[0]) >= 3:
        text = contextlib.nullcontext()
    else:
        try:
            pd.get_option("future.infer_string")
        except KeyError:                       # pandas.errors.OptionError: pandas < 2.1 has no preview
            pytest.skip(f"pandas {pd.__version__} has no preview of pandas 3's text")
        text = pd.option_context("future.infer_string", True)
    with text:
        truth = pd.Series(["L1", "L1", np.nan, "L2", None, "L2"], dtype=object)
        assert list(_label_strings(truth)) == ["L1", "L1", "n/a", "L2", "n/a", "L2"]
        assert list(_label_strings(pd.Categorical(["a", None]))) == ["a", "n/a"]
        dom_colors, truth_colors = matched_label_colors(np.array(["0", "0", "0", "1", "1", "1"]), truth.to_numpy())
        assert set(truth_colors) == {"L1", "L2"} and dom_colors["0"] == truth_colors["L1"]
        with pytest.raises(InputError, match=r"spot 's1' has more than one label \((L1, nan|nan, L1)\)"):
            _check_one_label_per_spot(pd.Series(["L1", np.nan], index=["s1", "s1"]), "t.txt")



def test_morans_i_by_hand_and_the_genes_the_figures_draw():
    """Moran's I on two pairs of neighbours (k=1): a pattern shared within pairs gives 1, one that
    alternates within pairs -1, a constant gene NaN. The figures' default genes are the most
    spatially patterned ones, not the highest-mean or most variable (a flat, high or noisy gene)."""
    from pipeline.metrics import morans_i, most_patterned_genes

    xy = np.array([[0.0, 0], [1, 0], [10, 0], [11, 0]])
    X = np.array([[1.0, 1, 5], [1, -1, 5], [-1, 1, 5], [-1, -1, 5]])
    i = morans_i(X, xy, k=1)
    assert i[0] == pytest.approx(1.0) and i[1] == pytest.approx(-1.0) and np.isnan(i[2])
    rng = np.random.default_rng(0)
    col, row = np.meshgrid(np.arange(30), np.arange(30))
    xy = np.c_[col.ravel(), row.ravel()] * 100.0
    smooth = np.sin(xy[:, 0] / 600) + np.cos(xy[:, 1] / 900)
    X = np.c_[10 + 0.1 * rng.normal(size=900), 5 * rng.normal(size=900), smooth + 0.3 * rng.normal(size=900),
              np.full(900, 3.0)]
    assert most_patterned_genes(X, xy, ["flat_high", "noisy", "pattern", "constant"], 1) == ["pattern"]


def test_spatial_coherence_by_hand():
    """CHAOS and PAS (SDMBench's definitions) on ten spots in a row, split 5 / 5 with spot 2 flipped: CHAOS sums
    each spot's distance to its nearest same-label spot in standardised coordinates (1, 1, 1, 1 for a's four;
    3 from spot 2 to spot 5, then 1 x 5 for b) over 10 spots; PAS flags the spot whose 2 nearest both differ.
    A label of 1-2 spots adds nothing to CHAOS, as published; one spot has no score."""
    from pipeline.metrics import spatial_coherence

    xy = np.c_[np.arange(10.0), np.zeros(10)] * 100
    labels = list("aabaabbbbb")
    got = spatial_coherence(labels, xy, k=2)
    assert got["chaos"] == pytest.approx(12 / np.arange(10.0).std() / 10)
    assert got["pas"] == pytest.approx(0.1)
    pair = spatial_coherence(list("ccaaaaaaaa"), xy, k=2)     # 'c' has 2 spots: only a's 8 x 1 are summed
    assert pair["chaos"] == pytest.approx(8 / np.arange(10.0).std() / 10) and pair["pas"] == 0.0
    assert np.isnan(spatial_coherence(["a"], xy[:1])["chaos"])


def test_gene_lists_match_names_ignoring_case_when_unambiguous(caplog):
    """plot.genes=mobp drew nothing ('not among the modelled genes'); a name that matches one gene
    when case is ignored is taken, saying so. Two genes equal but for case are not guessed between."""
    from pipeline.preprocess import match_gene_names

    with caplog.at_level("INFO", logger="stpipe"):
        found, missing = match_gene_names(["mobp", "PCP4", "MOBP", "nope", "snap25"],
                                          ["MOBP", "PCP4", "SNAP25", "Snap25"], "plot.genes")
    assert found == ["MOBP", "PCP4"] and missing == ["nope", "snap25"]
    assert "plot.genes: matched ignoring case: mobp -> MOBP" in caplog.text
    assert match_gene_names(["Snap25"], ["SNAP25", "Snap25"], "k") == (["Snap25"], [])   # exact first


def test_relative_paths_of_a_config_file_may_be_relative_to_it(tmp_path, synthetic_slice):
    """A config kept beside its data (data.path: slides/x) failed unless run from that folder. A relative
    input path that exists neither from the working directory nor from the repository is taken from
    the config file's folder; the shipped configs (paths from the repository) are unchanged."""
    (tmp_path / "slides").mkdir()
    (tmp_path / "slides" / "x").symlink_to(synthetic_slice)
    (tmp_path / "weights.pt").write_bytes(b"")
    cfg_file = tmp_path / "my.yaml"
    cfg_file.write_text("data:\n  path: slides/x\n  truth: slides/x/truth.txt\nimage:\n  weights: weights.pt\n"
                        "test:\n  sections:\n    - slides/x\n    - {path: slides/x, name: b}\n")
    cfg = load_config(cfg_file, ["data.counts=slides/x"])          # --set paths stay as given
    assert cfg["data"]["path"] == str(tmp_path / "slides" / "x") and cfg["data"]["counts"] == "slides/x"
    assert cfg["data"]["truth"] == str(tmp_path / "slides" / "x" / "truth.txt")
    assert cfg["image"]["weights"] == str(tmp_path / "weights.pt")
    assert cfg["test"]["sections"] == [str(tmp_path / "slides" / "x"), {"path": str(tmp_path / "slides" / "x"), "name": "b"}]
    assert os.getcwd() != str(tmp_path)
    shipped = load_config(ROOT / "configs" / "dlpfc.yaml")
    assert shipped["data"]["path"].startswith("../shared/data")


def test_scripts_take_input_paths_as_absolute(tmp_path, synthetic_slice, monkeypatch):
    """The scripts make every input path that exists absolute (symbolic links kept), so the config a run
    saves repeats it from any directory and two spellings of a path are one input to the fingerprints;
    a path found nowhere stays as typed for its stage's error."""
    from pipeline.config import absolute_input_paths

    (tmp_path / "slides").mkdir()
    (tmp_path / "slides" / "x").symlink_to(synthetic_slice)
    monkeypatch.chdir(tmp_path)
    typed = {"data": {"path": "./slides/x/", "truth": "slides/x/truth.txt", "image": None, "name": "x"},
             "test": {"sections": ["slides/x", {"path": "slides/x", "name": "b"}, {"path": "nowhere/y"}]},
             "image": {"weights": ""}, "predict": {"model_file": "missing.pt"}, "model": {"name": "slides/x"}}
    cfg = absolute_input_paths(typed)
    x = str(tmp_path / "slides" / "x")
    assert cfg["data"] == {"path": x, "truth": x + "/truth.txt", "image": None, "name": "x"}
    assert cfg["test"]["sections"] == [x, {"path": x, "name": "b"}, {"path": "nowhere/y"}]
    assert cfg["image"]["weights"] == "" and cfg["predict"]["model_file"] == "missing.pt"
    assert cfg["model"]["name"] == "slides/x" and typed["data"]["path"] == "./slides/x/"    # not a path; a copy


def test_ctrl_c_is_one_line_and_status_130(capsys):
    from pipeline.cli import run_main

    def interrupted():
        raise KeyboardInterrupt
    with pytest.raises(SystemExit) as info:
        run_main(interrupted)
    assert info.value.code == 130 and "rerun" in capsys.readouterr().err


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SIGINT sent to a child process")
def test_ctrl_c_while_a_tiled_image_is_read_is_still_one_line(tmp_path):
    """Ctrl-C while a tiled TIFF's tiles were being read (a streamed full-resolution image, a whole slide) printed
    its one line, then hundreds of lines of asyncio warnings from zarr's tile reads left running."""
    import signal
    import time

    import tifffile
    from conftest import ZARR_IMPORTED_QUIETLY

    tif = tmp_path / "big.tif"
    rng = np.random.default_rng(0)
    tifffile.imwrite(tif, rng.integers(0, 256, (3000, 3000, 3), dtype=np.uint8), photometric="rgb", tile=(256, 256),
                     compression="zlib")
    code = ("import sys; from data.wsi import open_whole_slide; from pipeline.cli import run_main\n"
            "def read():\n    slide = open_whole_slide(sys.argv[1])\n    print('reading', flush=True)\n"
            "    while True:\n        slide.read_region(0, 0, 3000, 3000)\n"
            "run_main(read)")
    child = subprocess.Popen([sys.executable, "-c", ZARR_IMPORTED_QUIETLY + code, str(tif)], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert child.stdout.readline().strip() == "reading"
    time.sleep(1.0)                                    # inside a region's read nearly all of the time
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=60)
    assert child.returncode == 130 and err.strip().startswith("interrupted:") and len(err.strip().splitlines()) == 1


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SIGTERM sent to a child process")
def test_sigterm_is_one_line_and_leaves_no_temporary_file(tmp_path):
    """SIGTERM (a scheduler's time limit) ended the process at once, leaving a stage's half-written temporary file
    in --out; now it stops as Ctrl-C does: one line, status 143, the temporary file removed."""
    import signal

    code = ("import sys, time; from pathlib import Path; from pipeline.cli import run_main\n"
            "from pipeline.stages import atomic_write\n"
            "def slow(tmp):\n    Path(tmp).write_text('half'); print('writing', flush=True); time.sleep(60)\n"
            "run_main(lambda: atomic_write(Path(sys.argv[1]) / '03_domains.h5ad', slow))")
    child = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "writing" and len(list(tmp_path.iterdir())) == 1
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=60)
    assert child.returncode == 143 and err.strip().startswith("terminated (SIGTERM):")
    assert len(err.strip().splitlines()) == 1 and list(tmp_path.iterdir()) == []


def test_every_default_config_key_is_in_the_readme():
    """The README's config tables cover configs/defaults.yaml (no key a user cannot look up)."""
    import yaml

    defaults = yaml.safe_load((ROOT / "configs" / "defaults.yaml").read_text())
    readme = (ROOT / "README.md").read_text()

    def leaves(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict) and v:
                yield from leaves(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}"
    missing = [k for k in leaves(defaults) if f"`{k}`" not in readme and f"`{k.rsplit('.', 1)[-1]}`" not in readme]
    assert not missing


def test_legend_order_is_natural():
    from pipeline.plotting import _natural_key

    assert sorted(["10", "2", "n/a", "0"], key=_natural_key) == ["0", "2", "10", "n/a"]
    assert sorted(["Layer10", "WM", "Layer2"], key=_natural_key) == ["Layer2", "Layer10", "WM"]


def test_outputs_of_another_code_version_are_redone(tmp_path, monkeypatch, caplog):
    """A stamp written by another version of the pipeline's code does not make a stage up to date."""
    from pipeline import stages

    np.save(tmp_path / "x.npy", np.zeros(3))
    fp = stages.fingerprint({"a": 1})
    stages.write_stamp(tmp_path, "s", fp)
    assert stages.is_fresh(tmp_path, "s", fp, ["x.npy"])
    assert stages.code_version() == stages.code_version() and len(stages.code_version()) == 16
    monkeypatch.setattr(stages, "code_version", lambda: "another-version")
    with caplog.at_level("INFO", logger="stpipe"):
        assert not stages.is_fresh(tmp_path, "s", stages.fingerprint({"a": 1}), ["x.npy"])
    assert "another version" in caplog.text


def test_domain_labels_are_in_numeric_order():
    from pipeline.domains import domain_categorical

    c = domain_categorical(np.array([10, 2, 0, 11, 1, 2]))
    assert list(c.categories) == ["0", "1", "2", "10", "11"] and list(c) == ["10", "2", "0", "11", "1", "2"]


def test_denoised_expression_is_the_nb_expectation_of_lognorm_computed_in_chunks(monkeypatch):
    """layers['denoised'] = E[log1p(1e4 X / L)] under the decoder's NB, checked against scipy's NB summed to
    far beyond the mass; and the rates pass through float64 a chunk of spots at a time with exactly the result
    of doing it whole (memory only)."""
    from scipy.stats import nbinom

    import pipeline.domains as domains
    from pipeline.preprocess import expected_lognorm_nb

    rng = np.random.default_rng(0)
    n, g = 300, 40
    log_rate = rng.normal(0, 2.5, (n, g)).astype(np.float32)        # from ~0.001 to ~2,000 per 10k UMIs
    theta = rng.uniform(0.3, 20, g).astype(np.float32)
    depth = rng.uniform(200, 20000, n)
    whole = np.exp(log_rate.astype(np.float64))
    monkeypatch.setattr(domains, "RATE_ROWS", 7)
    rate, mean = domains.decoder_rates(log_rate)
    np.testing.assert_array_equal(rate, whole.astype(np.float32))
    np.testing.assert_array_equal(mean, np.log1p(whole).astype(np.float32))
    got = expected_lognorm_nb(rate, theta, depth)
    assert got.shape == (n, g) and got.dtype == np.float32
    np.testing.assert_array_equal(got, expected_lognorm_nb(whole, theta, depth))   # float64 input: the same
    def by_scipy(mu, th, depth):
        k = np.arange(int(mu + 60 * np.sqrt(mu + mu ** 2 / th)) + 50)
        return (nbinom.pmf(k, th, th / (th + mu)) * np.log1p(1e4 * k / depth)).sum()

    for i, j in [(0, 0), (5, 17), (123, 39), (299, 8)] + [tuple(np.unravel_index(np.argmax(rate), rate.shape))]:
        want = by_scipy(depth[i] * float(rate[i, j]) / 1e4, float(theta[j]), depth[i])
        assert got[i, j] == pytest.approx(want, abs=2e-3), (i, j)
    # means from sparse to far beyond the 400 counts summed one by one (the tail then summed on a grid:
    # it was put on count 400, 0.9 too low at a mean of 1,000), dispersions from wide to near Poisson
    means, thetas = np.array([0.5, 50, 125, 1000, 3000]), np.array([0.2, 1, 10], np.float32)
    for depth in (500, 20000):
        rates = np.tile((means * 1e4 / depth)[:, None], (1, len(thetas))).astype(np.float32)
        got = expected_lognorm_nb(rates, thetas, np.full(len(means), depth))
        want = [[by_scipy(float(r) * depth / 1e4, float(th), depth) for r, th in zip(row, thetas)] for row in rates]
        np.testing.assert_allclose(got, want, atol=3e-3)
    # the probabilities are exponentiated with what falls below exp(-87) set to 0 (at and below float32's smallest
    # normal number, where the CPU's exp is ~50x slower), and the rest exactly as torch.exp gives them
    import torch

    from pipeline.preprocess import EXP_FLOOR, _exp_flushing_tiny
    logp = torch.tensor([0.0, -20.0, EXP_FLOOR, EXP_FLOOR - 0.01, -95.0, -1e4, -np.inf])
    np.testing.assert_array_equal(_exp_flushing_tiny(logp.clone()), torch.exp(logp) * (logp >= EXP_FLOOR))


def test_dispersion_refit_recovers_each_genes_theta_and_denoised_includes_the_zero_inflation(monkeypatch):
    """Training moves theta little from its start (DEVLOG 305, 390), so it is refit by maximum likelihood with the
    decoder's mean and zero-inflation held fixed: on counts drawn from a ZINB with known theta per gene it comes
    back close, in chunks of spots as whole, and from a seeded subset of the spots (the cap on large slides); and
    layers['denoised'] is (1 - pi) times the NB expectation."""
    import scipy.sparse as sp
    from scipy.special import expit

    import pipeline.domains as domains
    from pipeline.preprocess import expected_lognorm_nb

    rng = np.random.default_rng(3)
    n = 6000
    thetas = np.array([0.3, 2.0, 15.0, 1e5])                      # wide, moderate, narrow, Poisson
    depth = rng.uniform(1000, 8000, n)
    rate = np.exp(rng.normal(np.log(8.0), 0.7, (n, len(thetas)))).astype(np.float32)       # per 10k UMIs
    logits = rng.normal(-1.0, 0.8, (n, len(thetas))).astype(np.float32)
    mu = rate * depth[:, None] / 1e4
    counts = rng.poisson(rng.gamma(thetas, mu / thetas)) * (rng.random(mu.shape) > expit(logits))
    monkeypatch.setattr(domains, "DISPERSION_ROWS", 1024)        # 6 chunks
    got = domains.refit_dispersion(sp.csr_matrix(counts), rate, logits, depth)
    assert got.shape == (4,)
    np.testing.assert_allclose(got[:3], thetas[:3], rtol=0.2)
    assert got[3] > 100 and got.max() <= domains.DISPERSION_RANGE[1]
    monkeypatch.setattr(domains, "DISPERSION_ROWS", 10 ** 6)     # one chunk: the same search
    np.testing.assert_allclose(domains.refit_dispersion(counts, rate, logits, depth), got, rtol=1e-4)
    monkeypatch.setattr(domains, "DISPERSION_MAX_SPOTS", 3000)  # a seeded random half of the spots: close, and seeded
    half = domains.refit_dispersion(counts, rate, logits, depth, seed=1)
    np.testing.assert_allclose(half[:3], thetas[:3], rtol=0.25)
    assert half[3] > 100 and not np.array_equal(half, got)
    np.testing.assert_array_equal(domains.refit_dispersion(counts, rate, logits, depth, seed=1), half)
    monkeypatch.setattr(domains, "RATE_ROWS", 1000)
    want = expected_lognorm_nb(rate, got, depth) * (1 - expit(logits))
    np.testing.assert_allclose(domains.expected_lognorm_zinb(rate, got, logits, depth), want, rtol=1e-6)


def test_gene_null_fit_recovers_each_genes_rate_and_dispersion():
    """The decoder's start with model.decoder_start=genes (DEVLOG 390): on NB counts with one rate per gene over
    every spot, at the spots' own depths, each gene's rate (CP10k) and dispersion come back; a gene with no counts
    gets the decoder's floor; an unknown start is refused by name."""
    import scipy.sparse as sp

    from pipeline.domains import decoder_start, gene_null_fit

    rng = np.random.default_rng(5)
    n = 4000
    rates, thetas = np.array([2.0, 20.0, 200.0, 1.0]), np.array([0.3, 2.0, 15.0, 1.0])
    depth = rng.uniform(1000, 8000, n)
    mu = rates * depth[:, None] / 1e4
    counts = rng.poisson(rng.gamma(thetas, mu / thetas))
    counts[:, 3] = 0
    log_rate, theta = gene_null_fit(sp.csr_matrix(counts), depth)
    np.testing.assert_allclose(np.exp(log_rate[:3]), rates[:3], rtol=0.05)
    np.testing.assert_allclose(theta[:3], thetas[:3], rtol=0.15)
    assert log_rate[3] == -15.0 and theta.shape == (4,)
    adata = ad.AnnData(sp.csr_matrix(counts.astype(np.float32)))
    adata.obs[keys.TOTAL_COUNTS] = depth
    assert decoder_start(adata, {"model": {"decoder_start": "zero"}}, 0) is None
    got = decoder_start(adata, {"model": {"decoder_start": "genes"}}, 0)
    np.testing.assert_array_equal(got[0], log_rate)
    with pytest.raises(InputError, match="model.decoder_start='data'"):
        decoder_start(adata, {"model": {"decoder_start": "data"}}, 0)


def test_expected_lognorm_takes_one_shape_per_entry():
    """expected_lognorm_nb with theta (n, g) (a posterior's shape per spot and gene) equals the per-gene form where
    every spot has its gene's theta, and differs per spot where the shapes differ; a theta of another shape is
    refused."""
    from pipeline.preprocess import expected_lognorm_nb

    rng = np.random.default_rng(0)
    rate = rng.uniform(0.5, 40, (300, 5)).astype(np.float32)
    depth = rng.uniform(500, 5000, 300)
    theta = np.array([0.05, 0.5, 3.0, 50.0, 1e4], np.float32)
    per_gene = expected_lognorm_nb(rate, theta, depth, block=64)
    np.testing.assert_allclose(expected_lognorm_nb(rate, np.tile(theta, (300, 1)), depth, block=64), per_gene,
                               rtol=1e-6, atol=1e-7)
    shapes = np.tile(theta, (300, 1))
    shapes[:150, 0] = 1e4                          # near-Poisson in the first half: a higher expected log1p
    mixed = expected_lognorm_nb(rate, shapes, depth, block=64)
    np.testing.assert_allclose(mixed[150:], per_gene[150:], rtol=1e-6, atol=1e-7)
    assert (mixed[:150, 0] > per_gene[:150, 0]).all()
    with pytest.raises(ValueError):
        expected_lognorm_nb(rate, shapes[:10], depth)


def test_nearest_spots_are_directed_and_keep_to_a_section():
    """Each spot's k nearest other spots (and any tied with the k-th), itself left out, not symmetrised; in a
    joint run only its own section's (the sections' coordinates overlap), and fewer where a section has fewer
    spots."""
    from pipeline.domains import nearest_spots

    xy = np.array([[0, 0], [1, 0], [3, 0], [10, 0], [0, 0.1], [5, 0]], float)
    a = ad.AnnData(np.zeros((6, 1), np.float32))
    a.obsm[keys.SPATIAL] = xy
    A = nearest_spots(a, 1).toarray()
    assert A.sum(1).tolist() == [1, 1, 2, 1, 1, 1] and np.diag(A).sum() == 0   # spot 2 is as far from 1 as from 5
    assert A[0, 4] == A[4, 0] == 1 and A[1, 0] == 1 and A[3, 5] == 1 and A[5, 2] == 1 and A[2, 1] == A[2, 5] == 1
    assert A[5, 3] == 0                            # spot 3's nearest is 5, not the other way round: directed
    a.obs[keys.SECTION] = ["s1", "s1", "s1", "s2", "s2", "s2"]
    A = nearest_spots(a, 1).toarray()
    assert A[0, 1] == 1 and A[4, 5] == 1 and A[:3, 3:].sum() == 0 and A[3:, :3].sum() == 0
    assert nearest_spots(a, 5).toarray().sum(1).tolist() == [2] * 6      # a section of 3 has 2 others
    assert nearest_spots(a, 0).nnz == 0


def test_nearest_spots_keep_every_spot_tied_with_the_kth():
    """Spots as far as the k-th nearest all count (DEVLOG 330): on a square grid k = 6 is the 4 adjacent and all 4
    diagonal spots (not 2 diagonals by the search's order), on a hex grid the ring of 6; a tie larger than the
    first search (30 spots on a circle) is found whole."""
    from pipeline.domains import nearest_spots

    def spots(xy):
        a = ad.AnnData(np.zeros((len(xy), 1), np.float32))
        a.obsm[keys.SPATIAL] = np.asarray(xy, float)
        return a

    sq = np.c_[np.arange(100) % 10, np.arange(100) // 10] * 8.0
    inner = np.all((sq > 0) & (sq < 72), axis=1)
    A = nearest_spots(spots(sq), 6)
    assert (np.asarray(A.sum(1)).ravel()[inner] == 8).all()
    r, c = A.nonzero()
    assert set(np.round(np.linalg.norm(sq[r] - sq[c], axis=1)[inner[r]], 6)) == {8.0, round(8 * np.sqrt(2), 6)}
    rows, cols = np.meshgrid(np.arange(12), np.arange(12), indexing="ij")
    hx = np.c_[cols.ravel() + 0.5 * (rows.ravel() % 2), rows.ravel() * np.sqrt(3) / 2] * 100.0
    inner = np.all((hx > 150) & (hx < 950), axis=1)
    assert (np.asarray(nearest_spots(spots(hx), 6).sum(1)).ravel()[inner] == 6).all()
    t = np.linspace(0, 2 * np.pi, 30, endpoint=False)
    ring = np.r_[[[0.0, 0.0]], np.c_[np.cos(t), np.sin(t)] * 5.0, [[40.0, 0.0]]]
    A = nearest_spots(spots(ring), 1).toarray()
    assert A[0, 1:31].sum() == 30 and A[0, 31] == 0


def test_posterior_layer_updates_the_decoders_prior_by_the_counts():
    """layers['denoised_posterior'] (DEVLOG 320-321), worked by hand: a Gamma(theta, theta / rho) prior on the
    rate, updated by the counts and depths of the spot and its neighbours, read out as the NB predictive at the
    spot's depth times (1 - pi); a zero counts as a measurement in proportion to its chance of being a sampling
    zero; a tight prior (large theta) gives back the decoder's own layer."""
    import scipy.sparse as sp
    from scipy.special import expit

    from pipeline.domains import expected_lognorm_zinb, posterior_lognorm
    from pipeline.preprocess import expected_lognorm_nb

    counts = np.array([[3, 0], [7, 0], [0, 5]], np.float32)
    rate = np.array([[20.0, 8.0], [30.0, 8.0], [10.0, 4.0]], np.float32)     # per 10k UMIs
    depth = np.array([2000.0, 4000.0, 1000.0])
    theta = np.array([2.0, 0.5])
    neighbours = sp.csr_matrix(np.array([[0, 1, 0], [0, 0, 0], [1, 0, 0]], np.float32))   # 0 <- 1, 2 <- 0
    no_zi = np.full((3, 2), -40.0, np.float32)                 # pi = 0: every zero is a sampling zero
    got = posterior_lognorm(sp.csr_matrix(counts), rate, theta, no_zi, depth, neighbours)
    a = theta[0] + 3 + 7                                         # spot 0, gene 0: its counts and spot 1's
    b = theta[0] / 20.0 + (2000 + 4000) / 1e4
    want = expected_lognorm_nb(np.array([[a / b]], np.float32), np.array([[a]], np.float32), depth[:1])[0, 0]
    assert got[0, 0] == pytest.approx(want, rel=1e-5)
    a, b = theta[1] + 5 + 0, theta[1] / 4.0 + (1000 + 2000) / 1e4    # spot 2, gene 1: spot 0's zero counts fully
    want = expected_lognorm_nb(np.array([[a / b]], np.float32), np.array([[a]], np.float32), depth[2:])[0, 0]
    assert got[2, 1] == pytest.approx(want, rel=1e-5)
    logits = np.full((3, 2), 0.5, np.float32)                   # pi = 0.62: spot 0's zero counts in part only
    got = posterior_lognorm(counts, rate, theta, logits, depth, neighbours)
    pi, mu = expit(0.5), 8.0 * 2000 / 1e4
    nb0 = (theta[1] / (theta[1] + mu)) ** theta[1]
    weight = (1 - pi) * nb0 / (pi + (1 - pi) * nb0)
    a, b = theta[1] + 5, theta[1] / 4.0 + (1000 + weight * 2000) / 1e4
    want = expected_lognorm_nb(np.array([[a / b]], np.float32), np.array([[a]], np.float32), depth[2:])[0, 0]
    assert got[2, 1] == pytest.approx(want * (1 - pi), rel=1e-5)
    tight = np.array([1e7, 1e7])                                # the prior outweighs any count: the decoder's layer
    np.testing.assert_allclose(posterior_lognorm(counts, rate, tight, logits, depth, neighbours),
                               expected_lognorm_zinb(rate, tight, logits, depth), rtol=1e-3)


def test_domain_paga_connects_domains_that_meet_in_the_embedding():
    """The domains' PAGA graph (plot.umap): scanpy's v1.2 connectivity of each pair of domains, checked against
    its definition counted here by brute force, on domains laid in order along a line in the embedding (their
    numbers shuffled), so that only neighbouring domains connect and the spanning tree is the line."""
    import matplotlib
    import scanpy as sc

    from pipeline.domains import GRAPH_MIN_SPOTS, UMAP_NEIGHBOURS, domain_categorical, domain_paga, paga_table

    rng = np.random.default_rng(0)
    n = 300
    line = np.sort(rng.uniform(0, 10, n))
    embedding = np.c_[line, 0.05 * rng.normal(size=(n, 7))].astype(np.float32)
    order = np.array([3, 0, 4, 1, 2])                   # domain numbers along the line
    domains = order[np.minimum((line / 2).astype(int), 4)]
    a = ad.AnnData(np.zeros((n, 1), np.float32), obsm={keys.EMBEDDING: embedding})
    a.obs[keys.DOMAIN] = domain_categorical(domains)
    domain_paga(a)
    conn = a.uns[keys.PAGA]["connectivities"].toarray()
    assert a.uns[keys.PAGA]["groups"] == keys.DOMAIN and conn.shape == (5, 5)
    assert np.allclose(conn, conn.T) and (conn >= 0).all() and (conn <= 1).all()
    np.testing.assert_array_equal(a.uns[keys.DOMAIN_SIZES], np.bincount(domains))
    # v1.2 by hand: directed edges from each spot to its 14 nearest others; e_ij counts both directions,
    # es_i all of group i's edges; connectivity = min(1, e_ij / ((es_i n_j + es_j n_i) / (n - 1)))
    d = ((embedding[:, None] - embedding[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    near = np.argsort(d, axis=1)[:, :UMAP_NEIGHBOURS - 1]
    e = np.zeros((5, 5))
    np.add.at(e, (np.repeat(domains, UMAP_NEIGHBOURS - 1), domains[near].ravel()), 1)
    sizes, es = np.bincount(domains), e.sum(1)
    between = e + e.T
    want = np.minimum(1, between / ((es[:, None] * sizes[None] + es[None] * sizes[:, None]) / (n - 1)))
    np.fill_diagonal(want, 0)
    np.testing.assert_allclose(conn, want, rtol=1e-6)
    table = paga_table(a)
    tree = {frozenset(map(int, pair)) for pair in table[table["tree"]][["domain_a", "domain_b"]].to_numpy()}
    assert tree == {frozenset(p) for p in zip(order[:-1], order[1:])}       # the line, in its order
    assert list(table.columns) == ["domain_a", "domain_b", "connectivity", "tree"]
    assert table["connectivity"].is_monotonic_decreasing and len(table) == 4   # only neighbours meet
    matplotlib.use("Agg")
    sc.pl.paga(a, show=False)                         # scanpy reads what was written
    few = a[:GRAPH_MIN_SPOTS - 1].copy()
    few.obs[keys.DOMAIN] = domain_categorical(domains[:GRAPH_MIN_SPOTS - 1])
    domain_paga(few)
    assert keys.PAGA not in few.uns and keys.DOMAIN_SIZES not in few.uns and paga_table(few).empty


def test_out_folder_expands_home(tmp_path, monkeypatch):
    """--out '~/runs/a' (quoted, or output.dir in a config file) is under the home folder, not a folder
    literally named '~' in the working directory."""
    from pipeline.cli import build_parser, setup

    monkeypatch.setenv("HOME", str(tmp_path))
    args = build_parser("x", "configs/dlpfc.yaml").parse_args(["--out", "~/runs/a", *NO_INPUTS])
    _, out, _ = setup(args, [])
    assert out == tmp_path / "runs" / "a" and out.is_dir()


def test_setup_silences_opencv_4_and_5(tmp_path, monkeypatch):
    """OpenCV 4.x has cv2.setLogLevel and no cv2.utils.logging (OpenCV 5's): every script stopped with an
    AttributeError under opencv-python 4.x, which requirements.txt allows (>= 4.7). Both are silenced."""
    import types

    from pipeline.cli import build_parser, setup

    calls = []
    cv4 = types.SimpleNamespace(setLogLevel=calls.append)
    logging5 = types.SimpleNamespace(LOG_LEVEL_SILENT=0, setLogLevel=calls.append)
    cv5 = types.SimpleNamespace(utils=types.SimpleNamespace(logging=logging5))
    args = build_parser("x", "configs/dlpfc.yaml").parse_args(["--out", str(tmp_path / "o"), *NO_INPUTS])
    for fake in (cv4, cv5):
        monkeypatch.setitem(sys.modules, "cv2", fake)
        setup(args, [])
    assert calls == [0, 0]


def test_weights_file_is_an_input_of_the_fingerprints(tmp_path):
    """Replacing image.weights under the same name redoes the features (stage 1, 4 and 5's model), as
    replacing a data file does; it used to leave them up to date."""
    from image_process.main import fingerprint
    from predict_expression import train_fingerprint

    w = tmp_path / "w.pth"
    w.write_bytes(b"a")
    cfg = load_config(None, ["image.encoder=timm", f"image.weights={w}", f"data.path={tmp_path}"])
    before = fingerprint(cfg), train_fingerprint(cfg, "cpu", [])
    w.write_bytes(b"ab")
    after = fingerprint(cfg), train_fingerprint(cfg, "cpu", [])
    assert before[0] != after[0] and before[1] != after[1]


def test_a_figure_with_no_gene_to_draw_removes_the_last_runs_copy(tmp_path, caplog):
    """plot.genes naming only genes the run did not model drew nothing and left the previous run's
    figure (other genes, perhaps another model) in place, to pass for this run's."""
    from pipeline.plotting import no_gene_panels

    old = tmp_path / "03_denoised.png"
    old.write_bytes(b"earlier run")
    with caplog.at_level("WARNING", logger="stpipe"):
        no_gene_panels(old, "plot.genes")
    assert not old.exists() and "not drawn; an earlier run's copy was removed" in caplog.text
