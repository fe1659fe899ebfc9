"""Training routines for the stage-4 models (minibatch Adam, a fixed number of steps)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from models.diffst import DiffSTDenoiser, coexpression_graph, disentangle_loss
from models.diffusion import GaussianDiffusion
from models.reproducibility import deterministic_cpu
from models.trihrge import TriHRGE


@dataclass
class SuperresParams:
    steps: int = 1500          # optimiser steps (fixed; never chosen by a score)
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-4
    hidden: int = 256
    diffusion_steps: int = 200
    sampling_steps: int = 20
    n_samples: int = 4
    disentangle_weight: float = 0.1
    val_fraction: float = 0.1  # training pairs held out to choose the checkpoint (context data only)
    eval_every: int = 100
    image_ridge: bool = True   # linear correction of the low-res base from rich image features (LOO alpha)
    patch_cnn: dict | None = None  # the learned image candidate (pipeline.superres_patches; None = its defaults)
    seed: int = 0


def _batches(n, batch, steps, gen):
    for _ in range(steps):
        yield torch.randint(0, n, (min(batch, n),), generator=gen)


def validation_split(n: int, fraction: float, seed: int):
    """(train, validation) indices of the training pairs; validation is only used to pick the checkpoint."""
    rng = np.random.default_rng(seed + 12345)
    perm = rng.permutation(n)
    n_val = int(round(n * fraction)) if n >= 50 else 0
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def shared_weight(x: np.ndarray, y: np.ndarray) -> float:
    """The one weight lambda in [0, 1] minimising |y - lambda x|^2 over every entry of the (n, g)
    arrays: one number for all genes, fitted on many more numbers than one gene's."""
    den = (x ** 2).sum()
    return float(np.clip((x * y).sum() / den, 0.0, 1.0)) if den > 0 else 0.0


def fit_trihrge(image, lowres, context, target, params: SuperresParams, device="cpu", progress=False):
    """image (n, S, d), lowres/target (n, G) standardised, context (n, c) -> (model, loss history).

    ``params.val_fraction`` of the pairs (all from the context) are held out; the weights at the
    evaluation (every ``params.eval_every`` steps, and before training: the base alone) with the
    lowest validation MSE are kept, so the correction is only used where it helps on held-out pairs.
    """
    import copy

    from models.progress import progress_bar

    torch.manual_seed(params.seed)
    gen = torch.Generator().manual_seed(params.seed)
    model = TriHRGE(target.shape[1], image.shape[2], image.shape[1], context.shape[1], params.hidden).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=params.lr, weight_decay=params.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, params.steps)
    data = [torch.as_tensor(a, dtype=torch.float32, device=device) for a in (image, lowres, context, target)]
    tr, va = validation_split(len(target), params.val_fraction, params.seed)
    tr_t = torch.as_tensor(tr, device=device)
    val = [d[torch.as_tensor(va, device=device)] for d in data] if len(va) else None
    best, best_state, hist = np.inf, None, []
    if val is not None:   # step 0: the zero-initialised head leaves the base unchanged
        model.eval()
        with torch.no_grad():
            best = torch.mean((model(*val[:3]) - val[3]) ** 2).item()
        best_state = copy.deepcopy(model.state_dict())
    with deterministic_cpu(device):
        for step, idx in enumerate(progress_bar(_batches(len(tr), params.batch_size, params.steps, gen), total=params.steps,
                                        desc="TriHRGE", disable=not progress)):
            im, lo, cx, y = (d[tr_t[idx.to(device)]] for d in data)
            model.train()
            loss = torch.mean((model(im, lo, cx) - y) ** 2)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            hist.append(loss.item())
            if val is not None and ((step + 1) % params.eval_every == 0 or step + 1 == params.steps):
                model.eval()
                with torch.no_grad():
                    v = torch.mean((model(*val[:3]) - val[3]) ** 2).item()
                if v < best:
                    best, best_state = v, copy.deepcopy(model.state_dict())
    if best_state is not None:
        model.load_state_dict(best_state)
    return model, hist


@torch.inference_mode()
def predict_trihrge(model, image, lowres, context, device="cpu", batch: int = 4096) -> np.ndarray:
    model.eval()
    out = []
    for s in range(0, len(lowres), batch):
        args = [torch.as_tensor(a[s:s + batch], dtype=torch.float32, device=device) for a in (image, lowres, context)]
        out.append(model(*args).cpu().numpy())
    return np.concatenate(out)


