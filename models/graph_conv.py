"""torch_geometric's graph convolutions (``GCNConv``, ``GATConv``), imported in one place, and
:class:`SymmetricGCNConv`, a ``GCNConv`` whose backward pass reuses a symmetric adjacency.

torch_geometric calls ``torch.jit.script`` while it is imported, which recent torch answers with a
``FutureWarning`` that every stage script used to print. The warning is about torch_geometric's
code, not the user's run, so it is silenced for that import only (nothing else is filtered).
"""
import warnings

import torch

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.* is deprecated", category=FutureWarning)
    from torch_geometric.nn import GATConv, GCNConv

__all__ = ["GATConv", "GCNConv", "SymmetricGCNConv", "is_symmetric"]


def is_symmetric(adj: torch.Tensor) -> bool:
    """Whether a 2-D torch sparse tensor (any layout) equals its transpose exactly: the same stored entries, and
    values equal to the bit."""
    if adj.dim() != 2 or adj.shape[0] != adj.shape[1]:
        return False
    a = adj.to_sparse_coo().coalesce()
    t = a.t().coalesce()
    return torch.equal(a.indices(), t.indices()) and torch.equal(a.values(), t.values())


class _SymmetricSparseProduct(torch.autograd.Function):
    """``adj @ x`` for a sparse ``adj`` (n, n) that equals its transpose and needs no gradient. The gradient for
    x is adj^T @ g = adj @ g: the same product, so no transposed copy of ``adj`` is built in the backward pass."""

    @staticmethod
    def forward(ctx, adj, x):
        ctx.adj = adj
        return torch.sparse.mm(adj, x)

    @staticmethod
    def backward(ctx, grad):
        return None, torch.sparse.mm(ctx.adj, grad) if ctx.needs_input_grad[1] else None


class SymmetricGCNConv(GCNConv):
    """``GCNConv`` for a torch sparse CSR adjacency whose GCN-normalised matrix is symmetric (an undirected graph).

    torch's backward pass of a sparse product transposes the matrix and converts the transpose to CSR on every
    call: with a cached adjacency that was a fifth of M-STGCN's training time on CPU. Here the backward pass
    multiplies by the normalised matrix itself, which for a symmetric matrix is the same arithmetic (the same
    entries, summed in the same order). Symmetry is checked to the bit once per normalised matrix (it is cached
    with ``cached=True``); an edge index, a non-symmetric matrix or one that needs a gradient goes through
    ``GCNConv``'s own product. Same arguments and output as ``GCNConv``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._checked = None          # (the normalised matrix last checked, whether it is symmetric)

    def message_and_aggregate(self, adj_t, x):
        if (self.aggr not in ("add", "sum") or not isinstance(adj_t, torch.Tensor) or adj_t.layout != torch.sparse_csr
                or adj_t.requires_grad):
            return super().message_and_aggregate(adj_t, x)
        if self._checked is None or self._checked[0] is not adj_t:
            self._checked = (adj_t, is_symmetric(adj_t))
        if not self._checked[1]:
            return super().message_and_aggregate(adj_t, x)
        return _SymmetricSparseProduct.apply(adj_t, x)
