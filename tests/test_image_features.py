"""Stage 1: handcrafted features follow the tissue; timm backbones load local weights only."""
import numpy as np
import pytest

from data import keys
from data.errors import InputError
from data.readers import read_slide
from image_process.encoders import ENCODERS, build_encoder
from image_process.features import spot_image_features


def test_handcrafted_features_separate_domains(synthetic_slice):
    a = read_slide({"path": synthetic_slice, "truth": synthetic_slice / "truth.txt"})
    feats, info = spot_image_features(a, {"use": "hires"})
    assert feats.shape == (a.n_obs, 66) and np.isfinite(feats).all()
    assert info["spot_diameter_image_px"] == pytest.approx(info["spot_diameter_fullres"] * 0.5)
    # the synthetic image's texture follows the domains: features differ between domains
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score
    from sklearn.preprocessing import StandardScaler
    X = StandardScaler().fit_transform(feats)
    y = a.obs[keys.TRUTH].astype(str)
    assert cross_val_score(LogisticRegression(max_iter=500), X, y, cv=3).mean() > 0.6


def test_same_tissue_area_at_every_scale(synthetic_slice):
    a = read_slide({"path": synthetic_slice})
    hi, i_hi = spot_image_features(a, {"use": "hires"})
    lo, i_lo = spot_image_features(a, {"use": "lowres"})
    assert i_hi["spot_diameter_fullres"] == i_lo["spot_diameter_fullres"]
    # mean colour of the 4x-diameter patch agrees between the two images
    np.testing.assert_allclose(hi[:, 44:47].mean(0), lo[:, 44:47].mean(0), atol=0.03)


@pytest.mark.parametrize("options, expect", [({"scales": [1, 2], "foo": 1}, "foo"), ({"scales": [0]}, "> 0"),
                                             ({"scales": ["a"]}, "must be numbers"), ({"size": 2}, "at least 4"),
                                             ({"arch": "resnet50"}, "image.encoder=timm")])
def test_handcrafted_options_are_checked(options, expect):
    """image.options is free-form (timm takes any of its options), so the handcrafted encoder checks its own."""
    with pytest.raises(InputError, match=expect):
        build_encoder("handcrafted", None, **options)
    assert build_encoder("handcrafted", None, scales=2).scales == (2.0,)


def test_patch_size_far_beyond_a_spot_is_refused(synthetic_slice):
    """A patch of 100,000 full-resolution px (a unit slip) used to run for hours; it is refused with the spacing."""
    from image_process.features import spot_diameter_fullres
    a = read_slide({"path": synthetic_slice})
    with pytest.raises(InputError, match="spot spacings"):
        spot_diameter_fullres(a, {"patch_size_fullres": 100000})
    assert spot_diameter_fullres(a, {"patch_size_fullres": 150}) == 150.0
    # the same for the slide's own spot_diameter_fullres: 1e9 ran into OpenCV's out-of-memory traceback and
    # -5 gave negative patches silently; a word or a negative number in the JSON is refused naming the file
    lib = keys.library_id(a)
    for bad in (1e9, -5.0, 0, "abc"):
        a.uns["spatial"][lib]["scalefactors"]["spot_diameter_fullres"] = bad
        with pytest.raises(InputError, match="is not a spot's diameter"):
            spot_diameter_fullres(a)


def test_scalefactors_spot_diameter_must_be_a_positive_number(slice_copy):
    import json
    sf = slice_copy / "spatial" / "scalefactors_json.json"
    values = json.loads(sf.read_text())
    for bad in (-5, "abc", True):
        sf.write_text(json.dumps(values | {"spot_diameter_fullres": bad}))
        with pytest.raises(InputError, match="scalefactors_json.json: spot_diameter_fullres=.*above 0"):
            read_slide({"path": slice_copy})


