"""Stage 5 (HESpotEx): training lowers the loss, predictions have the right genes and order, the
leave-one-out split keeps the test section out, whole-slide images are read tile by tile, bad input
gives clear errors."""
import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, shared
from data import keys
from data.errors import InputError
from models.hespotex_training import GraphSample, HESpotExParams, train_hespotex
from pipeline.config import load_config

FAST = ["predict.epochs=40", "predict.ae_epochs=20", "predict.n_models=2", "predict.n_genes=40",
        "predict.patch_cnn.epochs=3", "predict.patch_cnn.px=16"]


def _random_sections(n_sections=2, n=120, f=20, g=15, seed=0):
    rng = np.random.default_rng(seed)
    W = rng.normal(size=(f, g)) * 0.4
    out = []
    for _ in range(n_sections):
        xy = np.column_stack(np.unravel_index(np.arange(n), (12, 10))).astype(float)
        feats = rng.normal(size=(n, f)).astype(np.float32)
        expr = np.maximum(feats @ W + 1.5 + rng.normal(0, 0.3, (n, g)), 0).astype(np.float32)
        from pipeline.expression_prediction import spatial_edge_index
        out.append(GraphSample(torch.from_numpy(feats), torch.from_numpy(spatial_edge_index(xy, 1.0)),
                               torch.ones(n), torch.from_numpy(expr)))
    return out


def test_training_lowers_the_loss_and_is_seeded():
    samples = _random_sections()
    p = HESpotExParams(epochs=80, ae_epochs=20, hidden=32, dim=8, seed=3)
    m1, h1 = train_hespotex(samples, p)
    m2, _ = train_hespotex(samples, p)
    assert np.mean(h1["loss"][-5:]) < 0.8 * np.mean(h1["loss"][:5])
    assert h1["ae_loss"][-1] < h1["ae_loss"][0]
    for a, b in zip(m1.state_dict().values(), m2.state_dict().values()):
        torch.testing.assert_close(a, b)
    pred, z = m1(samples[0].features, samples[0].edge_index, samples[0].density)
    assert pred.shape == samples[0].expr.shape and z.shape == (120, 8)


def test_patch_cnn_learns_is_seeded_and_ignores_orientation():
    """Patches whose target is their red/blue balance: the loss falls, the same seed gives the same
    weights, the prediction (averaged over the 8 rotations/reflections) does not depend on how a
    patch is turned, and the alignment term pulls the image embedding to a given embedding."""
    from models.patch_cnn import dihedral, patch_channel_stats, standardise_patches
    from models.patch_cnn_training import PatchCNNParams, predict_patch_cnn, train_patch_cnn

    rng = np.random.default_rng(0)
    n, side = 96, 16
    balance = rng.uniform(-1, 1, n)
    patches = rng.integers(90, 160, (n, side, side, 3)).astype(np.float64)
    patches[..., 0] += 60 * balance[:, None, None]
    patches[..., 2] -= 60 * balance[:, None, None]
    patches = patches.clip(0, 255).astype(np.uint8)
    x = standardise_patches(patches, *patch_channel_stats(patches))
    assert x.shape == (n, 3, side, side) and abs(float(x.mean())) < 1e-3
    y = torch.from_numpy(np.column_stack([balance, -balance, balance ** 2]).astype(np.float32))
    y = (y - y.mean(0)) / y.std(0)
    p = PatchCNNParams(width=4, dim=4, epochs=12, batch=16, seed=1)
    m1, h1 = train_patch_cnn(x, y, p)
    m2, _ = train_patch_cnn(x, y, p)
    assert h1["loss"][-1] < 0.6 * h1["loss"][0]
    for a, b in zip(m1.state_dict().values(), m2.state_dict().values()):
        torch.testing.assert_close(a, b)
    pred = predict_patch_cnn(m1, x)
    assert pred.shape == (n, 3) and np.isfinite(pred).all()
    assert np.corrcoef(pred[:, 0], balance)[0, 1] > 0.8
    np.testing.assert_allclose(predict_patch_cnn(m1, dihedral(x, 3)), pred, atol=1e-4)
    # averaging the 4 rotations only: invariant to a rotation, not (exactly) to a mirror image
    rot = predict_patch_cnn(m1, x, transforms=4)
    np.testing.assert_allclose(predict_patch_cnn(m1, dihedral(x, 1), transforms=4), rot, atol=1e-4)
    assert np.corrcoef(rot[:, 0], pred[:, 0])[0, 1] > 0.95
    with pytest.raises(ValueError, match="transforms"):
        predict_patch_cnn(m1, x, transforms=3)
    # with an expression embedding to agree with, the image embedding moves towards it
    target_z = torch.from_numpy(np.column_stack([balance, balance ** 2, -balance, np.zeros(n)]).astype(np.float32))
    m3, h3 = train_patch_cnn(x, y, p, embedding=target_z)
    with torch.no_grad():
        _, z = m3(x)
    assert z.shape == (n, 4) and h3["loss"][-1] < h3["loss"][0]
    assert np.corrcoef(z[:, 0].numpy(), balance)[0, 1] > 0.8


@pytest.fixture(scope="module")
def two_slices(tmp_path_factory):
    from data.synthetic import make_synthetic_visium
    base = tmp_path_factory.mktemp("pred")
    return [make_synthetic_visium(base / f"s{i}", n_rows=20, n_cols=20, n_genes=200, seed=i) for i in (1, 2)]


def _cfg(train, test, extra=()):
    sec = lambda p, n: "{path: %s, name: %s}" % (p, n)  # noqa: E731
    return load_config(ROOT / "configs" / "predict.yaml",
                       [f"train.sections=[{sec(train, 'A')}]", f"test.sections=[{sec(test, 'B')}]", *FAST, *extra])


