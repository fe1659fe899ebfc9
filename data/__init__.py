"""Data layer: AnnData keys, readers for Visium / legacy ST / .h5ad, and the synthetic demo slice."""