def test_spot_diameter_without_scale_factors_follows_the_lattice(synthetic_slice):
    """Without spot_diameter_fullres (an .h5ad from another tool), a Visium (hexagonal) spot is 0.65 of
    the spacing, as Space Ranger defines it (65 um on the 100 um grid; it was 0.5, legacy ST's share),
    and a square-lattice spot 0.5."""
    from data.readers import read_slide
    from image_process.features import spot_diameter_fullres
    from positions_enhancement.spatial_weights import estimate_spot_spacing

    a = read_slide({"path": synthetic_slice})
    lib = keys.library_id(a)
    del a.uns["spatial"][lib]["scalefactors"]["spot_diameter_fullres"]
    arr = a.obs[[keys.ARRAY_COL, keys.ARRAY_ROW]].to_numpy()
    spacing = estimate_spot_spacing(a.obsm[keys.SPATIAL], arr)
    assert spot_diameter_fullres(a) == pytest.approx(0.65 * spacing)
    a.obs[keys.ARRAY_COL] = a.obs[keys.ARRAY_COL] // 2 * 2 + a.obs[keys.ARRAY_ROW] % 2 + 1   # (col + row) odd
    assert spot_diameter_fullres(a) == pytest.approx(0.5 * estimate_spot_spacing(a.obsm[keys.SPATIAL],
                                                                             a.obs[[keys.ARRAY_COL, keys.ARRAY_ROW]].to_numpy()))


def test_no_image_means_no_features(tmp_path, synthetic_slice):
    a = read_slide({"path": synthetic_slice})
    feats, info = spot_image_features(a, {"use": "none"})
    assert feats.shape == (a.n_obs, 0) and info["image"] is None


def test_timm_backbone_from_local_weights(tmp_path, synthetic_slice):
    import timm
    import torch

    assert {"handcrafted", "timm"} <= set(ENCODERS)
    weights = tmp_path / "tiny.pth"
    torch.save(timm.create_model("resnet10t", pretrained=False, num_classes=0).state_dict(), weights)
    a = read_slide({"path": synthetic_slice})
    feats, info = spot_image_features(a[:40].copy(), {"use": "hires", "encoder": "timm", "weights": str(weights),
                                                      "check_tissue": False,  # 40 spots cover a corner only
                                                      "options": {"arch": "resnet10t", "input_size": 64}})
    assert feats.shape == (40, 512) and np.isfinite(feats).all()
    with pytest.raises(InputError, match="needs image.weights"):
        build_encoder("timm", None, arch="resnet10t")
    with pytest.raises(InputError, match="not found"):
        build_encoder("timm", str(tmp_path / "missing.pth"), arch="resnet10t")
    with pytest.raises(InputError, match="does not match"):
        build_encoder("timm", str(weights), arch="vit_tiny_patch16_224")


def test_timm_weights_that_fill_the_backbone_only_partly_are_refused(tmp_path):
    """A UNI-style checkpoint (a ViT with LayerScale) read into the plain ViT used to load with its
    LayerScale tensors silently dropped, giving wrong features without an error; it is refused with
    the option that fixes it, and loads once that option is given. A classifier head in the file is
    fine (the backbone is built without one)."""
    import timm
    import torch

    with_ls = timm.create_model("vit_tiny_patch16_224", pretrained=False, init_values=1e-5)   # with its head
    weights = tmp_path / "uni_like.pth"
    torch.save(with_ls.state_dict(), weights)
    with pytest.raises(InputError, match="init_values"):
        build_encoder("timm", str(weights), arch="vit_tiny_patch16_224")
    enc = build_encoder("timm", str(weights), arch="vit_tiny_patch16_224", init_values=1e-5)
    wrapped = tmp_path / "lightning.ckpt"            # a training wrapper's prefix on every key
    torch.save({"state_dict": {f"model.{k}": v for k, v in with_ls.state_dict().items()}}, wrapped)
    build_encoder("timm", str(wrapped), arch="vit_tiny_patch16_224", init_values=1e-5)
    for name, value in enc.model.state_dict().items():
        torch.testing.assert_close(value, with_ls.state_dict()[name])
    plain = tmp_path / "plain.pth"
    torch.save(timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0).state_dict(), plain)
    with pytest.raises(InputError, match="remove init_values"):
        build_encoder("timm", str(plain), arch="vit_tiny_patch16_224", init_values=1e-5)
    larger = tmp_path / "vit384.pth"                 # saved at another input size: pos_embed differs
    torch.save(timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=384).state_dict(),
               larger)
    with pytest.raises(InputError, match="differ in shape.*pos_embed"):
        build_encoder("timm", str(larger), arch="vit_tiny_patch16_224")


