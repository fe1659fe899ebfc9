"""A synthetic Visium slice, generated in seconds, written as a Space Ranger folder.

Hexagonal Visium grid; ``n_domains`` curved layered bands; counts drawn from a negative binomial
whose mean follows per-domain gene programs plus a smooth gradient; a full-resolution H&E-like
image whose nucleus density, size and stain hue follow the domains. The folder holds
``filtered_feature_bc_matrix/`` (MEX), ``spatial/tissue_positions_list.csv``,
``spatial/scalefactors_json.json``, ``spatial/tissue_hires_image.png`` and
``spatial/tissue_lowres_image.png``, plus ``truth.txt`` (barcode, domain).

Also two writers of the other Space Ranger layouts, for tests and benchmarks that rewrite a folder:
:func:`write_10x_h5` (``filtered_feature_bc_matrix.h5``) and :func:`write_headered_positions`
(``spatial/tissue_positions.csv``, Space Ranger >= 2.0).
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.io
import scipy.sparse as sp

SPOT_SPACING_FULLRES = 60.0  # px between neighbouring spot centres (100 um)
HIRES_SCALEF = 0.5
LOWRES_SCALEF = 0.15


def synthetic_domains(x: np.ndarray, y: np.ndarray, width: float, height: float, n_domains: int) -> np.ndarray:
    """Curved bands across the slice: domain index per point (x, y in full-res px)."""
    wave = 0.08 * height * np.sin(2 * np.pi * x / width * 1.3)
    t = (y + wave + 0.15 * x) / (height + 0.15 * width)
    return np.clip((t * n_domains).astype(int), 0, n_domains - 1)


def make_synthetic_visium(folder, n_rows: int = 40, n_cols: int = 40, n_genes: int = 600,
                          n_domains: int = 5, seed: int = 0) -> Path:
    """Write a synthetic Space Ranger folder to ``folder`` and return its path."""
    import cv2

    rng = np.random.default_rng(seed)
    folder = Path(folder)
    (folder / "filtered_feature_bc_matrix").mkdir(parents=True, exist_ok=True)
    (folder / "spatial").mkdir(parents=True, exist_ok=True)

    rows, cols = np.meshgrid(np.arange(n_rows), np.arange(n_cols), indexing="ij")
    array_row = rows.ravel()
    array_col = (2 * cols + (rows % 2)).ravel()          # Visium: columns step 2, odd rows shifted
    margin = 2 * SPOT_SPACING_FULLRES
    px_col = margin + array_col * SPOT_SPACING_FULLRES / 2
    px_row = margin + array_row * SPOT_SPACING_FULLRES * np.sqrt(3) / 2
    width = int(px_col.max() + margin)
    height = int(px_row.max() + margin)
    domain = synthetic_domains(px_col, px_row, width, height, n_domains)
    n = len(domain)

    # expression: shared base + per-domain programs (markers up and down) + a smooth gradient
    base = rng.gamma(0.6, 1.0, n_genes) + 0.05
    programs = np.ones((n_domains, n_genes))
    per = max(8, n_genes // (3 * n_domains))
    for d in range(n_domains):
        up = rng.choice(n_genes, per, replace=False)
        programs[d, up] *= rng.uniform(1.8, 3.5, per)
        down = rng.choice(n_genes, per // 2, replace=False)
        programs[d, down] *= rng.uniform(0.3, 0.6, per // 2)
    gradient_genes = rng.choice(n_genes, n_genes // 10, replace=False)
    grad = np.ones((n, n_genes))
    grad[:, gradient_genes] *= np.exp(0.8 * (px_col / width - 0.5))[:, None]
    rate = base[None, :] * programs[domain] * grad
    rate /= rate.sum(1, keepdims=True)
    library = rng.lognormal(np.log(1500), 0.35, n)
    mu = rate * library[:, None]
    theta = 3.0
    counts = rng.poisson(rng.gamma(theta, mu / theta)).astype(np.int32)

    barcodes = np.array([f"SYN{i:05d}-1" for i in range(n)])
    genes = np.array([f"Gene{g:04d}" for g in range(n_genes)])
    mex = folder / "filtered_feature_bc_matrix"
    with gzip.open(mex / "matrix.mtx.gz", "wb") as fh:
        scipy.io.mmwrite(fh, sp.csr_matrix(counts.T), field="integer")
    with gzip.open(mex / "barcodes.tsv.gz", "wt") as fh:
        fh.write("\n".join(barcodes) + "\n")
    with gzip.open(mex / "features.tsv.gz", "wt") as fh:
        fh.write("\n".join(f"ENSSYN{g:07d}\t{name}\tGene Expression" for g, name in enumerate(genes)) + "\n")
    pd.DataFrame({"barcode": barcodes, "in_tissue": 1, "array_row": array_row, "array_col": array_col,
                  "pxl_row": np.round(px_row).astype(int), "pxl_col": np.round(px_col).astype(int)}
                 ).to_csv(folder / "spatial" / "tissue_positions_list.csv", header=False, index=False)
    (folder / "spatial" / "scalefactors_json.json").write_text(json.dumps({
        "spot_diameter_fullres": SPOT_SPACING_FULLRES * 0.55, "fiducial_diameter_fullres": SPOT_SPACING_FULLRES * 0.8,
        "tissue_hires_scalef": HIRES_SCALEF, "tissue_lowres_scalef": LOWRES_SCALEF}))
    pd.DataFrame({"barcode": barcodes, "label": [f"D{d + 1}" for d in domain]}).to_csv(
        folder / "truth.txt", sep="\t", header=False, index=False)

    # H&E-like image at hires scale: eosin background, haematoxylin nuclei whose density/size/hue follow domains
    h, w = int(height * HIRES_SCALEF), int(width * HIRES_SCALEF)
    img = np.full((h, w, 3), 245, np.uint8)
    yy, xx = np.mgrid[:h, :w] / HIRES_SCALEF
    dom_img = synthetic_domains(xx, yy, width, height, n_domains)
    tissue = (xx > margin * 0.5) & (xx < width - margin * 0.5) & (yy > margin * 0.5) & (yy < height - margin * 0.5)
    eosin = np.array([[236, 170, 200], [228, 160, 190], [242, 185, 210], [225, 150, 185], [238, 178, 196],
                      [230, 165, 205], [240, 172, 188], [226, 158, 198]])
    img[tissue] = eosin[dom_img[tissue] % len(eosin)]
    img = (img.astype(np.int16) + rng.normal(0, 6, img.shape)).clip(0, 255).astype(np.uint8)
    density = np.linspace(0.4, 2.0, n_domains)
    radius = np.linspace(1.2, 3.0, n_domains)[rng.permutation(n_domains)]
    ty, tx = np.nonzero(tissue)
    n_nuclei = int(len(ty) * 0.004)
    pick = rng.integers(0, len(ty), n_nuclei * 2)
    for py, px in zip(ty[pick], tx[pick]):
        d = dom_img[py, px]
        if rng.random() < density[d] / density.max():
            r = max(1, int(round(radius[d] + rng.normal(0, 0.4))))
            colour = (int(90 + 15 * (d % 3)), int(40 + 10 * (d % 2)), int(130 + 10 * d % 40))
            cv2.circle(img, (int(px), int(py)), r, colour, -1)
    cv2.imwrite(str(folder / "spatial" / "tissue_hires_image.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    low = cv2.resize(img, (int(width * LOWRES_SCALEF), int(height * LOWRES_SCALEF)), interpolation=cv2.INTER_AREA)
    cv2.imwrite(str(folder / "spatial" / "tissue_lowres_image.png"), cv2.cvtColor(low, cv2.COLOR_RGB2BGR))
    return folder


def write_10x_h5(path, counts, barcodes, genes, genome: str = "synthetic") -> None:
    """Write ``counts`` (spots x genes, raw integers, dense or sparse) as a 10x HDF5 v3 matrix
    (``filtered_feature_bc_matrix.h5``: features x barcodes CSC, as Space Ranger stores it)."""
    import h5py

    X = sp.csc_matrix(sp.csr_matrix(counts).T)
    with h5py.File(path, "w") as f:
        m = f.create_group("matrix")
        m["data"], m["indices"], m["indptr"] = X.data.astype(np.int32), X.indices, X.indptr
        m["shape"] = np.array(X.shape)
        m["barcodes"] = np.array(list(barcodes), dtype="S")
        feat = m.create_group("features")
        feat["id"] = np.array([f"ID{i:011d}" for i in range(len(genes))], dtype="S")
        feat["name"] = np.array(list(genes), dtype="S")
        feat["feature_type"] = np.array(["Gene Expression"] * len(genes), dtype="S")
        feat["genome"] = np.array([genome] * len(genes), dtype="S")
        feat["_all_tag_keys"] = np.array([b"genome"])


def write_headered_positions(src_list_csv, dst_csv) -> None:
    """Rewrite a header-less ``tissue_positions_list.csv`` (Space Ranger < 2.0) as the headered
    ``tissue_positions.csv`` of Space Ranger >= 2.0."""
    from data.readers import VISIUM_POSITION_COLUMNS

    df = pd.read_csv(src_list_csv, header=None)
    df.columns = VISIUM_POSITION_COLUMNS
    df.to_csv(dst_csv, index=False)
