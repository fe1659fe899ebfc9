"""Shared pipeline helpers: config (config.py), stage files and reruns (stages.py), graphs
(graphs.py), preprocessing (preprocess.py), clustering (clustering.py), metrics (metrics.py),
figures (plotting.py) and the command line (cli.py); every stage on an AnnData in memory, for
notebooks (api.py)."""