@pytest.mark.filterwarnings("ignore:Use `squidpy.pl.spatial_scatter`:FutureWarning",
                            "ignore:The set_bad function:PendingDeprecationWarning")   # scanpy's own, drawing
def test_outputs_carry_an_image_scanpy_can_draw_on(synthetic_slice, tmp_path):
    """A slide with only a full-resolution image (legacy ST with data.image) gets a shrunk copy in
    uns['spatial'] whose scale factor puts every spot on the same tissue, and scanpy draws on it."""
    import cv2
    import matplotlib
    matplotlib.use("Agg")
    import scanpy as sc

    from data.readers import attach_fullres_image
    from image_process.patches import add_plot_image

    a = read_slide({"path": synthetic_slice})
    lib = keys.library_id(a)
    entry = a.uns[keys.SPATIAL_UNS][lib]
    hires, s = entry["images"]["hires"], entry["scalefactors"]["tissue_hires_scalef"]
    full = cv2.resize(hires, None, fx=1 / s, fy=1 / s, interpolation=cv2.INTER_NEAREST)
    cv2.imwrite(str(tmp_path / "full.png"), cv2.cvtColor(full, cv2.COLOR_RGB2BGR))
    entry["images"], entry["scalefactors"] = {}, {}
    attach_fullres_image(a, tmp_path / "full.png")
    assert add_plot_image(a, 40.0, max_side=500)
    e = a.uns[keys.SPATIAL_UNS][lib]
    img, sf = e["images"]["hires"], e["scalefactors"]["tissue_hires_scalef"]
    assert max(img.shape[:2]) == 500 and img.dtype == np.uint8 and e["scalefactors"]["spot_diameter_fullres"] == 40.0
    xy = a.obsm[keys.SPATIAL]
    small = np.round(xy * sf).astype(int)
    big = np.round(xy * s).astype(int)
    diff = np.abs(img[small[:, 1], small[:, 0]].astype(float) - hires[big[:, 1], big[:, 0]].astype(float))
    assert diff.mean() < 20            # the same tissue under every spot (texture blurs a little)
    assert not add_plot_image(a, 40.0)  # it has an image now: nothing added
    sc.pl.spatial(a, color=a.var_names[0], show=False)


def test_patch_work_spread_over_processes_gives_the_same_numbers():
    """Handcrafted statistics and nucleus segmentation computed in forked workers equal one call here."""
    from image_process.encoders import patch_statistics
    from image_process.nuclei import describe_patches, haematoxylin
    from image_process.process_pool import MIN_PATCHES, map_patches

    rng = np.random.default_rng(0)
    # H&E-like patches: pink background with dark purple blobs (nuclei) at random places
    yy, xx = np.mgrid[:32, :32]
    patches = np.empty((MIN_PATCHES + 37, 32, 32, 3), np.uint8)
    patches[:] = (230, 180, 210)
    for p in patches:
        for cy, cx in rng.integers(3, 29, size=(rng.integers(0, 6), 2)):
            p[(yy - cy) ** 2 + (xx - cx) ** 2 < 6] = (80, 40, 140)
    patches = np.clip(patches + rng.normal(0, 8, patches.shape), 0, 255).astype(np.uint8)
    one = patch_statistics(patches)
    np.testing.assert_array_equal(map_patches(patch_statistics, patches, workers=2), one)
    np.testing.assert_array_equal(map_patches(patch_statistics, patches, workers=1), one)
    h = haematoxylin(patches)
    thr = float(np.percentile(h, 90))
    serial = describe_patches(h, thr)
    assert serial[:, 0].max() >= 2                                 # nuclei were found
    np.testing.assert_array_equal(map_patches(describe_patches, h, thr, workers=2), serial)


