"""torch_geometric's graph convolutions (``GCNConv``, ``GATConv``), imported in one place.

torch_geometric calls ``torch.jit.script`` while it is imported, which recent torch answers with a
``FutureWarning`` that every stage script used to print. The warning is about torch_geometric's
code, not the user's run, so it is silenced for that import only (nothing else is filtered).
"""
import warnings

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.* is deprecated", category=FutureWarning)
    from torch_geometric.nn import GATConv, GCNConv

__all__ = ["GATConv", "GCNConv"]
