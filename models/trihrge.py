"""TriHRGE: multi-scale image features fused with the low-resolution expression by a light network."""
from __future__ import annotations

import torch
import torch.nn as nn


class GatedScaleAttention(nn.Module):
    """Attention pooling over image scales (gated ABMIL): (B, S, h) -> (B, h), weights (B, S)."""

    def __init__(self, dim: int, hidden: int = 64):
        super().__init__()
        self.v = nn.Linear(dim, hidden)
        self.u = nn.Linear(dim, hidden)
        self.w = nn.Linear(hidden, 1)

    def forward(self, h):
        a = torch.softmax(self.w(torch.tanh(self.v(h)) * torch.sigmoid(self.u(h))), dim=1)
        return (a * h).sum(1), a.squeeze(-1)


class TriHRGE(nn.Module):
    """Predict expression at a location from image features at S scales, the low-resolution
    expression there and geometry scalars.

    forward(image (B, S, d_img), lowres (B, G), context (B, d_ctx)) -> (B, G) expression in the
    same (standardised) units as ``lowres``: lowres + a learned correction through a rank-``rank``
    bottleneck. ``context`` summarises the expression around the location (geometry scalars and
    low-resolution estimates at several widths, projected on a few principal axes); ``lowres``
    itself is only the base the correction is added to.
    """

    def __init__(self, n_genes: int, img_dim: int, n_scales: int = 2, geo_dim: int = 2, hidden: int = 256,
                 dropout: float = 0.1, rank: int = 64):
        super().__init__()
        self.scale_proj = nn.ModuleList([nn.Sequential(nn.Linear(img_dim, hidden), nn.LayerNorm(hidden), nn.GELU())
                                         for _ in range(n_scales)])
        self.pool = GatedScaleAttention(hidden)
        self.expr = nn.Sequential(nn.Linear(geo_dim, hidden), nn.LayerNorm(hidden), nn.GELU())
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(2 * hidden, hidden), nn.GELU(),
                                  nn.Linear(hidden, rank), nn.Linear(rank, n_genes))
        nn.init.zeros_(self.head[-1].weight)   # untrained model = its low-resolution base
        nn.init.zeros_(self.head[-1].bias)

    def forward(self, image, lowres, context):
        h = torch.stack([p(image[:, i]) for i, p in enumerate(self.scale_proj)], dim=1)
        img, _ = self.pool(h)
        e = self.expr(context)
        return lowres + self.head(torch.cat([img, e], dim=1))