def test_patches_cut_in_threads_equal_one_thread(tmp_path, monkeypatch):
    """Large patches (a full-resolution image's) are cut in threads: the same bytes as one thread, for
    an array and a tiled image read by region, spots off the image and fractional centres included."""
    import tifffile

    from data import wsi
    from data.wsi import TiledPixels, open_fullres_pixels
    from image_process import patches
    from image_process.patches import extract_patches

    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (700, 900, 3), dtype=np.uint8)
    xy = np.r_[rng.uniform(-40, 940, (300, 2)), [[0.5, 699.25], [-80.0, 20.0]]]
    monkeypatch.setattr(patches, "THREAD_ABOVE_PX", 0)
    monkeypatch.setattr(patches, "READ_BLOCK_PX", 256)
    monkeypatch.setattr(wsi, "STREAM_ABOVE_BYTES", 0)
    tifffile.imwrite(tmp_path / "img.tif", img, photometric="rgb", tile=(64, 64), compression="zlib")
    tiled = open_fullres_pixels(tmp_path / "img.tif")
    assert isinstance(tiled, TiledPixels)
    for pixels in (img, tiled):
        for side, out in ((61.3, 16), (8.0, 24), (120.0, 120)):
            one = extract_patches(pixels, xy, side, out, threads=1)
            np.testing.assert_array_equal(extract_patches(pixels, xy, side, out, threads=3), one)
    tiled.close()


def _one_patch_nuclei(h_od, threshold, min_area=4, min_distance=2):
    """The nucleus segmentation and statistics of one patch written plainly with scipy and skimage
    (peak_local_max, watershed), the reference for image_process.nuclei's stack version."""
    from scipy import ndimage as ndi
    from skimage.feature import peak_local_max
    from skimage.segmentation import watershed

    fg = ndi.binary_opening(ndi.gaussian_filter(h_od, 0.7) > threshold)
    seg = np.zeros(h_od.shape, np.int32)
    if fg.any():
        dist = ndi.gaussian_filter(ndi.distance_transform_edt(fg), 1.0)
        peaks = peak_local_max(dist, min_distance=min_distance, labels=ndi.label(fg)[0], exclude_border=False,
                               num_peaks_per_label=8)
        seg[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
        seg = watershed(-dist, seg, mask=fg)
        small = np.flatnonzero(np.bincount(seg.ravel()) < min_area)
        seg[np.isin(seg, small[small > 0])] = 0
    ids = seg.ravel()
    area = np.bincount(ids, minlength=ids.max() + 1)[1:].astype(np.float64)
    keep = area > 0
    if not keep.any():
        return seg, np.zeros(8, np.float32)
    yy, xx = np.indices(seg.shape)
    sums = lambda w: np.bincount(ids, weights=w.ravel(), minlength=ids.max() + 1)[1:][keep]   # noqa: E731
    a = area[keep]
    hmean, mx, my = sums(h_od) / a, sums(xx) / a, sums(yy) / a
    cxx, cyy, cxy = sums(xx * xx) / a - mx ** 2, sums(yy * yy) / a - my ** 2, sums(xx * yy) / a - mx * my
    tr, det = cxx + cyy, cxx * cyy - cxy ** 2
    disc = np.sqrt(np.maximum(tr ** 2 / 4 - det, 0))
    l1, l2 = tr / 2 + disc, np.maximum(tr / 2 - disc, 0)
    ecc = np.sqrt(np.clip(1 - l2 / np.maximum(l1, 1e-9), 0, 1))
    n = float(len(a))
    return seg, np.array([n, np.log1p(n), a.sum() / seg.size, a.mean(), a.std(), hmean.mean(), hmean.std(),
                          ecc.mean()], np.float32)


def test_nuclei_of_a_stack_equal_each_patch_alone():
    """Nuclei are segmented and described for a stack of patches at once (image_process.nuclei); each
    patch gets the labels and statistics it gets alone from scipy/skimage: touching and crowded blobs
    (tied seeds, regions within a window of each other), empty patches, an all-nucleus patch."""
    from image_process.nuclei import describe_patches, haematoxylin, nucleus_morphology, segment_nuclei, segment_patches

    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[:40, :40]
    patches = np.empty((120, 40, 40, 3), np.uint8)
    patches[:] = (230, 180, 210)
    for i, p in enumerate(patches):
        for cy, cx in rng.integers(0, 40, size=(rng.integers(0, 14) if i % 10 else 0, 2)):
            r2 = rng.integers(3, 30)
            p[(yy - cy) ** 2 + (xx - cx) ** 2 < r2] = (80, 40, 140)
    patches[7] = (80, 40, 140)                                                     # all nucleus
    patches = np.clip(patches + rng.normal(0, 6, patches.shape), 0, 255).astype(np.uint8)
    h = haematoxylin(patches)
    for threshold in (float(np.percentile(h, 60)), float(np.percentile(h, 85)), float(h.max()) + 1):
        seg, first = segment_patches(h, threshold)
        want = [_one_patch_nuclei(p, threshold) for p in h]
        for i, (s, f) in enumerate(want):
            np.testing.assert_array_equal(seg[i], s)
            np.testing.assert_array_equal(segment_nuclei(h[i], threshold), s)
            np.testing.assert_array_equal(nucleus_morphology(h[i], s), f)
        np.testing.assert_array_equal(describe_patches(h, threshold, batch=32), np.array([f for _, f in want]))
        assert (np.diff(first) >= 0).all()
    assert max(f[0] for _, f in (_one_patch_nuclei(p, np.percentile(h, 60)) for p in h)) >= 4   # crowded ones exist


def test_nucleus_peaks_equal_skimage_peak_local_max():
    """image_process.nuclei.label_peaks (the segmentation's seeds, without skimage's loop over regions)
    returns what skimage's peak_local_max returns, peaks and order, on opened regions: drawn discs and
    squares (the plain distance transform has many tied values) and smoothed distance maps of blobs."""
    from scipy import ndimage as ndi
    from skimage.feature import peak_local_max

    from image_process.nuclei import label_peaks

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:48, :48]
    checked = 0
    for _ in range(300):
        drawn = np.zeros((48, 48), bool)
        for cy, cx, r in zip(*rng.integers(0, 48, (2, 6)), rng.integers(1, 7, 6)):
            drawn |= (np.maximum(abs(yy - cy), abs(xx - cx)) <= r) if rng.random() < 0.5 else \
                ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r)
        fg = ndi.binary_opening(drawn)
        if not fg.any():
            continue
        labels, _ = ndi.label(fg)
        edt = ndi.distance_transform_edt(fg)
        for image in (edt, ndi.gaussian_filter(edt, 1.0).astype(np.float32)):
            for min_distance, per_label in ((2, 8), (1, 3), (3, 1)):
                want = peak_local_max(image, min_distance=min_distance, labels=labels, exclude_border=False,
                                      num_peaks_per_label=per_label)
                np.testing.assert_array_equal(label_peaks(image, labels, min_distance, per_label), want)
                checked += 1
    assert checked > 1000


