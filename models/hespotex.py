"""HESpotEx: expression from the H&E image alone, as two aligned embedding streams and a GCN decoder.

Pure torch modules (no files, no AnnData):

* :class:`GraphAttentionAutoencoder` -- the expression stream. Graph attention layers over a
  section's spatial graph map each spot's log-normalised expression (n, g) to an embedding (n, d)
  that a linear decoder maps back to the expression; trained on the training sections only.
* :class:`ImageToExpression` -- the image stream and decoder. An MLP maps each spot's image
  features (n, f) to an embedding (n, d) trained to agree with the expression embedding; a linear
  gene head plus a stack of GCN layers over the spatial graph of the image-derived embeddings
  (their outputs averaged, jumping-knowledge style) give the expression of every gene, which is then
  scaled per spot by the nucleus-density factor ``density ** beta`` (per-gene ``beta``, learned,
  starting at 0: the decoder learns how strongly each gene follows cell density).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class GraphAttentionAutoencoder(nn.Module):
    """Expression (n, n_genes) + spatial graph -> embedding (n, dim) -> reconstruction (n, n_genes)."""

    def __init__(self, n_genes: int, dim: int = 32, hidden: int = 128, heads: int = 4, dropout: float = 0.1):
        from models.graph_conv import GATConv

        super().__init__()
        self.gat1 = GATConv(n_genes, hidden // heads, heads=heads, dropout=dropout)
        self.gat2 = GATConv(hidden, dim, heads=1, dropout=dropout)
        self.decoder = nn.Linear(dim, n_genes)
        self.dropout = dropout

    def encode(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        h = F.elu(self.gat1(F.dropout(x, self.dropout, self.training), edge_index))
        return self.gat2(h, edge_index)

    def forward(self, x, edge_index):
        z = self.encode(x, edge_index)
        return z, self.decoder(z)


class ImageToExpression(nn.Module):
    """Image features (n, n_features) + spatial graph + density (n,) -> (expression (n, n_genes),
    image embedding (n, dim)).

    ``gene_mean`` (n_genes,) initialises the output bias (log-normalised units), so training starts
    from the training sections' mean profile.
    """

    def __init__(self, n_features: int, n_genes: int, dim: int = 32, hidden: int = 256, n_gcn: int = 3,
                 dropout: float = 0.2, gene_mean: torch.Tensor | None = None):
        from models.graph_conv import GCNConv

        super().__init__()
        self.embed = nn.Sequential(nn.Dropout(dropout), nn.Linear(n_features, hidden), nn.GELU(),
                                   nn.LayerNorm(hidden), nn.Dropout(dropout), nn.Linear(hidden, dim))
        self.gene_head = nn.Linear(dim, n_genes)
        self.gcn = nn.ModuleList([GCNConv(dim, dim) for _ in range(n_gcn)])
        self.gcn_head = nn.Linear(dim, n_genes)
        self.bias = nn.Parameter(torch.zeros(n_genes) if gene_mean is None else gene_mean.clone().float())
        self.beta = nn.Parameter(torch.zeros(n_genes))
        self.dropout = dropout

    def forward(self, features, edge_index, density=None):
        z = self.embed(features)
        h, jump = z, []
        for conv in self.gcn:
            h = F.gelu(conv(h, edge_index))
            jump.append(h)
        out = self.bias + self.gene_head(z)
        if jump:
            out = out + self.gcn_head(torch.stack(jump).mean(0))
        if density is not None:
            out = out * torch.exp(self.beta * torch.log(density.clamp_min(1e-2)).clamp(-2, 2)[:, None])
        return out, z


def pearson_loss(pred: torch.Tensor, target: torch.Tensor, dim: int = 0, eps: float = 1e-6) -> torch.Tensor:
    """1 - mean Pearson correlation along ``dim`` (dim=0: per gene across spots)."""
    p = pred - pred.mean(dim, keepdim=True)
    t = target - target.mean(dim, keepdim=True)
    r = (p * t).sum(dim) / (p.norm(dim=dim) * t.norm(dim=dim) + eps)
    return 1 - r.mean()
