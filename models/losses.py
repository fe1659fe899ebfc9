"""Losses: zero-inflated negative binomial NLL and M-STGCN's spatial regularisation."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def zinb_nll(x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor, pi_logits: torch.Tensor,
             eps: float = 1e-8) -> torch.Tensor:
    """Mean negative log-likelihood of counts ``x`` under ZINB(mu, theta, pi).

    x, mu, pi_logits: (n, g); theta: (g,) or (n, g) inverse dispersion; pi = sigmoid(pi_logits) is
    the probability of an extra (structural) zero. With NB(x; mu, theta) =
    Gamma(x+theta) / (Gamma(theta) x!) (theta/(theta+mu))^theta (mu/(theta+mu))^x:
    P(0) = pi + (1-pi) NB(0) and P(x>0) = (1-pi) NB(x). The Gamma-function terms vanish at x = 0, so
    they are evaluated on the non-zero entries only (counts are sparse: ~10x less work).
    """
    theta = theta.expand_as(mu)
    log_theta_mu = torch.log(theta + mu + eps)
    nb_zero = theta * (torch.log(theta + eps) - log_theta_mu)            # log NB(0)
    log_1m_pi = -F.softplus(pi_logits)
    zero = x < 0.5
    ll_zero = torch.logaddexp(pi_logits + log_1m_pi, log_1m_pi + nb_zero)  # log(pi) = logits + log(1-pi)
    ll_pos = log_1m_pi + nb_zero + x * (torch.log(mu + eps) - log_theta_mu)
    ll = torch.where(zero, ll_zero, ll_pos).sum()
    nz = ~zero
    xn, tn = x[nz], theta[nz]
    ll = ll + (torch.lgamma(xn + tn) - torch.lgamma(tn) - torch.lgamma(xn + 1)).sum()
    return -ll / x.numel()


def zinb_gene_loglik(x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor, pi_logits: torch.Tensor) -> torch.Tensor:
    """Log-likelihood of counts ``x`` under ZINB(mu, theta, pi) summed over spots, per gene: (g,) float64.

    x, mu, pi_logits: (n, g); theta: (g,). The same model as :func:`zinb_nll`, without the log x! term (it
    does not depend on the parameters), for comparing one gene's dispersions with mu and pi held fixed
    (:func:`pipeline.domains.refit_dispersion`); entries in the inputs' precision, sums in float64.
    :class:`ZINBGeneLikelihood` with the same inputs, for one theta.
    """
    return ZINBGeneLikelihood(x, mu, pi_logits)(theta)


class ZINBGeneLikelihood:
    """:func:`zinb_gene_loglik` of counts ``x`` (n, g) with ``mu`` and ``pi_logits`` (n, g) held fixed, as a
    function of theta (g,): what does not depend on theta (log mu, log(1 - pi), log pi, which entries are zero
    and their genes) is computed once here, not at every theta a dispersion search tries (DEVLOG 451); a call
    gives what computing everything afresh gives, to the bit. Holds ~5 arrays of x's size (float32 for float32
    inputs)."""

    def __init__(self, x: torch.Tensor, mu: torch.Tensor, pi_logits: torch.Tensor):
        self.mu, self.x = mu, x
        self.log_mu = torch.log(mu)
        self.log_1m_pi = -F.softplus(pi_logits)
        self.log_pi = pi_logits + self.log_1m_pi           # log(pi) = logits + log(1 - pi)
        self.zero = x < 0.5
        nonzero = ~self.zero
        _, self.gene = nonzero.nonzero(as_tuple=True)     # the Gamma terms vanish at x = 0: non-zero entries only
        self.x_nonzero = x[nonzero]

    def __call__(self, theta: torch.Tensor) -> torch.Tensor:
        """(g,) float64: the log-likelihood of each gene at inverse dispersion ``theta`` (g,)."""
        theta_g = theta.to(self.mu.dtype)
        theta = theta_g.expand_as(self.mu)
        log_theta_mu = torch.log(theta + self.mu)
        nb_zero = theta * (torch.log(theta) - log_theta_mu)                     # log NB(0)
        nb_zero_1m_pi = self.log_1m_pi + nb_zero                               # log((1 - pi) NB(0))
        ll = torch.where(self.zero, torch.logaddexp(self.log_pi, nb_zero_1m_pi),
                         nb_zero_1m_pi + self.x * (self.log_mu - log_theta_mu)).sum(0, dtype=torch.float64)
        tn = theta_g[self.gene]
        return ll.index_add_(0, self.gene, (torch.lgamma(self.x_nonzero + tn) - torch.lgamma(tn)).to(torch.float64))


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