def test_stage5_end_to_end_rerun_and_reuse(tmp_path, two_slices):
    import anndata as ad

    from predict_expression import run_stage
    a, b = two_slices
    out = tmp_path / "run"
    assert run_stage(_cfg(a, b), out, progress=False)
    pred = ad.read_h5ad(out / "B" / "05_predicted.h5ad")
    model = torch.load(out / "05_model.pt", weights_only=True)
    assert list(pred.var_names) == model["genes"] and pred.n_vars == 40
    assert pred.shape[0] == 20 * 20 and pred.obsm[keys.SPATIAL].shape == (400, 2)
    assert np.isfinite(pred.X).all() and keys.MEASURED in pred.layers
    m = json.loads((out / "metrics.json").read_text())
    assert m["predict"]["sections"] == m["sections"] and m["predict"]["pcc_all"] == m["pcc_all"]   # its own copy
    assert set(m["sections"]["B"]) >= {"pcc_all", "pcc_heg", "mse", "n_genes"}
    assert m["pcc_all"] == m["sections"]["B"]["pcc_all"] and np.isfinite(m["pcc_all"])
    assert (out / "B" / "05_predicted.png").exists()
    sf = pred.uns[keys.SPATIAL_UNS]["B"]["scalefactors"]   # drawn over the H&E by scanpy
    assert pred.uns[keys.SPATIAL_UNS]["B"]["images"]["hires"].ndim == 3 and sf["spot_diameter_fullres"] > 0
    assert not run_stage(_cfg(a, b), out, progress=False)             # up to date: skipped
    # only output settings changed: predicted again with the saved model, not retrained
    model_time = (out / "05_model.pt").stat().st_mtime_ns
    assert run_stage(_cfg(a, b, [f"predict.plot_genes=[{pred.var_names[0]}]"]), out, progress=False)
    assert (out / "05_model.pt").stat().st_mtime_ns == model_time
    assert json.loads((out / "metrics.json").read_text())["model_reused"] is True
    np.testing.assert_allclose(ad.read_h5ad(out / "B" / "05_predicted.h5ad").X, pred.X, atol=1e-5)
    assert run_stage(_cfg(a, b, ["plot.figures=false"]), out, progress=False)        # the saved model again: no PNG,
    assert not (out / "B" / "05_predicted.png").exists() and (out / "05_model.pt").stat().st_mtime_ns == model_time
    assert not run_stage(_cfg(a, b, ["plot.figures=false"]), out, progress=False)    # and then up to date
    out2 = tmp_path / "reuse"
    assert run_stage(_cfg(a, b, [f"predict.model_file={out / '05_model.pt'}", "train.sections=[]"]), out2,
                     progress=False)
    np.testing.assert_allclose(ad.read_h5ad(out2 / "B" / "05_predicted.h5ad").X, pred.X, atol=1e-5)
    with pytest.raises(InputError, match=r"so train.sections \(A\) would not be used: .*'train.sections=\[\]'"):
        run_stage(_cfg(a, b, [f"predict.model_file={out / '05_model.pt'}"]), tmp_path / "both", progress=False)
    # a reused model predicts with its own settings: those the config sets otherwise are named as unused
    from pipeline.expression_prediction import Predictor, settings_not_used
    saved = Predictor.load(out / "05_model.pt")
    assert settings_not_used(saved, _cfg(a, b)) == []
    ignored = settings_not_used(saved, _cfg(a, b, ["predict.dim=7", "image.patch_size_fullres=50"]))
    assert ignored == [f"predict.dim=7 (model: {saved.params['dim']})", "image.patch_size_fullres=50 (model: null)"]
    assert run_stage(_cfg(a, b, ["predict.epochs=3"]), out, progress=False)     # a training setting: retrained
    assert (out / "05_model.pt").stat().st_mtime_ns > model_time
    assert json.loads((out / "metrics.json").read_text())["model_reused"] is False


def test_section_names_stay_inside_the_output_folder():
    """A section's outputs go to <out>/<name>/: a name with a path separator ('../x') is refused."""
    from pipeline.sections import check_section_specs
    for bad in ("../evil", "a/b", "..", "a\\b"):
        with pytest.raises(InputError, match="cannot be a folder name"):
            check_section_specs([{"name": bad}], "test.sections")
    assert check_section_specs([{"name": "Patient A (2)"}], "test.sections")[0]["name"] == "Patient A (2)"


def test_sections_given_as_bare_paths(two_slices, tmp_path):
    """--set 'train.sections=[../dlpfc/151674]' is [{path: ...}] and a bare image file a whole slide; stage 4
    checked the specs only after its fingerprint, which ended in a ValueError traceback on a bare path."""
    from pipeline.sections import check_section_specs
    from train_superres import fingerprint
    a, b = two_slices
    (tmp_path / "scan.svs").write_bytes(b"")
    specs = check_section_specs([str(a), str(tmp_path / "scan.svs")], "test.sections")
    assert specs[0]["path"] == str(a) and specs[1]["image"] == str(tmp_path / "scan.svs") and specs[1]["name"] == "scan"
    assert check_section_specs(str(b), "train.sections")[0]["path"] == str(b)
    fingerprint(load_config(ROOT / "configs" / "superres.yaml", [f"data.path={a}", f"train.sections=[{b}]"]), "cpu")
    with pytest.raises(InputError, match="train.sections"):
        fingerprint(load_config(ROOT / "configs" / "superres.yaml", [f"data.path={a}", "train.sections=[[1]]"]), "cpu")


