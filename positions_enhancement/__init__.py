"""Stage 2: position-aware enhancement of gene and image features by a spatial weight matrix."""
