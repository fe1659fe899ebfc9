"""Array coordinates recovered from pixel positions (data.lattice); the .h5ad reader's use of them is
checked in test_readers.test_h5ad_roundtrip."""
import numpy as np
import pytest

from data import keys
from data.lattice import infer_array_coordinates
from data.readers import read_slide


def _same_lattice(found, true):
    """``found`` and ``true`` (n, 2) index the same lattice when one is an exact affine image of the other."""
    A = np.c_[found, np.ones(len(found))]
    coef, *_ = np.linalg.lstsq(A, true, rcond=None)
    return np.abs(A @ coef - true).max() < 1e-6


def _hex_spots(n_rows=20, n_cols=30):
    rows, cols = np.meshgrid(np.arange(n_rows), np.arange(n_cols), indexing="ij")
    keep = (rows + cols) % 2 == 0
    true = np.c_[cols[keep], rows[keep]]
    xy = np.c_[true[:, 0] * 50.0, true[:, 1] * 100.0 * np.sqrt(3) / 2]   # 100 px spacing
    return true, xy


def _warp(xy, angle=0.4, shear=0.03, noise=2.0, seed=0):
    R = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]) @ [[1, shear], [0, 1.02]]
    return xy @ R.T + 1000 + np.random.default_rng(seed).normal(0, noise, xy.shape)


def test_hexagonal_and_square_lattices_are_recovered():
    true, xy = _hex_spots()
    cut = (true[:, 0] < 12) | (true[:, 0] > 15)                            # two tissue pieces
    found, kind = infer_array_coordinates(_warp(xy[cut]))
    assert kind == "hex" and _same_lattice(found, true[cut])
    assert np.all((found.sum(1)) % 2 == 0) and found.min() == 0           # Visium numbering

    sq = np.c_[np.arange(600) % 30, np.arange(600) // 30]
    found, kind = infer_array_coordinates(_warp(sq * 200.0, angle=-0.1))
    assert kind == "square" and _same_lattice(found, sq)


def test_no_lattice_no_array():
    rng = np.random.default_rng(1)
    assert infer_array_coordinates(rng.uniform(0, 1000, (2000, 2))) is None
    assert infer_array_coordinates(np.zeros((3, 2))) is None


@pytest.mark.parametrize("spec", [("dlpfc", "151673"), ("her2st", "C3")])
def test_real_slides_lattice(spec):
    from conftest import shared
    if spec[0] == "dlpfc":
        a = read_slide({"path": shared("dlpfc", spec[1])})
    else:
        a = read_slide({"counts": shared("her2st", "counts", f"{spec[1]}.tsv.gz"),
                        "spots": shared("her2st", "spots", f"{spec[1]}_selection.tsv")})
    found, kind = infer_array_coordinates(a.obsm["spatial"])
    assert kind == ("hex" if spec[0] == "dlpfc" else "square")
    assert _same_lattice(found, a.obs[[keys.ARRAY_COL, keys.ARRAY_ROW]].to_numpy())