def test_image_use_none_is_refused_by_the_image_stages(tmp_path, two_slices):
    """Stages 4 and 5 with image.use=none blamed the slide ("no image ... give a Space Ranger folder with
    tissue_hires_image.png") though it had one; the refusal now names the key, before anything is read."""
    import predict_expression
    import train_superres

    a, b = two_slices
    cfg = load_config(ROOT / "configs" / "predict.yaml", ["image.use=none", f"train.sections=[{a}]",
                                                          f"test.sections=[{b}]"])
    with pytest.raises(InputError, match="image.use=none: stage 5 .*set image.use=auto"):
        predict_expression.run_stage(cfg, tmp_path / "p")
    cfg = load_config(ROOT / "configs" / "superres.yaml", ["image.use=none", "data.path=/nonexistent"])
    with pytest.raises(InputError, match="image.use=none: stage 4 .*set image.use=auto"):
        train_superres.run_stage(cfg, tmp_path / "s")
    assert not (tmp_path / "p").exists() and not (tmp_path / "s").exists()


def test_leave_one_out_keeps_the_test_section_out(two_slices):
    from pipeline.expression_prediction import leave_one_out_folds
    from pipeline.sections import check_disjoint

    for train, test in leave_one_out_folds(["C2", "C3", "C4"]):
        assert test not in train and len(train) == 2
    a, b = two_slices
    with pytest.raises(InputError, match="also a training section"):
        check_disjoint([{"path": str(a), "name": "A"}], [{"path": str(a), "name": "B"}])
    with pytest.raises(InputError, match="also a training section"):
        check_disjoint([{"path": str(a), "name": "A"}], [{"path": str(b), "name": "A"}])
    import shutil                       # a copy of a training section's folder, under another name
    copy = shutil.copytree(a, Path(str(a) + "_copy"), dirs_exist_ok=True)
    with pytest.raises(InputError, match="same counts as training section 'A'"):
        check_disjoint([{"path": str(a), "name": "A"}], [{"path": str(copy), "name": "C"}])
    check_disjoint([{"path": str(a), "name": "A"}], [{"path": str(b), "name": "B"}])     # two sections: fine


def test_samples_picked_from_one_hest_folder_are_different_sections(synthetic_slice, tmp_path):
    """Sections picked by name from one HEST-1k folder are different sections (they were refused as one, by
    their shared path); the same sample reached another way (its st/<id>.h5ad, or a copy of that file) is
    still refused as a test section. A sample's fingerprinted inputs are its own files, not the folder's."""
    import shutil

    from data.readers import read_slide
    from pipeline.sections import check_disjoint, section_inputs
    from test_readers import _hest_sample

    ref = read_slide({"path": synthetic_slice})
    root = tmp_path / "hest"
    _hest_sample(ref, root, "A")
    _hest_sample(ref[1:].copy(), root, "B")
    check_disjoint([{"path": str(root), "name": "A"}], [{"path": str(root), "name": "B"}])
    with pytest.raises(InputError, match=r"also a training section \(.*A.h5ad\)"):
        check_disjoint([{"path": str(root), "name": "A"}], [{"path": str(root / "st" / "A.h5ad"), "name": "C"}])
    (tmp_path / "elsewhere").mkdir()
    shutil.copy(root / "st" / "A.h5ad", tmp_path / "elsewhere" / "D.h5ad")
    with pytest.raises(InputError, match="same counts as training section 'A'"):
        check_disjoint([{"path": str(root), "name": "A"}], [{"path": str(tmp_path / "elsewhere" / "D.h5ad"), "name": "D"}])
    assert [str(f) for f in section_inputs([{"path": str(root), "name": "B"}])] == \
        [str(root / "st" / "B.h5ad"), str(root / "wsis" / "B.tif")]


def test_genes_and_model_use_training_sections_only(two_slices, caplog):
    """Gene choice and the trained weights do not change when the test section's counts change (nor with
    predict.plot_genes, whose genes outside the model's are warned of before training)."""
    from pipeline.expression_prediction import Section, fit_predictor, load_section, patch_geometry, top_mean_genes

    a, b = two_slices
    cfg = _cfg(a, b)
    geom = patch_geometry(cfg["predict"])
    train = [load_section({"path": str(a), "name": "A"}, cfg["image"], patch=geom)]
    test = load_section({"path": str(b), "name": "B"}, cfg["image"], patch=geom)
    genes = top_mean_genes(train, 40)
    p1, _ = fit_predictor(train, cfg["predict"], cfg["image"])
    scrambled = Section(**{**test.__dict__, "counts": test.counts[::-1]})
    with caplog.at_level("WARNING", logger="stpipe"):
        p2, _ = fit_predictor(train, {**cfg["predict"], "plot_genes": ["NOPE", genes[0]]}, cfg["image"])
    assert "predict.plot_genes NOPE are not among the 40 genes" in caplog.text
    assert p1.genes == genes == p2.genes
    np.testing.assert_allclose(p1.predict_section(test), p2.predict_section(scrambled), atol=1e-6)


