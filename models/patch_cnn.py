"""A small convolutional network trained from scratch on H&E spot patches (no downloaded weights).

Pure torch (no files, no AnnData). Stage 5 uses it as HESpotEx's second image stream, "a network
trained here": it sees the pixels of each spot's patch, where the first stream sees handcrafted
colour/stain/texture statistics, maps them to an image embedding (trained to agree with the
expression embedding, as the first stream's is) and decodes expression from it.

Input: patches (n, 3, S, S) float, each channel standardised by its section's pixel mean and standard
deviation (:func:`standardise_patches`), so a section's overall stain and brightness do not matter
(the pixel-level counterpart of standardising handcrafted features per section).
Output: (n, n_genes) expression in standardised units (each gene centred and scaled by the training
spots' mean and standard deviation of log1p(CP10k); the caller converts back), and the (n, dim)
image embedding it is decoded from (trained to agree with HESpotEx's expression embedding).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU())


class PatchCNN(nn.Module):
    """Patch (n, 3, S, S) -> expression (n, n_genes), standardised units.

    Three stages of 3x3 convolutions (``width``, 2x, 4x channels, each followed by 2x2 max-pooling),
    one more convolution, global average pooling to a (n, 4 * width) descriptor, dropout, a linear
    map to the image embedding (n, dim), and a linear gene head from it: the genes share ``dim``
    image programmes. ``forward`` returns (expression (n, n_genes), embedding (n, dim)). Works for
    any S >= 8 (the poolings floor odd sizes; the global average pooling takes what is left); the
    stages ask for at least 16 (48 px by default).
    """

    def __init__(self, n_genes: int, width: int = 16, dim: int = 32, dropout: float = 0.3):
        super().__init__()
        w = int(width)
        self.trunk = nn.Sequential(_block(3, w), _block(w, w), nn.MaxPool2d(2),
                                   _block(w, 2 * w), _block(2 * w, 2 * w), nn.MaxPool2d(2),
                                   _block(2 * w, 4 * w), nn.MaxPool2d(2), _block(4 * w, 4 * w),
                                   nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.embed = nn.Sequential(nn.Dropout(dropout), nn.Linear(4 * w, dim))
        self.gene_head = nn.Linear(dim, n_genes)

    def forward(self, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.embed(self.trunk(patches))
        return self.gene_head(z), z


def patch_channel_stats(patches: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel pixel mean and standard deviation (each (3,), in 0-255 units) of uint8 patches
    (n, S, S, 3): the statistics :func:`standardise_patches` removes."""
    p = np.asarray(patches, np.float64).reshape(-1, 3)
    return p.mean(0), p.std(0) + 1e-6


def standardise_patches(patches: np.ndarray, mean: np.ndarray, std: np.ndarray) -> torch.Tensor:
    """uint8 (n, S, S, 3) -> float32 tensor (n, 3, S, S), every channel standardised by ``mean``/``std``."""
    p = (np.asarray(patches, np.float32) - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return torch.from_numpy(np.ascontiguousarray(p.transpose(0, 3, 1, 2)))


def dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th (0-7) of the 8 rotations/reflections of square images (n, c, S, S)."""
    x = torch.rot90(x, k % 4, (2, 3))
    return x.flip(3) if k >= 4 else x
