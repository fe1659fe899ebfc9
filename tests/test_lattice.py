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


def test_neighbours_are_decided_on_the_array_sites():
    """DEVLOG 342: on a legacy ST grid whose detected positions stray from the printed grid, radius 1.5 spacings
    still takes each interior spot's 8 surrounding spots (their array sites decide), with the weights from pixel
    distances; on an exact hexagonal lattice the graph is the pixel positions' one, edge for edge; spots that are
    no lattice of their positions (or no array coordinates) fall back to the pixel positions."""
    from data.lattice import lattice_sites
    from pipeline.graphs import RadiusGraph, spot_neighbours
    from positions_enhancement.spatial_weights import spatial_weight_matrix

    sq = np.c_[np.arange(400) % 20, np.arange(400) // 20]
    xy = _warp(sq * 200.0, angle=0.2, shear=0.0, noise=18.0, seed=3)        # ~0.09 spacings of jitter
    spacing = 200.0 * 1.02 ** 0.5
    interior = np.all((sq > 0) & (sq < 19), axis=1)
    on_sites = spot_neighbours(xy, 1.5 * spacing, sq)
    assert np.all(np.asarray(on_sites.sum(1)).ravel()[interior] == 8)
    on_pixels = RadiusGraph(1.5 * spacing).build(xy)
    assert np.asarray(on_pixels.sum(1)).ravel()[interior].min() < 8       # the jitter drops diagonals there
    W = spatial_weight_matrix(xy, spacing, 1.5, "gaussian", 1.0, sq).tocoo()
    assert np.all(np.bincount(W.row, minlength=400)[interior] == 8)
    d = np.linalg.norm(xy[W.row] - xy[W.col], axis=1) / spacing
    w = np.exp(-d ** 2 / 2)
    row_sum = np.bincount(W.row, weights=w, minlength=400)
    np.testing.assert_allclose(W.data, w / row_sum[W.row], rtol=1e-6)    # pixel distances weigh them
    np.testing.assert_allclose(np.asarray(W.sum(1)).ravel(), 1.0, rtol=1e-6)

    true, hex_xy = _hex_spots()
    exact = _warp(hex_xy, noise=0.0)
    assert (spot_neighbours(exact, 150.0, true) != RadiusGraph(150.0).build(exact)).nnz == 0

    assert lattice_sites(None, xy) is None
    shuffled = sq[np.random.default_rng(0).permutation(400)]                # indices that are no lattice of xy
    assert lattice_sites(shuffled, xy) is None
    assert (spot_neighbours(xy, 1.5 * spacing, shuffled) != on_pixels).nnz == 0