def test_a_failed_worker_pool_falls_back_to_this_process(monkeypatch, caplog):
    from concurrent.futures.process import BrokenProcessPool

    import concurrent.futures
    from image_process.encoders import patch_statistics
    from image_process.process_pool import MIN_PATCHES, map_patches

    class Broken:
        def __init__(self, *a, **k):
            pass

        def __enter__(self):
            raise BrokenProcessPool("a worker was killed")

        def __exit__(self, *a):
            return False
    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", Broken)
    patches = np.random.default_rng(1).integers(0, 255, (MIN_PATCHES, 16, 16, 3), dtype=np.uint8)
    np.testing.assert_array_equal(map_patches(patch_statistics, patches, workers=2), patch_statistics(patches))
    assert "computing them in this process" in caplog.text


def test_worker_count_from_the_environment(monkeypatch):
    from data.errors import InputError
    from image_process.process_pool import WORKERS_ENV, available_cores, default_workers

    monkeypatch.delenv(WORKERS_ENV, raising=False)
    assert default_workers() == available_cores()
    monkeypatch.setenv(WORKERS_ENV, "1")
    assert default_workers() == 1
    monkeypatch.setenv(WORKERS_ENV, "many")
    with pytest.raises(InputError, match="STPIPE_WORKERS"):
        default_workers()


