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
