"""Training routine for :class:`models.patch_cnn.PatchCNN`: minibatches of augmented patches, fixed epochs.

Augmentation (histology has no preferred orientation, and stains vary): each batch is turned by one
of the 8 rotations/reflections, and every patch's channels get a random gain (1 + 0.1 N(0,1)) and
offset (0.1 N(0,1)) in standardised units. Loss: mean squared error of the standardised expression,
plus ``align_weight`` x mean squared error between the network's image embedding and the spot's
expression embedding (HESpotEx's alignment term) when one is given.
Prediction averages the 8 rotations/reflections (or the 4 rotations, or none: ``transforms``).
No checkpoint is picked by a score; the number of epochs is fixed by the caller's config.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from models.patch_cnn import PatchCNN, dihedral
from models.reproducibility import deterministic_cpu, seed_everything


@dataclass
class PatchCNNParams:
    width: int = 16
    dim: int = 32
    dropout: float = 0.3
    epochs: int = 40
    batch: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-3
    align_weight: float = 1.0
    seed: int = 0


def train_patch_cnn(patches: torch.Tensor, targets: torch.Tensor, params: PatchCNNParams, device: str = "cpu",
                    progress: bool = False, embedding: torch.Tensor | None = None) -> tuple[PatchCNN, dict]:
    """Fit a :class:`PatchCNN` to ``targets`` (n, g) standardised expression from ``patches``
    (n, 3, S, S) standardised pixels, its image embedding to ``embedding`` (n, dim) when given;
    return (model in eval mode, {'loss': per-epoch mean})."""
    from models.progress import progress_bar

    if len(patches) != len(targets) or (embedding is not None and embedding.shape != (len(patches), params.dim)):
        raise ValueError(f"{len(patches)} patches, {len(targets)} expression rows, embedding "
                         f"{None if embedding is None else tuple(embedding.shape)} (dim {params.dim})")
    seed_everything(params.seed)
    gen = torch.Generator().manual_seed(params.seed)
    model = PatchCNN(targets.shape[1], params.width, params.dim, params.dropout).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=params.lr, weight_decay=params.weight_decay)
    history = {"loss": []}
    n = len(patches)
    with deterministic_cpu(device):
        for _ in progress_bar(range(params.epochs), desc="patch CNN", disable=not progress, leave=False):
            model.train()
            order = torch.randperm(n, generator=gen)
            total = 0.0
            for start in range(0, n, params.batch):
                idx = order[start:start + params.batch]
                if len(idx) < 2:      # batch norm needs two samples
                    continue
                k = int(torch.randint(8, (1,), generator=gen))
                gain = 1 + 0.1 * torch.randn(len(idx), 3, 1, 1, generator=gen)
                offset = 0.1 * torch.randn(len(idx), 3, 1, 1, generator=gen)
                x = (dihedral(patches[idx], k) * gain + offset).to(device)
                opt.zero_grad()
                pred, z = model(x)
                loss = F.mse_loss(pred, targets[idx].to(device))
                if embedding is not None and params.align_weight:
                    loss = loss + params.align_weight * F.mse_loss(z, embedding[idx].to(device))
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(idx)
            history["loss"].append(total / n)
    model.eval()
    return model, history


PREDICT_BATCH = {"cpu": 32, "cuda": 1024}   # patches per forward pass at inference, by device type


TEST_TRANSFORMS = (8, 4, 1)   # rotations/reflections averaged at prediction: all 8, the 4 rotations, or none


def predict_patch_cnn(model: PatchCNN, patches: torch.Tensor, batch: int | None = None,
                      transforms: int = 8) -> np.ndarray:
    """(n, g) standardised expression, the mean over ``transforms`` rotations/reflections of each
    patch: 8 = every rotation and its mirror image, 4 = the four rotations, 1 = the patch as it is
    (:func:`models.patch_cnn.dihedral` 0..transforms-1). The cost grows linearly with ``transforms``.

    Runs in the channels-last memory layout (~1.7x faster convolutions on CPU; the same values up to
    float rounding, ~1e-7); the model is left in that layout, which changes nothing else about it.
    ``batch`` (default :data:`PREDICT_BATCH` for the model's device): in eval mode every patch is
    computed on its own, so the batch changes speed only. On CPU small batches keep the feature
    maps in cache: 32 patches ran 2.5x faster than 256 on 2 cores, with the same values."""
    if transforms not in TEST_TRANSFORMS:
        raise ValueError(f"transforms={transforms}: choose one of {TEST_TRANSFORMS}")
    device = next(model.parameters()).device
    batch = int(batch or PREDICT_BATCH.get(device.type, 256))
    model.eval()
    model.to(memory_format=torch.channels_last)
    out = []
    with torch.inference_mode():
        for start in range(0, len(patches), batch):
            x = patches[start:start + batch].to(device).contiguous(memory_format=torch.channels_last)
            out.append(torch.stack([model(dihedral(x, k))[0] for k in range(transforms)]).mean(0).float().cpu())
    n_genes = model.gene_head.out_features
    return torch.cat(out).numpy() if out else np.zeros((0, n_genes), np.float32)
