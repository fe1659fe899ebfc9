"""Stage 1: per-spot histology features (patch extraction + an encoder registry)."""
