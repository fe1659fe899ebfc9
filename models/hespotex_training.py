"""Training routine for HESpotEx (:mod:`models.hespotex`): full-batch over whole sections, fixed epochs.

1. The expression stream (:class:`GraphAttentionAutoencoder`) is trained on the training sections
   to reconstruct their log-normalised expression; its embeddings, standardised, become the targets
   of the image stream.
2. The image stream and GCN decoder (:class:`ImageToExpression`) are trained on the same sections
   with ``align_weight * MSE(image embedding, expression embedding)`` +
   ``mse_weight * MSE(expression)`` + ``pcc_weight * (1 - mean per-gene Pearson r within the
   section)``.

No test section ever enters here; the number of epochs is fixed by the config (no checkpoint is
picked by a score).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from models.hespotex import GraphAttentionAutoencoder, ImageToExpression, pearson_loss
from models.reproducibility import deterministic_cpu, seed_everything


@dataclass
class HESpotExParams:
    dim: int = 32
    hidden: int = 256
    n_gcn: int = 3
    dropout: float = 0.2
    ae_epochs: int = 200
    epochs: int = 300
    lr: float = 1e-3
    weight_decay: float = 1e-4
    align_weight: float = 1.0
    mse_weight: float = 1.0
    pcc_weight: float = 1.0
    seed: int = 0


@dataclass
class GraphSample:
    """One section as tensors: image features (n, f) standardised, spatial ``edge_index`` (2, m),
    ``density`` (n,) nuclei relative to the section mean, ``expr`` (n, g) log1p(CP10k) or None."""
    features: torch.Tensor
    edge_index: torch.Tensor
    density: torch.Tensor
    expr: torch.Tensor | None = None

    def to(self, device):
        return GraphSample(self.features.to(device), self.edge_index.to(device), self.density.to(device),
                           None if self.expr is None else self.expr.to(device))


def train_expression_stream(samples: list[GraphSample], params: HESpotExParams, progress: bool = False):
    """Train the graph-attention autoencoder; return (model, standardised embeddings per sample, losses)."""
    from models.progress import progress_bar

    g = samples[0].expr.shape[1]
    mean = torch.cat([s.expr for s in samples]).mean(0)
    std = torch.cat([s.expr for s in samples]).std(0).clamp_min(1e-3)
    ae = GraphAttentionAutoencoder(g, params.dim, dropout=0.1).to(samples[0].expr.device)
    opt = torch.optim.Adam(ae.parameters(), lr=params.lr, weight_decay=params.weight_decay)
    losses = []
    for _ in progress_bar(range(params.ae_epochs), desc="HESpotEx expression stream", disable=not progress, leave=False):
        ae.train()
        opt.zero_grad()
        loss = sum(F.mse_loss(ae((s.expr - mean) / std, s.edge_index)[1], (s.expr - mean) / std) for s in samples)
        loss = loss / len(samples)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    ae.eval()
    with torch.no_grad():
        zs = [ae.encode((s.expr - mean) / std, s.edge_index) for s in samples]
    zc = torch.cat(zs)
    zm, zsd = zc.mean(0), zc.std(0).clamp_min(1e-6)
    return ae, [(z - zm) / zsd for z in zs], losses


def train_hespotex(samples: list[GraphSample], params: HESpotExParams, device: str = "cpu",
                   progress: bool = False) -> tuple[ImageToExpression, dict]:
    """Train both streams on ``samples`` (training sections, with ``expr``); return (model, history).
    ``history['expression_embedding']``: the standardised expression embedding of each sample."""
    from models.progress import progress_bar

    if not samples or any(s.expr is None for s in samples):
        raise ValueError("every training sample needs its expression")
    seed_everything(params.seed)
    samples = [s.to(device) for s in samples]
    with deterministic_cpu(device):
        _, z_expr, ae_losses = train_expression_stream(samples, params, progress)
        gene_mean = torch.cat([s.expr for s in samples]).mean(0)
        model = ImageToExpression(samples[0].features.shape[1], samples[0].expr.shape[1], params.dim,
                                  params.hidden, params.n_gcn, params.dropout, gene_mean).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=params.lr, weight_decay=params.weight_decay)
        history = {"ae_loss": ae_losses, "loss": [], "align": [], "mse": [], "pcc": [],
                   "expression_embedding": [z.detach().cpu() for z in z_expr]}
        for _ in progress_bar(range(params.epochs), desc="HESpotEx image stream", disable=not progress, leave=False):
            model.train()
            opt.zero_grad()
            parts = {"align": 0.0, "mse": 0.0, "pcc": 0.0}
            for s, z in zip(samples, z_expr):
                pred, z_img = model(s.features, s.edge_index, s.density)
                parts["align"] = parts["align"] + F.mse_loss(z_img, z) / len(samples)
                parts["mse"] = parts["mse"] + F.mse_loss(pred, s.expr) / len(samples)
                parts["pcc"] = parts["pcc"] + pearson_loss(pred, s.expr, dim=0) / len(samples)
            loss = (params.align_weight * parts["align"] + params.mse_weight * parts["mse"]
                    + params.pcc_weight * parts["pcc"])
            loss.backward()
            opt.step()
            history["loss"].append(float(loss.detach()))
            for k, v in parts.items():
                history[k].append(float(v.detach()))
    model.eval()
    return model, history


def predict_hespotex(model: ImageToExpression, sample: GraphSample) -> np.ndarray:
    """Predicted log1p(CP10k) (n, g) for one section (or grid) of image features."""
    device = next(model.parameters()).device
    s = sample.to(device)
    model.eval()
    with torch.inference_mode():
        pred, _ = model(s.features, s.edge_index, s.density)
    return pred.float().cpu().numpy()
