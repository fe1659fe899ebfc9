"""Diff-ST denoiser: cross-modal conditional denoising network for per-location expression.

Conditions: the low-resolution expression at the location (B, G), a cell-level image feature
(B, d) (spot-sized patch), tissue-level image tokens (B, T, d) (wider context). Pieces:

* disentangling: image and expression conditions are each split into a shared and a specific part;
  the expression's shared part is modulated by the image-specific part (adaptive scale and shift);
  ``disentangle_loss`` aligns the shared parts and decorrelates shared from specific;
* cross-attention from the cell-level feature (query) to the tissue-level tokens (keys, values);
* a gene co-expression graph network: one token per gene, propagated over a fixed gene graph
  (G x G sparse, normalised) and modulated (FiLM) by the condition and the diffusion time.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class Disentangle(nn.Module):
    def __init__(self, img_dim: int, n_genes: int, dim: int):
        super().__init__()
        self.img_shared, self.img_specific = nn.Linear(img_dim, dim), nn.Linear(img_dim, dim)
        self.expr_shared, self.expr_specific = nn.Linear(n_genes, dim), nn.Linear(n_genes, dim)
        self.modulate = nn.Linear(dim, 2 * dim)

    def forward(self, img, expr):
        si, pi = self.img_shared(img), self.img_specific(img)
        se, pe = self.expr_shared(expr), self.expr_specific(expr)
        scale, shift = self.modulate(F.gelu(pi)).chunk(2, dim=-1)
        fused = se * (1 + scale) + shift + si + pe
        return fused, (si, pi, se, pe)


def disentangle_loss(parts) -> torch.Tensor:
    si, pi, se, pe = parts
    align = 1 - F.cosine_similarity(si, se, dim=-1).mean()
    ortho = (F.cosine_similarity(si, pi, dim=-1) ** 2).mean() + (F.cosine_similarity(se, pe, dim=-1) ** 2).mean()
    return align + ortho


class GeneGraphLayer(nn.Module):
    """h <- LayerNorm(h + GELU(A h W)), then FiLM by the condition (B, c): (G, B, e) -> (G, B, e).

    Gene tokens are laid out genes-first so that the sparse gene graph A (G x G) multiplies them
    as one (G, B * e) matrix without a copy."""

    def __init__(self, dim: int, cond_dim: int):
        super().__init__()
        self.lin = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.film = nn.Linear(cond_dim, 2 * dim)

    def forward(self, h, adj, cond):
        G, B, E = h.shape
        msg = torch.sparse.mm(adj, self.lin(h).reshape(G, B * E)).reshape(G, B, E)
        h = self.norm(h + F.gelu(msg))
        scale, shift = self.film(cond).chunk(2, dim=-1)
        return h * (1 + scale) + shift


class DiffSTDenoiser(nn.Module):
    """forward(x_t (B, G), t (B,), lowres (B, G), cell (B, d), tissue (B, T, d)) -> noise (B, G)."""

    def __init__(self, n_genes: int, img_dim: int, gene_adj: torch.Tensor, gene_dim: int = 32,
                 cond_dim: int = 128, n_layers: int = 2, heads: int = 4):
        super().__init__()
        self.register_buffer("gene_adj", gene_adj.coalesce() if gene_adj.is_sparse else gene_adj.to_sparse())
        self.disentangle = Disentangle(img_dim, n_genes, cond_dim)
        self.q, self.kv = nn.Linear(img_dim, cond_dim), nn.Linear(img_dim, cond_dim)
        self.cross = nn.MultiheadAttention(cond_dim, heads, batch_first=True)
        self.time = nn.Sequential(nn.Linear(cond_dim, cond_dim), nn.GELU(), nn.Linear(cond_dim, cond_dim))
        self.gene_emb = nn.Parameter(torch.randn(n_genes, gene_dim) * 0.02)
        self.inp = nn.Linear(2, gene_dim)
        self.layers = nn.ModuleList([GeneGraphLayer(gene_dim, cond_dim) for _ in range(n_layers)])
        self.out = nn.Linear(gene_dim, 1)
        self.cond_dim = cond_dim
        self.last_parts = None

    def condition(self, t, lowres, cell, tissue):
        fused, parts = self.disentangle(cell, lowres)
        att, _ = self.cross(self.q(cell).unsqueeze(1), self.kv(tissue), self.kv(tissue), need_weights=False)
        return fused + att.squeeze(1) + self.time(timestep_embedding(t, self.cond_dim)), parts

    def forward(self, x_t, t, lowres, cell, tissue):
        cond, self.last_parts = self.condition(t, lowres, cell, tissue)
        h = self.inp(torch.stack([x_t.T, lowres.T], dim=-1)) + self.gene_emb[:, None, :]   # (G, B, e)
        for layer in self.layers:
            h = layer(h, self.gene_adj, cond)
        return self.out(h).squeeze(-1).T


def coexpression_graph(expr: torch.Tensor, k: int = 10) -> torch.Tensor:
    """Sparse symmetric-normalised gene graph (G x G) from the top-k positive correlations per gene
    of ``expr`` (n_locations, G), self-loops included."""
    x = expr - expr.mean(0)
    x = x / x.norm(dim=0).clamp_min(1e-8)
    c = x.T @ x
    c.fill_diagonal_(-1)
    k = min(k, c.shape[0] - 1)
    val, idx = c.topk(k, dim=1)
    rows = torch.arange(c.shape[0], device=c.device).repeat_interleave(k)
    keep = val.reshape(-1) > 0
    A = torch.zeros_like(c)
    A[rows[keep], idx.reshape(-1)[keep]] = 1.0
    A = ((A + A.T) > 0).float() + torch.eye(c.shape[0], device=c.device)
    d = A.sum(1).rsqrt()
    return (d[:, None] * A * d[None]).to_sparse()
