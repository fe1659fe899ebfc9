"""Stages 1-3 on a HER2+ breast cancer section (legacy Spatial Transcriptomics, her2st).

    python run_breast_cancer.py --out runs/A1                  # configs/breast_cancer.yaml (A1)
    python run_breast_cancer.py --set data.counts=../shared/data/her2st/counts/B1.tsv.gz \\
        --set data.spots=../shared/data/her2st/spots/B1_selection.tsv \\
        --set data.truth=../shared/data/her2st/labels/B1_labeled_coordinates.tsv --out runs/B1
    python run_breast_cancer.py --demo --out runs/demo
"""
from pipeline.cli import run_main
from pipeline.runner import main

if __name__ == "__main__":
    run_main(lambda: main("configs/breast_cancer.yaml", __doc__))
