"""Losses: zero-inflated negative binomial NLL and M-STGCN's spatial regularisation."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def zinb_nll(x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor, pi_logits: torch.Tensor,
             eps: float = 1e-8) -> torch.Tensor:
    """Mean negative log-likelihood of counts ``x`` under ZINB(mu, theta, pi).

    x, mu, pi_logits: (n, g); theta: (g,) or (n, g) inverse dispersion; pi = sigmoid(pi_logits) is
    the probability of an extra (structural) zero. NB(x; mu, theta) =
    Gamma(x+theta)/(Gamma(theta) x!) (theta/(theta+mu))^theta (mu/(theta+mu))^x.
    """
    theta = theta.expand_as(mu)
    log_theta_mu = torch.log(theta + mu + eps)
    log_nb = (torch.lgamma(x + theta) - torch.lgamma(theta) - torch.lgamma(x + 1)
              + theta * (torch.log(theta + eps) - log_theta_mu) + x * (torch.log(mu + eps) - log_theta_mu))
    # log(1 - pi) and log(pi) from logits, stably
    log_1m_pi = -F.softplus(pi_logits)
    log_pi = pi_logits - F.softplus(pi_logits)
    nb_zero = theta * (torch.log(theta + eps) - log_theta_mu)          # log NB(0)
    log_zero = torch.logaddexp(log_pi, log_1m_pi + nb_zero)
    log_pos = log_1m_pi + log_nb
    ll = torch.where(x < 0.5, log_zero, log_pos)
    return -ll.mean()


def spatial_regularization(z: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """Pull spatial neighbours together and push random pairs apart in cosine similarity.

    z: (n, d) embedding; pos, neg: (2, m) index pairs. Loss = -mean log sigmoid(cos(z_i, z_j)) over
    neighbour pairs - mean log(1 - sigmoid(cos)) over negative pairs, halved (M-STGCN's
    regularisation, on sparse pairs instead of a dense n x n matrix).
    """
    zn = F.normalize(z, dim=1)
    cos_pos = (zn[pos[0]] * zn[pos[1]]).sum(1)
    cos_neg = (zn[neg[0]] * zn[neg[1]]).sum(1)
    return 0.5 * (F.softplus(-cos_pos).mean() + F.softplus(cos_neg).mean())
