"""Spatial weight matrix and enhancement on hand-worked examples."""
import numpy as np
import pytest

from positions_enhancement.spatial_weights import enhance, estimate_spot_spacing, spatial_weight_matrix


def test_weight_matrix_on_a_line_by_hand():
    # spots at x = 0, 1, 2 and an isolated one at 10; spacing 1; radius 1.5 -> 0-1 and 1-2 are neighbours
    coords = np.array([[0.0, 0], [1, 0], [2, 0], [10, 0]])
    assert estimate_spot_spacing(coords) == pytest.approx(1.0)
    W = spatial_weight_matrix(coords, 1.0, radius=1.5, kernel="gaussian", sigma=1.0).toarray()
    expected = np.array([[0, 1, 0, 0], [0.5, 0, 0.5, 0], [0, 1, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_allclose(W, expected, atol=1e-7)
    X = np.array([[1.0], [2.0], [4.0], [8.0]])
    # (1 - a) X + a W X with a = 0.5; the isolated spot keeps its value
    np.testing.assert_allclose(enhance(X, spatial_weight_matrix(coords, 1.0), 0.5).ravel(), [1.5, 2.25, 3.0, 8.0])


def test_gaussian_weights_by_distance():
    # centre spot with neighbours at distance 1 and sqrt(2) (square grid, radius 1.5 keeps the diagonals)
    coords = np.array([[0.0, 0], [1, 0], [1, 1]])
    W = spatial_weight_matrix(coords, 1.0, radius=1.5, sigma=1.0).toarray()
    w1, w2 = np.exp(-0.5), np.exp(-1.0)
    np.testing.assert_allclose(W[0], [0, w1 / (w1 + w2), w2 / (w1 + w2)], rtol=1e-6)


def test_visium_hex_spacing_from_array_coordinates():
    rows, cols = np.meshgrid(np.arange(10), np.arange(10), indexing="ij")
    array = np.c_[(2 * cols + rows % 2).ravel(), rows.ravel()]          # (col, row)
    spacing = 137.0
    px = np.c_[array[:, 0] * spacing / 2, array[:, 1] * spacing * np.sqrt(3) / 2] + [500, 300]
    assert estimate_spot_spacing(px, array) == pytest.approx(spacing, rel=1e-6)
    W = spatial_weight_matrix(px, spacing, radius=1.5, kernel="uniform")
    interior = 5 * 10 + 5
    row = W[interior].toarray().ravel()
    assert (row > 0).sum() == 6 and np.allclose(row[row > 0], 1 / 6)      # every one of the 6-ring
    np.testing.assert_allclose(np.asarray(W.sum(1)).ravel(), 1.0, rtol=1e-6)


def test_alpha_must_be_a_fraction():
    from data.errors import InputError
    with pytest.raises(InputError):
        enhance(np.ones((3, 1)), spatial_weight_matrix(np.eye(3), 1.0), 1.5)