def _pyramid_tiff(path, size=8192, tile=256, mpp=1.0):
    """A tiled, zlib-compressed pyramid TIFF written tile by tile (never whole in memory):
    a stained disc of tissue in two bands, with dark nucleus-like dots, on a white background."""
    from data.wsi import write_pyramid_tiff

    def tiles(step, level_size, _):
        for ty in range(0, level_size, tile):
            yy = (np.arange(ty, ty + tile, dtype=np.int64) * step)[:, None]       # the tile's rows at level 0,
            for tx in range(0, level_size, tile):
                xx = (np.arange(tx, tx + tile, dtype=np.int64) * step)[None, :]   # its columns (broadcast: 2x faster)
                inside = np.hypot(xx - size / 2, yy - size / 2) < size * 0.3
                band = np.broadcast_to(((xx // 1500) % 2).astype(bool), inside.shape)
                t = np.full((tile, tile, 3), 245, np.uint8)
                t[inside & band] = (200, 120, 180)
                t[inside & ~band] = (220, 150, 200)
                jitter = (xx // 23 * 7 + yy // 19 * 13) % 11
                dots = ((xx % 23 - 11) ** 2 + (yy % 19 - 9) ** 2 < 16) & (jitter < 4 + 4 * band)
                t[dots & inside] = (90, 40, 130)
                yield t

    return write_pyramid_tiff(path, tiles, size, size, steps=(1, 4, 16), tile=tile, mpp=mpp, compression="zlib")


def test_plain_tiled_tiff_is_read_by_tifffile_with_its_pyramid(tmp_path):
    """A plain pyramid TIFF goes to tifffile + zarr (a pass over a 20,000 px slide: 2.4 s, OpenSlide 23 s)
    with its smaller levels for thumbnails; the pixels, mpp and thumbnail are OpenSlide's."""
    from data import wsi
    path = _pyramid_tiff(tmp_path / "p.tif", size=4096, tile=256, mpp=0.5)
    slide = wsi.open_whole_slide(path)
    assert isinstance(slide, wsi.TiledTiffImage) and slide.mpp == pytest.approx(0.5) == wsi.file_mpp(path)
    assert [ds for _, ds in slide.levels] == [1.0, 4.0, 16.0]
    pytest.importorskip("openslide")
    ref = wsi.OpenSlideImage(path)
    assert ref.mpp == pytest.approx(slide.mpp)
    for box in ((100, 200, 700, 500), (3900, 3900, 400, 400), (-20, -30, 100, 100)):
        np.testing.assert_array_equal(slide.read_region(*box), ref.read_region(*box))
    (t1, s1), (t2, s2) = slide.thumbnail(512), ref.thumbnail(512)
    assert s1 == s2
    np.testing.assert_array_equal(t1, t2)
    shift = [[1, 0, 64], [0, 1, 32]]          # placed by a whole-pixel shift, its thumbnail from a level of either reader
    (p1, q1), (p2, q2) = wsi.PlacedImage(slide, shift).thumbnail(512), wsi.PlacedImage(ref, shift).thumbnail(512)
    assert q1 == q2 and p1.shape == p2.shape
    assert np.abs(p1.astype(int) - p2).mean() < 1.0
    np.testing.assert_array_equal(wsi.PlacedImage(ref, shift).read_region(164, 232, 300, 200), ref.read_region(100, 200, 300, 200))
    slide.close()
    ref.close()


def test_slides_opened_to_look_at_them_are_closed(tmp_path):
    """A slide opened only for its size, mpp or placement, or read whole, leaves no file open behind it: one that had
    been read region by region (a placed image) stayed open until the garbage collector found its reference cycle.
    ``close()`` / ``with`` release a slide's file, also after reading it."""
    import gc

    import psutil

    from data import wsi
    from data.readers import fullres_metadata, image_size

    path = _pyramid_tiff(tmp_path / "p.tif", size=1024, tile=256, mpp=0.5)
    is_open = lambda: any(Path(f.path).name == "p.tif" for f in psutil.Process().open_files())
    gc.collect()
    gc.disable()              # a file held by a reference cycle counts as open: nothing collects it in between
    try:
        assert image_size(path) == (1024, 1024) and wsi.file_mpp(path) == pytest.approx(0.5)
        assert fullres_metadata(path, [[1, 0, 5], [0, 1, 7]])["fullres_shape"] == [1031, 1029]
        assert wsi.open_fullres_pixels(path, stream_above_bytes=10 ** 9).shape == (1024, 1024, 3)   # read whole
        placed = wsi.open_fullres_pixels(path, stream_above_bytes=10 ** 9, placement=[[1, 0, 5], [0, 1, 7]])
        assert placed.shape == (1031, 1029, 3)                          # read region by region, then closed
        assert not is_open()
        with wsi.open_whole_slide(path) as slide:
            slide.read_region(0, 0, 300, 300)
            assert is_open()
        assert not is_open()
    finally:
        gc.enable()


def test_16_bit_tiled_tiff_is_read_by_region_with_the_whole_images_bit_depth(tmp_path, caplog):
    """A 16-bit tiled TIFF was read whole (3x the memory of its uint8 copy, which a large scan cannot
    spare); it is now read tile by tile like an 8-bit one, every region scaled by the bit depth of the
    whole image (a region's own largest value would scale each block differently), so streamed pixels
    are those of the whole read."""
    import tifffile

    from data import wsi
    from data.readers import read_image
    rng = np.random.default_rng(0)
    twelve = rng.integers(0, 3000, (700, 900, 3)).astype(np.uint16)
    twelve[650:, 850:] = 4000                         # the largest value (12-bit) in one corner only
    path = tmp_path / "he16.tif"
    with tifffile.TiffWriter(path) as tw:
        tw.write(twelve, tile=(128, 128), photometric="rgb", compression="zlib", subifds=1)
        tw.write(twelve[::4, ::4], tile=(128, 128), photometric="rgb", compression="zlib", subfiletype=1)
    slide = wsi.open_whole_slide(path)
    with caplog.at_level("WARNING", logger="stpipe"):
        assert isinstance(slide, wsi.TiledTiffImage) and slide.bits == 12 and slide.bits == 12
    assert caplog.text.count("read as 12-bit") == 1        # found once, on first use
    caplog.clear()
    with caplog.at_level("WARNING", logger="stpipe"):     # small enough to read whole: no pass over the tiles first
        wsi.open_fullres_pixels(path)
    assert caplog.text.count("read as 12-bit") == 1
    whole = read_image(path)
    np.testing.assert_array_equal(whole, (twelve.astype(np.uint32) * 255 // 4095).astype(np.uint8))
    for box in ((0, 0, 200, 100), (100, 300, 250, 250), (880, 690, 40, 40)):
        x, y, w, h = box
        np.testing.assert_array_equal(slide.read_region(*box)[:max(0, min(h, 700 - y)), :max(0, min(w, 900 - x))],
                                      whole[y:y + h, x:x + w])
    streamed = wsi.open_fullres_pixels(path, stream_above_bytes=0)
    assert isinstance(streamed, wsi.TiledPixels)
    np.testing.assert_array_equal(streamed.region(100, 200, 400, 500), whole[200:500, 100:400])
    thumb, scale = streamed.shrunk(225)
    assert thumb.dtype == np.uint8 and thumb.shape[1] == 225 and 150 < thumb.mean() * 4095 / 255 < 1700
    streamed.close()
    slide.close()


def _aperio_svs(path, source, size=2048):
    """An Aperio-style .svs (tiled JPEG baseline, a stripped thumbnail, a tiled 4x level; the MPP in the
    ImageDescription, as Aperio writes it) of ``source`` pixels."""
    import cv2
    import tifffile
    head = "Aperio Image Library v12.0.15 \n"
    kw = dict(photometric="rgb", metadata=None, compression="jpeg")
    with tifffile.TiffWriter(path) as tw:
        tw.write(source, tile=(256, 256), description=head + f"{size}x{size} [0,0 {size}x{size}] (256x256) "
                 "JPEG/RGB Q=90|AppMag = 20|MPP = 0.4990", **kw)
        for side, tiled in ((size // 8, False), (size // 4, True)):
            tw.write(cv2.resize(source, (side, side), interpolation=cv2.INTER_AREA),
                     description=head + f"{size}x{size} -> {side}x{side} - |MPP = 0.4990",
                     **({"tile": (256, 256)} if tiled else {}), **kw)
    return path


def test_aperio_svs_read_by_tifffile_only_when_its_pixels_are_openslides(tmp_path, monkeypatch):
    pytest.importorskip("openslide")
    from data import wsi
    size = 2048
    yy, xx = np.mgrid[:size, :size]
    source = np.full((size, size, 3), 240, np.uint8)
    disc = np.hypot(xx - size / 2, yy - size / 2) < size / 3
    source[disc] = (200, 120, 180)
    source[disc & ((xx // 7 + yy // 5) % 9 == 0)] = (90, 40, 130)
    path = _aperio_svs(tmp_path / "s.svs", source, size)
    slide = wsi.open_whole_slide(path)
    ref = wsi.OpenSlideImage(path)
    assert isinstance(slide, wsi.TiledTiffImage) and [ds for _, ds in slide.levels] == [1.0, 4.0]
    assert slide.mpp == pytest.approx(0.499) == ref.mpp == wsi.file_mpp(path)   # the ImageDescription's, via OpenSlide
    np.testing.assert_array_equal(slide.read_region(700, 800, 600, 400), ref.read_region(700, 800, 600, 400))
    slide.close()
    ref.close()
    # a file whose pixels tifffile decodes differently (a vendor quirk) stays with OpenSlide
    def shifted(self, array, x0, y0, x1, y1):
        return np.clip(np.asarray(array[y0:y1, x0:x1])[..., :3].astype(np.int16) + 12, 0, 255).astype(np.uint8)
    monkeypatch.setattr(wsi.TiledTiffImage, "_level_rgb", shifted)
    with wsi.open_whole_slide(path) as kept:
        assert isinstance(kept, wsi.OpenSlideImage)


@pytest.fixture(scope="module")
def small_model(tmp_path_factory, two_slices):
    from pipeline.expression_prediction import fit_predictor, load_section, patch_geometry
    a, b = two_slices
    cfg = _cfg(a, b)
    train = [load_section({"path": str(a), "name": "A"}, cfg["image"], patch=patch_geometry(cfg["predict"]))]
    pred, _ = fit_predictor(train, cfg["predict"], cfg["image"])
    path = tmp_path_factory.mktemp("model") / "05_model.pt"
    pred.save(path)
    return path


def test_plot_genes_left_out_are_named_once_for_every_section(tmp_path, two_slices, small_model, caplog):
    """A predict.plot_genes gene the model does not predict was warned of once per test section; now once."""
    from predict_expression import run_stage
    a, b = two_slices
    sections = "[{path: %s, name: A}, {path: %s, name: B}]" % (a, b)
    gene = torch.load(small_model, weights_only=True)["genes"][0]
    cfg = load_config(ROOT / "configs" / "predict.yaml", ["train.sections=[]", f"test.sections={sections}",
                                                          f"predict.model_file={small_model}",
                                                          f"predict.plot_genes=[NOPE, {gene}]", *FAST])
    with caplog.at_level("INFO", logger="stpipe"):
        assert run_stage(cfg, tmp_path, progress=False)
    assert caplog.text.count("NOPE") == 1 and "left out of every section's map: NOPE" in caplog.text
    assert all((tmp_path / name / "05_predicted.png").exists() for name in "AB")


def test_whole_slide_is_read_tile_by_tile(tmp_path, small_model, monkeypatch):
    import anndata as ad

    from data import wsi
    from predict_expression import run_stage

    size, tile_px = 12288, 1024
    slide_path = _pyramid_tiff(tmp_path / "slide.tif", size=size)
    largest = []

    def spy_open(path, mpp=None):
        s = wsi_open(path, mpp)
        read = s.read_region
        s.read_region = lambda x, y, w, h: (largest.append(w * h), read(x, y, w, h))[1]
        return s
    wsi_open = wsi.open_whole_slide
    monkeypatch.setattr(wsi, "open_whole_slide", spy_open)
    cfg = load_config(ROOT / "configs" / "predict.yaml",
                      ["train.sections=[]", f"test.sections=[{{image: {slide_path}, name: W}}]",
                       f"predict.model_file={small_model}", f"wsi.tile_px={tile_px}", "wsi.spot_spacing_um=200"])
    tracemalloc.start()
    assert run_stage(cfg, tmp_path / "out", progress=False)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    full = size * size * 3
    assert peak < full / 4, f"peak traced memory {peak / 1e6:.0f} MB for a {full / 1e6:.0f} MB image"
    assert max(largest) < (tile_px * 1.5) ** 2          # no read much larger than a tile (+ margins)
    out = ad.read_h5ad(tmp_path / "out" / "W" / "05_predicted.h5ad")
    xy = out.obsm[keys.SPATIAL]
    r = np.hypot(xy[:, 0] - size / 2, xy[:, 1] - size / 2)
    assert len(out) > 100 and np.mean(r < size * 0.32) > 0.95   # the grid lies on the tissue disc
    assert np.isfinite(out.X).all() and out.n_vars == 40
    assert (tmp_path / "out" / "W" / "05_predicted.png").exists()


def test_an_ome_zarr_image_is_predicted_as_a_whole_slide(tmp_path, small_model):
    """An OME-Zarr image folder (a SpatialData store's images/<name>), given as a bare path, is a whole slide:
    predicted as the same pixels in a tiled TIFF pyramid are."""
    import anndata as ad
    import tifffile
    import zarr

    from predict_expression import run_stage

    tif = _pyramid_tiff(tmp_path / "slide.tif", size=4096)
    folder = tmp_path / "store.zarr" / "images" / "he"
    group = zarr.open_group(str(folder), mode="w")
    datasets = []
    with tifffile.TiffFile(str(tif)) as tf:
        for i, level in enumerate(tf.series[0].levels):
            pixels = np.moveaxis(level.asarray(), 2, 0)
            group.create_array(f"s{i}", shape=pixels.shape, dtype=pixels.dtype, chunks=(3, 512, 512))[...] = pixels
            datasets.append({"path": f"s{i}"})
    group.attrs.update({"ome": {"multiscales": [{"datasets": datasets, "axes": ["c", "y", "x"]}],
                                "omero": {"channels": [{"label": c} for c in "rgb"]}}})
    preds = []
    for section, name in ((f"{{image: {tif}, name: W}}", "tif"), (str(folder), "zarr")):
        cfg = load_config(ROOT / "configs" / "predict.yaml",
                          ["train.sections=[]", f"test.sections=[{section}]", f"predict.model_file={small_model}",
                           "wsi.mpp=1.0", "wsi.spot_spacing_um=200"])
        assert run_stage(cfg, tmp_path / name, progress=False)
        preds.append(ad.read_h5ad(next((tmp_path / name).glob("*/05_predicted.h5ad"))))
    assert len(preds[0]) > 50
    np.testing.assert_array_equal(preds[0].obsm[keys.SPATIAL], preds[1].obsm[keys.SPATIAL])
    np.testing.assert_allclose(preds[0].X, preds[1].X, atol=1e-6)


def test_bad_input_is_clear(tmp_path, two_slices, small_model):
    import cv2

    from predict_expression import run_stage
    a, b = two_slices
    # a gene list with no overlap with the model's genes
    with pytest.raises(InputError, match="none of the 2 genes"):
        run_stage(_cfg(a, b, ["predict.genes=[NOPE1, NOPE2]"]), tmp_path / "g", progress=False)
    def predict_only(section, *extra):
        return load_config(ROOT / "configs" / "predict.yaml", ["train.sections=[]", f"test.sections=[{section}]",
                                                               f"predict.model_file={small_model}", *extra])
    # an image whose size does not match the coordinates
    small = tmp_path / "small.png"
    cv2.imwrite(str(small), np.random.default_rng(0).integers(150, 230, (50, 50, 3), dtype=np.uint8))   # not flat
    with pytest.raises(InputError, match="fall outside"):
        run_stage(predict_only(f"{{path: {b}, image: {small}, name: B}}"), tmp_path / "i", progress=False)
    with pytest.raises(InputError, match="fall outside"):      # found before training, not after it
        run_stage(_cfg(a, b, [f"test.sections=[{{path: {b}, image: {small}, name: B}}]"]), tmp_path / "i2",
                  progress=False)
    assert not (tmp_path / "i2" / "05_model.pt").exists()
    # an empty tissue mask (a blank slide)
    blank = tmp_path / "blank.png"
    cv2.imwrite(str(blank), np.full((3000, 3000, 3), 250, np.uint8))
    with pytest.raises(InputError, match="tissue mask is empty"):
        run_stage(predict_only(f"{{image: {blank}, name: W}}", "wsi.mpp=1.0"), tmp_path / "w", progress=False)
    # microns per pixel unknown: refused before any training
    with pytest.raises(InputError, match="wsi.mpp"):
        run_stage(predict_only(f"{{image: {blank}, name: W}}"), tmp_path / "w2", progress=False)
    with pytest.raises(InputError, match=r"test.sections W\): the file does not say its microns per pixel"):
        run_stage(_cfg(a, b, [f"test.sections=[{{image: {blank}, name: W}}]"]), tmp_path / "w3", progress=False)
    assert not (tmp_path / "w3" / "05_model.pt").exists()
    # a TIFF whose resolution tag is an editor's placeholder (72 dpi: 353 um/px), not the scan's
    import tifffile

    from pipeline.wsi_prediction import check_whole_slide_mpp
    dpi72 = tmp_path / "dpi72.tif"
    tifffile.imwrite(dpi72, np.full((600, 600, 3), 250, np.uint8), photometric="rgb", tile=(256, 256),
                     resolution=(72, 72), resolutionunit="INCH")
    with pytest.raises(InputError, match=r"test.sections W\): the file states 353 um per pixel \(72 dots per inch"):
        run_stage(_cfg(a, b, [f"test.sections=[{{image: {dpi72}, name: W}}]"]), tmp_path / "w4", progress=False)
    assert not (tmp_path / "w4" / "05_model.pt").exists()
    check_whole_slide_mpp([{"image": str(dpi72), "name": "W"}], {"mpp": 0.5})     # the user's value is taken
    tifffile.imwrite(dpi72, np.full((600, 600, 3), 250, np.uint8), photometric="rgb", tile=(256, 256),
                     resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER")
    check_whole_slide_mpp([{"image": str(dpi72), "name": "W"}], {})                # a scan's 0.5 um/px is kept
    # a test section's file that does not exist: refused before any training, with the closest name
    (tmp_path / "he_scan.png").write_bytes(b"")
    with pytest.raises(InputError, match=r"test.sections B: image\).*he_scan.png"):
        run_stage(_cfg(a, b, [f"test.sections=[{{path: {b}, image: {tmp_path / 'he.png'}, name: B}}]"]),
                  tmp_path / "m", progress=False)
    assert not (tmp_path / "m" / "05_model.pt").exists()
    # a training section whose gene identifiers are of another kind: refused, not trained on as zeros
    from data.readers import read_slide
    ens = read_slide({"path": b})
    ens.var_names = [f"ENSG{i:011d}" for i in range(ens.n_vars)]
    ens.write_h5ad(tmp_path / "ens.h5ad")
    cfg = load_config(ROOT / "configs" / "predict.yaml", [
        f"train.sections=[{{path: {a}, name: A}}, {{path: {tmp_path / 'ens.h5ad'}, name: E}}]", "test.sections=[]", *FAST])
    with pytest.raises(InputError, match="train.sections A: only 0 of its 200 genes.*same kind"):
        run_stage(cfg, tmp_path / "e", progress=False)
    # a model file that is not one
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a model")
    with pytest.raises(InputError, match="not a model saved"):
        run_stage(_cfg(a, b, [f"predict.model_file={junk}"]), tmp_path / "j", progress=False)


def test_real_her2st_one_fold(tmp_path):
    """Train on C3 and C4, predict C2 (short training): predictions follow the measured expression."""
    from predict_expression import run_stage
    her2st = shared("her2st")
    secs = []
    for c in ("C2", "C3", "C4"):
        image = next((her2st / "images").glob(f"{c}_*.jpg"))
        secs.append("{counts: %s, spots: %s, image: %s, name: %s}" % (
            her2st / "counts" / f"{c}.tsv.gz", her2st / "spots" / f"{c}_selection.tsv", image, c))
    cfg = load_config(ROOT / "configs" / "predict.yaml",
                      [f"train.sections=[{secs[1]}, {secs[2]}]", f"test.sections=[{secs[0]}]",
                       "predict.n_models=1", "predict.epochs=150", "predict.ae_epochs=50"])
    run_stage(cfg, tmp_path, progress=False)
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["n_genes"] == 250 and m["sections"]["C2"]["n_spots"] > 150
    assert m["pcc_all"] > 0.15


def test_whole_slide_lattices_match_the_platforms():
    """Square lattice: 4 neighbours at one spacing (legacy ST); hex: 6 (Visium)."""
    from sklearn.neighbors import NearestNeighbors

    from pipeline.wsi_prediction import lattice

    for layout, k in (("square", 4), ("hex", 6)):
        xy = lattice(1000.0, 1000.0, 50.0, layout)
        d, _ = NearestNeighbors(n_neighbors=k + 2).fit(xy).kneighbors(xy)
        inner = np.all((xy > 100) & (xy < 900), axis=1)
        np.testing.assert_allclose(d[inner, 1:k + 1], 50.0, rtol=1e-6)
        assert np.all(d[inner, k + 1] > 70.0)
    with pytest.raises(InputError, match="wsi.grid"):
        lattice(10.0, 10.0, 1.0, "triangle")


def test_genes_missing_from_a_test_table_are_not_scored():
    """A gene absent from the test section's count table was not measured there: it is left out of
    PCC, MSE and n_genes (not scored as an all-zero gene); with every gene present nothing changes."""
    from pipeline.expression_prediction import prediction_scores

    rng = np.random.default_rng(0)
    measured = rng.normal(size=(50, 6))
    pred = measured + rng.normal(size=(50, 6))
    genes = [f"g{i}" for i in range(6)]
    full = prediction_scores(pred, measured, genes, n_heg=3)
    m = measured.copy()
    m[:, 1] = np.nan
    part = prediction_scores(pred, m, genes, n_heg=3)
    keep = [0, 2, 3, 4, 5]
    sub = prediction_scores(pred[:, keep], measured[:, keep], [genes[i] for i in keep], n_heg=2)
    assert part["n_genes"] == 5 and full["n_genes"] == 6
    for k in ("pcc_all", "pcc_heg", "mse"):
        assert part[k] == pytest.approx(sub[k])


def test_a_model_naming_genes_by_id_meets_a_section_read_by_symbol():
    """A section read from an .h5ad named by Ensembl id takes its symbols as names (data.readers); a model
    trained on such a file before that names its genes by id, and is matched through var['gene_ids']."""
    import pandas as pd

    from pipeline.expression_prediction import Section

    sec = Section(name="s", obs_names=pd.Index(["a", "b"]), xy=np.zeros((2, 2)), spacing=1.0,
                  features=np.zeros((2, 1)), nucleus=np.zeros((2, 8)), image_source="he.png",
                  var_names=pd.Index(["MOBP", "PCP4"]), gene_ids=pd.Index(["ENSG01", "ENSG02"]))
    sec.name_genes_like(["MOBP", "GFAP"])                 # a model by symbol: unchanged
    assert list(sec.var_names) == ["MOBP", "PCP4"]
    sec.name_genes_like(["ENSG02", "ENSG03"])             # a model by id: the ids
    assert list(sec.var_names) == ["ENSG01", "ENSG02"]


def test_whole_slide_grid_geometry_is_checked():
    """A grid far denser than its spots (7.6 million points at 1 um) or a spot many spacings wide (a 513 GB
    patch) is refused before any tile is read; the training platform's geometry passes."""
    from pipeline.wsi_prediction import check_grid_geometry
    check_grid_geometry(100, 200, 0.7, (100, 200))
    check_grid_geometry(55, 100, 0.25, (55, 100))
    for diam, spacing, mpp, expect in ((100, 1, 0.7, "spot_spacing_um=1"), (100000, 200, 0.7, "spot_diameter_um=100000"),
                                       (100, 200, 1000, "px at 1000 um/px")):
        with pytest.raises(InputError, match=expect):
            check_grid_geometry(diam, spacing, mpp, (100, 200))


def test_platform_spot_size_comes_from_what_the_spots_are(small_model, tmp_path):
    """The whole-slide grid's default spot size is the training platform's: bins or cells by their size,
    Space Ranger's spot diameter on a hexagonal array Visium, any other array legacy ST. Spots on no array
    have no known size (a cell-based store has a spot_diameter_fullres and got Visium's 55 um spots 100 um
    apart): a whole-slide prediction then asks for it, and the model file keeps None."""
    import anndata as ad

    from pipeline.expression_prediction import LEGACY_ST_SPOT_UM, VISIUM_SPOT_UM, Predictor, spot_size_um
    from pipeline.wsi_prediction import grid_spot_um

    rows, cols = np.divmod(np.arange(40), 8)
    def slide(array_cols, with_array=True, diameter=90.0):
        a = ad.AnnData(np.ones((40, 2), np.float32))
        if with_array:
            a.obs[keys.ARRAY_ROW], a.obs[keys.ARRAY_COL] = rows, array_cols
        a.obsm[keys.SPATIAL] = np.c_[array_cols * 50.0, rows * 87.0] + np.random.default_rng(0).normal(0, 9, (40, 2))
        a.uns[keys.SPATIAL_UNS] = {"s": {"scalefactors": {"spot_diameter_fullres": diameter} if diameter else {}}}
        return a
    assert spot_size_um(slide(2 * cols + rows % 2)) == VISIUM_SPOT_UM
    assert spot_size_um(slide(cols)) == LEGACY_ST_SPOT_UM               # a diameter in the scale factors, an ST array
    assert spot_size_um(slide(2 * cols + rows % 2, diameter=None)) == LEGACY_ST_SPOT_UM   # MOB's staggered ST array
    assert spot_size_um(slide(cols, with_array=False)) is None
    with pytest.raises(InputError, match="no known size .*wsi.spot_diameter_um and wsi.spot_spacing_um"):
        grid_spot_um({"spot_diameter_um": 10}, None)
    assert grid_spot_um({"spot_diameter_um": 10, "spot_spacing_um": 12}, None) == (10.0, 12.0)
    assert grid_spot_um({"spot_spacing_um": 150}, VISIUM_SPOT_UM) == (55.0, 150.0)
    pred = Predictor.load(small_model)
    assert pred.spot_um == VISIUM_SPOT_UM
    pred.spot_um = None
    assert Predictor.load(pred.save(tmp_path / "m.pt")).spot_um is None


def test_patch_cnn_auto_is_off_when_a_training_sections_patches_are_upsampled(caplog):
    """A 3-diameter patch of a 600 px lowres Visium image is ~13 px: upsampled to 48 px it has no texture,
    and training the patch CNN on DLPFC's took ~10 minutes of 2 cores. ``use: auto`` (the default) trains
    it only when no training section's patch is upsampled more than 2x; ``true`` forces it, with a warning."""
    import pandas as pd

    from pipeline.expression_prediction import Section, patch_geometry, patch_stream_wanted

    def section(name, side):
        return Section(name=name, obs_names=pd.Index(["a"]), xy=np.zeros((1, 2)), spacing=1.0,
                       features=np.zeros((1, 2)), nucleus=np.zeros((1, 8)), image_source=f"{name}.png",
                       patch_side_px=side)

    fine, coarse = section("C3", 437.0), section("151673", 13.0)
    cfg = lambda use: {"patch_cnn": {"use": use, "scale": 3.0, "px": 48}}   # noqa: E731
    assert patch_stream_wanted([fine], cfg("auto")) and not patch_stream_wanted([fine], cfg(False))
    with caplog.at_level("INFO", logger="stpipe"):
        assert not patch_stream_wanted([fine, coarse], cfg("auto"))
    assert "patch CNN stream is off" in caplog.text and "151673 (13 px of 151673.png)" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="stpipe"):
        assert patch_stream_wanted([coarse], cfg(True))
    assert "upsampled more than 2x" in caplog.text
    with pytest.raises(InputError, match="choose auto, true or false"):
        patch_geometry(cfg("sometimes"))