def test_whole_slide_tissue_keeps_stained_pieces_only():
    """A whole-slide grid goes on stained tissue: not on grey frame pieces, black pen marks or
    specks smaller than a grid cell (all of which the plain mask takes for tissue)."""
    import cv2

    from image_process.patches import slide_tissue, tissue_mask

    rng = np.random.default_rng(0)
    img = np.full((800, 800, 3), 245, np.uint8)
    cv2.ellipse(img, (400, 420), (220, 160), 0, 0, 360, (200, 110, 170), -1)     # H&E-pink tissue
    cv2.rectangle(img, (20, 20), (180, 70), (185, 185, 185), -1)                  # grey frame piece
    cv2.line(img, (600, 700), (760, 760), (30, 30, 30), 9)                        # black pen mark
    cv2.circle(img, (100, 600), 3, (200, 110, 170), -1)                           # speck (< one cell)
    img = np.clip(img + rng.normal(0, 3, img.shape), 0, 255).astype(np.uint8)
    plain, _ = tissue_mask(img)
    for y, x in [(45, 100), (730, 680), (600, 100)]:
        assert plain[y, x]                       # the plain mask takes them all
    mask, scale = slide_tissue(img, min_area=40 ** 2)
    assert scale == 1.0 and mask[420, 400]
    for y, x in [(45, 100), (730, 680), (600, 100)]:
        assert not mask[y, x]
    grey = np.repeat(img.mean(2, keepdims=True).astype(np.uint8), 3, axis=2)     # no colour: nothing is
    assert slide_tissue(grey, min_area=40 ** 2)[0].sum() == tissue_mask(grey)[0].sum()   # "stained", keep all


def _fullres_copy(synthetic_slice, path, **tiff_options):
    """The synthetic slide's hires image upsampled to full resolution and written to ``path`` (a TIFF
    with ``tiff_options``, or by OpenCV); returns (AnnData with that image as data.image only, pixels)."""
    import cv2
    import tifffile

    from data.readers import attach_fullres_image

    a = read_slide({"path": synthetic_slice})
    entry = a.uns[keys.SPATIAL_UNS][keys.library_id(a)]
    hires, s = entry["images"]["hires"], entry["scalefactors"]["tissue_hires_scalef"]
    full = cv2.resize(hires, None, fx=1 / s, fy=1 / s, interpolation=cv2.INTER_LINEAR)
    if path.suffix == ".tif":
        tifffile.imwrite(path, full, photometric="rgb", **tiff_options)
    else:
        cv2.imwrite(str(path), cv2.cvtColor(full, cv2.COLOR_RGB2BGR))
    entry["images"] = {}
    attach_fullres_image(a, path)
    return a, full


def test_tiled_fullres_image_is_read_by_region_with_the_same_features(synthetic_slice, tmp_path, monkeypatch):
    """A tiled full-resolution TIFF is never decoded whole: stage 1 reads it block by block (blocks
    made small here so that spots straddle them) and gets the features of the whole image in memory."""
    from data import wsi
    from data.wsi import TiledPixels
    from image_process import patches
    from image_process.patches import choose_image, extract_patches

    monkeypatch.setattr(patches, "READ_BLOCK_PX", 128)
    monkeypatch.setattr(wsi, "STREAM_ABOVE_BYTES", 0)   # stream whatever its size
    a, full = _fullres_copy(synthetic_slice, tmp_path / "full.tif", tile=(64, 64), compression="zlib")
    image = choose_image(a, "fullres")
    assert isinstance(image.pixels, TiledPixels) and image.pixels.shape == full.shape
    xy = np.vstack([a.obsm[keys.SPATIAL], [[-30.0, -30.0], [full.shape[1] + 9.5, 3.25]]])   # two off the image
    for side in (7.6, 40.0, 300.0):
        tiled, whole = extract_patches(image.pixels, xy, side, 16), extract_patches(full, xy, side, 16)
        assert np.abs(tiled.astype(int) - whole).max() <= 1 and (tiled != whole).mean() < 1e-3
    feats, info = spot_image_features(a, {"use": "fullres"})
    reference, _ = spot_image_features(a, {"use": "fullres"}, image=patches.SlideImage(full, 1.0, "memory", "1"))
    np.testing.assert_allclose(feats, reference, atol=1e-3)
    mask_tiled, s1 = patches.tissue_mask(image.pixels, max_side=100)
    image.close()
    mask_whole, s2 = patches.tissue_mask(full, max_side=100)
    h, w = min(mask_tiled.shape[0], mask_whole.shape[0]), min(mask_tiled.shape[1], mask_whole.shape[1])
    assert s1 == pytest.approx(s2, rel=0.02) and (mask_tiled[:h, :w] != mask_whole[:h, :w]).mean() < 0.02