def fit_diffusion(cell, tissue, lowres, target, params: SuperresParams, device="cpu", progress=False):
    """Diff-ST: learn the residual target - lowres (standardised units) conditioned on the low-res
    expression, the cell-level feature (n, d) and tissue-level tokens (n, T, d).

    ``params.val_fraction`` of the pairs (context data only) are held out of training; after training,
    the averaged sampled residual on them calibrates a shrinkage ``model.shrink`` in [0, 1], one
    weight shared by all genes (least squares of the true residual on the sampled one over every
    held-out pair and gene: per-gene weights from so few pairs were noise, DEVLOG 48), so a sampled
    residual that does not help on held-out pairs falls back to the low-res base.
    """
    from models.progress import progress_bar

    torch.manual_seed(params.seed)
    gen = torch.Generator().manual_seed(params.seed)
    tr, va = validation_split(len(target), params.val_fraction, params.seed)
    adj = coexpression_graph(torch.as_tensor(target[tr], dtype=torch.float32))
    net = DiffSTDenoiser(target.shape[1], cell.shape[1], adj)
    model = GaussianDiffusion(net, params.diffusion_steps).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=params.lr, weight_decay=params.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, params.steps)
    data = [torch.as_tensor(a[tr], dtype=torch.float32, device=device) for a in (cell, tissue, lowres, target)]
    hist = []
    dgen = torch.Generator(device=device).manual_seed(params.seed)
    with deterministic_cpu(device):
        for idx in progress_bar(_batches(len(tr), params.batch_size, params.steps, gen), total=params.steps,
                        desc="Diff-ST", disable=not progress):
            idx = idx.to(device)
            c, t, lo, y = (d[idx] for d in data)
            model.train()
            loss = model.loss(y - lo, generator=dgen, lowres=lo, cell=c, tissue=t)
            loss = loss + params.disentangle_weight * disentangle_loss(net.last_parts)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            hist.append(loss.item())
    model.register_buffer("shrink", torch.ones(target.shape[1], device=device))
    if len(va):
        res = predict_diffusion(model, cell[va], tissue[va], lowres[va], params, device) - lowres[va]
        true = target[va] - lowres[va]
        model.shrink = torch.full((target.shape[1],), shared_weight(res, true), dtype=torch.float32, device=device)
    return model, hist


def residual_weight(model) -> float | None:
    """The calibrated weight of the sampled residual (``model.shrink``, one value shared by all
    genes; see :func:`fit_diffusion`), None before calibration. At 0 the prediction is the low-res
    base exactly, so :func:`predict_diffusion` does not sample."""
    shrink = getattr(model, "shrink", None)
    return None if shrink is None or not len(shrink) else float(shrink.float().mean())


def predict_diffusion(model, cell, tissue, lowres, params: SuperresParams, device="cpu", batch: int | None = None,
                      progress: bool = False):
    """Low-res base + the mean of ``params.n_samples`` DDIM samples of the residual (times the
    shrinkage; with a shrinkage of 0 the base itself, without sampling). Default batch: 256
    locations on CPU (the (genes, batch, dim) gene tokens then stay in cache: twice as fast per
    location as 2048 on 2 cores), 4096 on CUDA."""
    batch = batch or (256 if str(device) == "cpu" else 4096)
    shrink = getattr(model, "shrink", None)
    if shrink is not None and not bool(shrink.any()):   # the residual counts for nothing: the base, unsampled
        return np.asarray(lowres, dtype=np.float32).copy()
    from models.progress import progress_bar

    model.eval()
    gen = torch.Generator(device=device).manual_seed(params.seed + 1)
    out = []
    with deterministic_cpu(device):
        for s in progress_bar(range(0, len(lowres), batch), desc="Diff-ST sampling", unit="batch",
                      disable=not progress or len(lowres) <= batch, leave=False):
            c, t, lo = (torch.as_tensor(a[s:s + batch], dtype=torch.float32, device=device) for a in (cell, tissue, lowres))
            res = model.sample(lo.shape, params.n_samples, params.sampling_steps, gen, lowres=lo, cell=c, tissue=t)
            if shrink is not None:
                res = res * shrink.to(res.device)
            out.append((lo + res).cpu().numpy())
    return np.concatenate(out)
