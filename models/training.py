"""Training routine for :class:`models.mstgcn.MSTGCN` (full-batch graphs, a fixed number of epochs)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from models.losses import spatial_regularization, zinb_nll
from models.mstgcn import MSTGCN
from models.reproducibility import deterministic_cpu


@dataclass
class TrainParams:
    epochs: int = 200
    lr: float = 1e-3
    weight_decay: float = 1e-4
    zinb_weight: float = 1.0
    spatial_weight: float = 1.0
    feature_weight: float = 0.0   # weight of the input-reconstruction (MSE) term
    negative_ratio: int = 1
    decoder_batch: int = 1024     # spots decoded per epoch for the ZINB loss (all spots if larger)
    seed: int = 0
    decay_gene_parameters: bool = True   # False: the decoder's per-gene vectors (ZINBDecoder.gene_parameters) get
                                         # no weight decay, which would pull them back to 0 (DEVLOG 390)


def train_mstgcn(model: MSTGCN, x: torch.Tensor, graphs: list, counts: torch.Tensor,
                 size_factors: torch.Tensor, spatial_edges: torch.Tensor, params: TrainParams,
                 progress: bool = True, section: torch.Tensor | None = None) -> list[dict]:
    """Train in place; return the per-epoch loss history.

    x: (n, in_dim) input features; counts: (n, g) raw counts of the decoded genes;
    size_factors: (n, 1) total_counts / 1e4; spatial_edges: (2, m) neighbour pairs for the
    regularisation; section: (n,) section codes for a network with ``n_sections`` (else None). Negative pairs are
    drawn uniformly each epoch. Deterministic on CPU for a seed.
    """
    from models.progress import progress_bar

    device = x.device
    gen = torch.Generator(device="cpu").manual_seed(params.seed)
    opt = torch.optim.Adam(_parameter_groups(model, params), lr=params.lr, weight_decay=params.weight_decay)
    x_var = x.var(0).mean().clamp_min(1e-8)
    history = []
    bar = progress_bar(range(params.epochs), desc="M-STGCN", disable=not progress, leave=False)
    with deterministic_cpu(device):
        _train_loop(model, x, graphs, counts, size_factors, spatial_edges, params, bar, gen, opt, x_var, history,
                    section)
    return history


def _parameter_groups(model: MSTGCN, params: TrainParams) -> list:
    """Adam's parameter groups: every parameter under ``params.weight_decay``, except, with
    ``params.decay_gene_parameters`` False, the decoder's per-gene vectors, which get none."""
    if params.decay_gene_parameters:
        return [{"params": list(model.parameters())}]
    free = {id(p) for p in model.decoder.gene_parameters()}
    return [{"params": [p for p in model.parameters() if id(p) not in free]},
            {"params": model.decoder.gene_parameters(), "weight_decay": 0.0}]


def _train_loop(model, x, graphs, counts, size_factors, spatial_edges, params, bar, gen, opt, x_var, history,
                section=None):
    device, n = x.device, x.shape[0]
    for _ in bar:
        model.train()
        rows = None
        if params.decoder_batch and params.decoder_batch < n:
            rows = torch.randperm(n, generator=gen)[:params.decoder_batch].to(device)
        out = model(x, graphs, decode_rows=rows, section=section)
        c = counts if rows is None else counts[rows]
        sf = size_factors if rows is None else size_factors[rows]
        mu = sf * torch.exp(out["log_rate"])
        l_zinb = zinb_nll(c, mu, out["theta"], out["pi_logits"])
        m = spatial_edges.shape[1] * max(1, params.negative_ratio)
        neg = torch.randint(0, n, (2, m), generator=gen).to(device)
        l_reg = spatial_regularization(out["embedding"], spatial_edges, neg)
        loss = params.zinb_weight * l_zinb + params.spatial_weight * l_reg
        if params.feature_weight:
            l_feat = torch.mean((out["features"] - x) ** 2) / x_var
            loss = loss + params.feature_weight * l_feat
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append({"loss": loss.item(), "zinb": l_zinb.item(), "spatial": l_reg.item()})
        bar.set_postfix(loss=f"{history[-1]['loss']:.3f}", refresh=False)   # redrawn at the bar's own pace (mininterval), not every epoch


@torch.inference_mode()
def infer(model: MSTGCN, x: torch.Tensor, graphs: list, section: torch.Tensor | None = None) -> dict:
    """Embedding, branch attention and log expected counts per 10k UMIs for every spot (eval mode); ``section``:
    as for :func:`train_mstgcn`."""
    model.eval()
    with deterministic_cpu(x.device):
        out = model(x, graphs, section=section)
    return {k: v.detach().cpu().numpy() for k, v in out.items()}


@torch.inference_mode()
def decode(model: MSTGCN, embedding: torch.Tensor, section: torch.Tensor | None = None) -> dict:
    """``log_rate`` and ``pi_logits`` (n, n_genes) and ``theta`` (n_genes,) of the trained network's decoder (eval
    mode) for an ``embedding`` (n, emb_dim) that :func:`infer` returned; ``section`` as there. The encoder is not
    run: the same values as :func:`infer`'s for that embedding, without the graphs."""
    model.eval()
    with deterministic_cpu(embedding.device):
        log_rate, theta, pi_logits = model.decode(embedding, section)
    return {k: v.detach().cpu().numpy() for k, v in
            {"log_rate": log_rate, "theta": theta, "pi_logits": pi_logits}.items()}