def test_stages_close_a_streamed_image_once_done(synthetic_slice, tmp_path, monkeypatch):
    """A full-resolution image read block by block holds its file open while a stage cuts patches from it; stages 1
    and 4 and a stage-5 section close it once done (it stayed open until the process ended)."""
    import gc
    from pathlib import Path

    import psutil

    from data import wsi
    from image_process.main import run_stage as image_stage
    from pipeline.config import load_config
    from pipeline.expression_prediction import load_section
    from train_superres import run_stage as superres_stage

    monkeypatch.setattr(wsi, "STREAM_ABOVE_BYTES", 0)   # stream whatever its size
    tif = tmp_path / "full.tif"
    _fullres_copy(synthetic_slice, tif, tile=(64, 64), compression="zlib")
    is_open = lambda: any(Path(f.path) == tif for f in psutil.Process().open_files())   # noqa: E731
    sets = [f"data.path={synthetic_slice}", f"data.image={tif}", "data.truth=null", "image.use=fullres",
            "plot.figures=false"]
    root = Path(__file__).resolve().parents[1]
    quick = ["superres.steps=20", "superres.n_top_genes=20", "superres.patch_cnn.use=false", "superres.factor=1.5"]
    gc.collect()
    gc.disable()              # a file held by a reference cycle counts as open: nothing collects it in between
    try:
        assert image_stage(load_config(None, sets), tmp_path / "s1") and not is_open()
        load_section({"path": str(synthetic_slice), "image": str(tif), "name": "s"}, load_config(None, sets)["image"])
        assert not is_open()
        superres_stage(load_config(root / "configs" / "superres.yaml", sets + quick), tmp_path / "s4", progress=False)
        assert (tmp_path / "s4" / "04_superres.h5ad").exists() and not is_open()
    finally:
        gc.enable()


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="ru_maxrss is in kB on Linux only")
def test_tiled_fullres_patches_need_far_less_memory_than_the_image(tmp_path):
    """Cutting a patch at every 50th pixel of a 64 MB tiled TIFF (JPEG tiles) raises the peak by far
    less than the image: only a block at a time is decoded."""
    import subprocess
    import sys
    import tifffile
    from pathlib import Path

    rng = np.random.default_rng(0)
    rgb = np.repeat(np.repeat(rng.integers(0, 255, (128, 171, 3), dtype=np.uint8), 32, 0), 32, 1)
    path = tmp_path / "big.tif"
    tifffile.imwrite(path, rgb, photometric="rgb", tile=(256, 256), compression="jpeg")
    code = ("import resource, sys; sys.path.insert(0, sys.argv[2]); import numpy as np; "
            "from data.wsi import open_fullres_pixels; from image_process.patches import extract_patches; "
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; px = open_fullres_pixels(sys.argv[1], 0); "
            "g = np.mgrid[0:px.shape[1]:50, 0:px.shape[0]:50].reshape(2, -1).T.astype(float); "
            "p = extract_patches(px, g, 40, 8); assert p.shape == (len(g), 8, 8, 3) and p.std() > 10; "
            "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)")
    root = str(Path(__file__).resolve().parents[1])
    grown = int(subprocess.run([sys.executable, "-c", code, str(path), root], capture_output=True, text=True,
                               check=True).stdout.strip().splitlines()[-1])
    assert grown < 0.5 * rgb.nbytes, f"cutting patches grew the peak by {grown / 1e6:.0f} MB"


def test_plain_or_small_fullres_images_are_arrays(synthetic_slice, tmp_path):
    """A JPEG/PNG or an uncompressed stripped TIFF is an array (the TIFF memory-mapped), as before;
    so is a tiled TIFF under the streaming size."""
    from data.wsi import STREAM_ABOVE_BYTES
    from image_process.patches import choose_image

    for name, options in (("full.png", {}), ("full.tif", {}), ("tiled.tif", {"tile": (64, 64)})):
        a, full = _fullres_copy(synthetic_slice, tmp_path / name, **options)
        assert full.nbytes < STREAM_ABOVE_BYTES
        px = choose_image(a, "fullres").pixels
        assert isinstance(px, np.ndarray) and np.array_equal(px, full)


