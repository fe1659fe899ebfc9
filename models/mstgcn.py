"""M-STGCN: one GCN branch per graph (spatial, gene-similarity, image-similarity), attention
fusion across branches, and a ZINB decoder. Pure torch / torch_geometric."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from models.graph_conv import SymmetricGCNConv


class GCNBranch(nn.Module):
    """Two GCN layers (ReLU + dropout between) over one graph: (n, in) -> (n, out). The normalised graph is
    cached at the first call (one graph per branch); a symmetric one is also used for the backward pass."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, dropout: float):
        super().__init__()
        self.conv1 = SymmetricGCNConv(in_dim, hidden, cached=True)
        self.conv2 = SymmetricGCNConv(hidden, out_dim, cached=True)
        self.dropout = dropout

    def forward(self, x, adj):
        h = F.relu(self.conv1(x, adj))
        h = F.dropout(h, self.dropout, training=self.training)
        return self.conv2(h, adj)


class AttentionFusion(nn.Module):
    """Per-spot softmax attention over branch embeddings: (n, b, d) -> (n, d), weights (n, b)."""

    def __init__(self, dim: int, hidden: int = 16):
        super().__init__()
        self.score = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, 1, bias=False))

    def forward(self, z):
        beta = torch.softmax(self.score(z), dim=1)
        return (beta * z).sum(1), beta.squeeze(-1)


class ZINBDecoder(nn.Module):
    """Embedding -> ZINB parameters for ``n_genes`` genes.

    mean: mu = size_factor x exp(rate_logits), so exp(rate_logits) is the expected count per
    10,000 UMIs when size_factor = total_counts / 1e4; dispersion theta is one parameter per gene;
    pi_logits are per spot and gene. With ``n_covariates`` > 0 each spot's covariates (n, n_covariates; a one-hot
    section) are read beside its embedding, as scVI's decoder reads the batch.
    """

    def __init__(self, emb_dim: int, hidden: int, n_genes: int, n_covariates: int = 0):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(emb_dim + n_covariates, hidden), nn.BatchNorm1d(hidden), nn.ReLU())
        self.rate = nn.Linear(hidden, n_genes)
        self.dropout = nn.Linear(hidden, n_genes)
        self.log_theta = nn.Parameter(torch.zeros(n_genes))

    def start_from(self, log_rate: torch.Tensor, theta: torch.Tensor, pi: float) -> None:
        """Start each gene at a null fit: the rate head's bias at ``log_rate`` (g,; log expected count per 10k
        UMIs), the dispersion at ``theta`` (g,; NB inverse dispersion) and the zero-inflation head's bias at
        logit(``pi``). The weights stay as initialised, so every spot starts near its gene's null fit."""
        with torch.no_grad():
            self.rate.bias.copy_(log_rate.to(self.rate.bias))
            theta = theta.to(self.log_theta).clamp_min(2e-4) - 1e-4        # softplus(log_theta) + 1e-4 = theta
            self.log_theta.copy_(theta + torch.log(-torch.expm1(-theta)))  # the inverse of softplus, stable
            self.dropout.bias.fill_(float(torch.logit(torch.tensor(pi, dtype=torch.float64))))

    def gene_parameters(self) -> list:
        """The per-gene parameter vectors (each (g,)): the dispersion and the biases of the rate and zero-inflation
        heads, which :func:`models.training.train_mstgcn` can leave out of weight decay."""
        return [self.log_theta, self.rate.bias, self.dropout.bias]

    def forward(self, z, covariates=None):
        h = self.body(z if covariates is None else torch.cat([z, covariates], dim=1))
        log_rate = self.rate(h).clamp(-15, 12)
        return log_rate, F.softplus(self.log_theta) + 1e-4, self.dropout(h)


class MSTGCN(nn.Module):
    """Multi-graph GCN with attention fusion and a ZINB decoder.

    forward(x (n, in_dim), graphs: b adjacencies, each a (2, m) edge index or an (n, n) torch
    sparse tensor (faster on CPU); GCN normalisation with self-loops is applied inside) -> dict with ``embedding`` (n, emb_dim),
    ``attention`` (n, b), ``log_rate`` (n, n_genes; log expected count per 10k UMIs), ``theta``
    (n_genes,), ``pi_logits`` (n, n_genes), ``features`` (n, in_dim; a linear reconstruction of the
    input). ``decode_rows`` restricts the ZINB decoding to a subset of spots.

    With ``n_sections`` > 0 (spots of several sections trained together) ``section`` gives each spot's section
    ((n,) integer codes), which both decoders read beside the embedding (one-hot): what differs between sections
    alone need not be carried by the embedding. ``n_sections`` = 0 is the network without it, weight for weight.
    """

    def __init__(self, in_dim: int, n_genes: int, n_graphs: int, hidden: int = 256, emb_dim: int = 64,
                 decoder_hidden: int = 128, dropout: float = 0.1, n_sections: int = 0):
        super().__init__()
        self.branches = nn.ModuleList([GCNBranch(in_dim, hidden, emb_dim, dropout) for _ in range(n_graphs)])
        self.fusion = AttentionFusion(emb_dim)
        self.project = nn.Linear(emb_dim, emb_dim)
        self.decoder = ZINBDecoder(emb_dim, decoder_hidden, n_genes, n_sections)
        self.feature_decoder = nn.Linear(emb_dim + n_sections, in_dim)
        self.n_sections = n_sections

    def embed(self, x, graphs):
        z = torch.stack([b(x, e) for b, e in zip(self.branches, graphs)], dim=1)
        fused, att = self.fusion(z)
        return self.project(fused), att

    def forward(self, x, graphs, decode_rows=None, section=None):
        emb, att = self.embed(x, graphs)
        onehot = self._onehot(section, x.shape[0])
        zd = emb if decode_rows is None else emb[decode_rows]
        cd = onehot if onehot is None or decode_rows is None else onehot[decode_rows]
        log_rate, theta, pi_logits = self.decoder(zd, cd)
        features = self.feature_decoder(emb if onehot is None else torch.cat([emb, onehot], dim=1))
        return {"embedding": emb, "attention": att, "log_rate": log_rate, "theta": theta, "pi_logits": pi_logits,
                "features": features}

    def decode(self, embedding, section=None):
        """The ZINB decoder alone on a given ``embedding`` (n, emb_dim), e.g. one :meth:`forward` returned earlier;
        ``section`` as for :meth:`forward`. Returns (``log_rate`` (n, n_genes), ``theta`` (n_genes,), ``pi_logits``
        (n, n_genes)): what :meth:`forward` gives for that embedding."""
        return self.decoder(embedding, self._onehot(section, embedding.shape[0]))

    def _onehot(self, section, n: int):
        """(n, n_sections) one-hot of ``section``, or None for a network without sections."""
        if not self.n_sections:
            return None
        if section is None or section.shape != (n,):
            raise ValueError(f"this network reads each spot's section: give section as ({n},) integer codes")
        return F.one_hot(section.long(), self.n_sections).to(torch.float32)
