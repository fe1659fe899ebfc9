"""One Gaussian diffusion wrapper around any denoiser network (denoising-diffusion-pytorch style).

The noise schedule lives in buffers; ``loss`` is the usual noise-prediction objective; samplers are
methods (``ddim_sample``: deterministic DDIM with few steps). The denoiser is called as
``denoiser(x_t, t, **cond) -> predicted noise`` with x_t of shape (B, D) and integer t of shape (B,).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn


def beta_schedule(kind: str, steps: int) -> torch.Tensor:
    if kind == "linear":
        scale = 1000 / steps
        return torch.linspace(scale * 1e-4, scale * 0.02, steps, dtype=torch.float64)
    if kind == "cosine":
        s = 0.008
        t = torch.linspace(0, steps, steps + 1, dtype=torch.float64) / steps
        ab = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
        ab = ab / ab[0]
        return (1 - ab[1:] / ab[:-1]).clamp(max=0.999)
    raise ValueError(f"unknown noise schedule {kind!r}")


class GaussianDiffusion(nn.Module):
    def __init__(self, denoiser: nn.Module, steps: int = 200, schedule: str = "cosine"):
        super().__init__()
        self.denoiser = denoiser
        self.steps = int(steps)
        betas = beta_schedule(schedule, self.steps)
        alphas_cumprod = torch.cumprod(1 - betas, dim=0)
        self.register_buffer("betas", betas.float())
        self.register_buffer("alphas_cumprod", alphas_cumprod.float())
        self.register_buffer("sqrt_ab", alphas_cumprod.sqrt().float())
        self.register_buffer("sqrt_1m_ab", (1 - alphas_cumprod).sqrt().float())

    def q_sample(self, x0, t, noise=None):
        """Forward noising in closed form: sqrt(ab_t) x0 + sqrt(1 - ab_t) eps."""
        noise = torch.randn_like(x0) if noise is None else noise
        return self.sqrt_ab[t].unsqueeze(-1) * x0 + self.sqrt_1m_ab[t].unsqueeze(-1) * noise

    def loss(self, x0, generator=None, **cond):
        """Noise-prediction MSE at uniformly drawn steps."""
        t = torch.randint(0, self.steps, (x0.shape[0],), device=x0.device, generator=generator)
        noise = torch.randn(x0.shape, device=x0.device, generator=generator)
        return torch.mean((self.denoiser(self.q_sample(x0, t, noise), t, **cond) - noise) ** 2)

    @torch.inference_mode()
    def ddim_sample(self, shape, n_steps: int = 20, generator=None, clip: float | None = 6.0, **cond):
        """Deterministic DDIM (eta = 0) from pure noise in ``n_steps`` steps; returns x0 (shape)."""
        device = self.betas.device
        x = torch.randn(shape, device=device, generator=generator)
        times = torch.linspace(self.steps - 1, 0, n_steps, device=device).round().long()
        for i, t in enumerate(times):
            tt = torch.full((shape[0],), int(t), device=device, dtype=torch.long)
            eps = self.denoiser(x, tt, **cond)
            ab = self.alphas_cumprod[t]
            x0 = (x - (1 - ab).sqrt() * eps) / ab.sqrt()
            if clip:
                x0 = x0.clamp(-clip, clip)
            ab_prev = self.alphas_cumprod[times[i + 1]] if i + 1 < len(times) else torch.tensor(1.0, device=device)
            eps = (x - ab.sqrt() * x0) / (1 - ab).sqrt()
            x = ab_prev.sqrt() * x0 + (1 - ab_prev).sqrt() * eps
        return x

    @torch.inference_mode()
    def sample(self, shape, n_samples: int = 1, n_steps: int = 20, generator=None, **cond):
        """Mean of ``n_samples`` DDIM samples."""
        return torch.stack([self.ddim_sample(shape, n_steps, generator, **cond) for _ in range(n_samples)]).mean(0)