@pytest.mark.parametrize("name", ["uni", "uni2-h", "virchow2", "h-optimus-0"])
def test_foundation_model_presets_are_the_networks_of_their_model_cards(name):
    """Each preset builds (on PyTorch's meta device: shapes only, no memory) a network with the parameter
    count its model card publishes (to the precision published) and the feature size it documents."""
    import torch

    from image_process.encoders import FOUNDATION_MODELS, POOLINGS, create_timm_model
    preset = FOUNDATION_MODELS[name]
    try:
        with torch.device("meta"):
            model = create_timm_model(preset["arch"], f"image.encoder={name}", **preset["options"])
    except InputError as exc:
        if "newer timm" in str(exc):
            pytest.skip(f"this timm cannot build {name}: {exc}")
        raise
    except NotImplementedError:          # timm 0.9's ViT calls .item() while building: not on the meta device
        pytest.skip("this timm cannot build a network on PyTorch's meta device")
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    assert n_params == pytest.approx(preset["params_m"], rel=preset.get("params_rel", 0.005))
    out = POOLINGS[preset.get("pool", "model")](model, torch.zeros(2, 3, 224, 224, device="meta"))
    assert tuple(out.shape) == (2, preset["dim"])


def test_a_foundation_model_preset_loads_its_weights_file_alone_and_pools_as_published(tmp_path, caplog):
    """image.encoder=virchow2 with a weights file saved from its network (made small here by overriding
    depth and width in image.options, as any of the preset's options can be) gives the class token beside
    the mean patch token, registers left out; a file of another model is refused naming the preset."""
    import torch

    from image_process.encoders import FOUNDATION_MODELS, create_timm_model
    from image_process.patches import extract_patches
    small = {"depth": 1, "embed_dim": 64, "num_heads": 2, "mlp_ratio": 4.0}
    options = {**FOUNDATION_MODELS["virchow2"]["options"], **small}
    try:
        reference = create_timm_model("vit_huge_patch14_224", **options).eval()
    except InputError as exc:
        pytest.skip(f"this timm cannot build virchow2: {exc}")
    weights = tmp_path / "pytorch_model.bin"
    torch.save(reference.state_dict(), weights)
    enc = build_encoder("virchow2", str(weights), input_size=56, **small)
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (160, 160, 3), dtype=np.uint8)
    centers = np.array([[50.0, 60.0], [80.0, 80.0], [110.0, 95.0]])
    feats = enc.encode(rgb, centers, 20.0)
    assert feats.shape == (3, 128)
    x = torch.from_numpy(extract_patches(rgb, centers, 40.0, 56)).permute(0, 3, 1, 2).float().div(255)
    x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.inference_mode():
        tokens = reference.forward_features(x)          # class token, 4 registers, 16 patch tokens
    assert tokens.shape[1] == 1 + 4 + 16
    want = torch.cat([tokens[:, 0], tokens[:, 5:].mean(1)], dim=1).numpy()
    np.testing.assert_allclose(feats, want, rtol=1e-4, atol=1e-5)
    # half precision (as the model card runs it on a GPU): bf16 on the CPU too, close to fp32; fp16 is for CUDA
    half = build_encoder("virchow2", str(weights), input_size=56, precision="bf16", **small).encode(rgb, centers, 20.0)
    assert half.dtype == np.float32 and not np.array_equal(half, feats)
    assert np.corrcoef(half.ravel(), feats.ravel())[0, 1] > 0.99
    fp16 = build_encoder("virchow2", str(weights), input_size=56, precision="fp16", **small)
    with caplog.at_level("WARNING", logger="stpipe"):
        np.testing.assert_array_equal(fp16.encode(rgb, centers, 20.0, device="cpu"), feats)
    assert "precision=fp16 is for a CUDA GPU" in caplog.text
    with pytest.raises(InputError, match="precision='half'"):
        build_encoder("virchow2", str(weights), precision="half", **small)
    with pytest.raises(InputError, match="image.encoder=virchow2 needs image.weights.*paige-ai/Virchow2"):
        build_encoder("virchow2", None)
    other = tmp_path / "uni.bin"
    torch.save(create_timm_model("vit_large_patch16_224", **{**FOUNDATION_MODELS["uni"]["options"], **small}).state_dict(),
               other)
    with pytest.raises(InputError, match="image.encoder=virchow2"):
        build_encoder("virchow2", str(other), **small)
    h_optimus = FOUNDATION_MODELS["h-optimus-0"]
    assert h_optimus["mean"] != (0.485, 0.456, 0.406)      # its own normalisation, not ImageNet's
