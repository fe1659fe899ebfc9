"""Stages 1-3 (image features, enhancement, M-STGCN domains) on a DLPFC Visium slice.

    python run_dlpfc.py --out runs/151673                      # configs/dlpfc.yaml (slice 151673)
    python run_dlpfc.py --set data.path=../shared/data/dlpfc/151674 \\
        --set data.truth=../shared/data/dlpfc/151674/151674_truth.txt --out runs/151674
    python run_dlpfc.py --demo --out runs/demo                 # synthetic slice, < 1 minute on CPU
"""
from pipeline.cli import run_main
from pipeline.runner import main

if __name__ == "__main__":
    run_main(lambda: main("configs/dlpfc.yaml", __doc__))
