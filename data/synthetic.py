"""A synthetic Visium slice, generated in seconds, written as a Space Ranger folder.

Hexagonal Visium grid; ``n_domains`` curved layered bands; counts drawn from a negative binomial
whose mean follows per-domain gene programs plus a smooth gradient; a full-resolution H&E-like
image whose nucleus density, size and stain hue follow the domains. The folder holds
``filtered_feature_bc_matrix/`` (MEX), ``spatial/tissue_positions_list.csv``,
``spatial/scalefactors_json.json``, ``spatial/tissue_hires_image.png`` and
``spatial/tissue_lowres_image.png``, plus ``truth.txt`` (barcode, domain).

:func:`make_synthetic_visium_hd` writes a Visium HD run's binned output the same way (square
8 and 16 um bins, parquet positions).

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

# every file make_synthetic_visium writes (a folder lacking one was cut short)
SYNTHETIC_VISIUM_FILES = ("filtered_feature_bc_matrix/matrix.mtx.gz", "filtered_feature_bc_matrix/barcodes.tsv.gz",
                          "filtered_feature_bc_matrix/features.tsv.gz", "spatial/tissue_positions_list.csv",
                          "spatial/scalefactors_json.json", "spatial/tissue_hires_image.png",
                          "spatial/tissue_lowres_image.png", "truth.txt")


def write_png(path, rgb: np.ndarray) -> None:
    """Write an RGB uint8 image (h, w, 3) as a PNG. ``cv2.imwrite`` only returns False when it cannot (a full
    disk: libpng's "Write Error" on stderr and a missing or cut file); this raises the OSError instead."""
    import errno

    import cv2

    ok, data = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise OSError(errno.EIO, f"OpenCV could not encode {Path(path).name} as PNG")
    Path(path).write_bytes(data.tobytes())


def synthetic_domains(x: np.ndarray, y: np.ndarray, width: float, height: float, n_domains: int) -> np.ndarray:
    """Curved bands across the slice: domain index per point (x, y in full-res px)."""
    wave = 0.08 * height * np.sin(2 * np.pi * x / width * 1.3)
    t = (y + wave + 0.15 * x) / (height + 0.15 * width)
    return np.clip((t * n_domains).astype(int), 0, n_domains - 1)


def make_synthetic_visium(folder, n_rows: int = 40, n_cols: int = 40, n_genes: int = 600,
                          n_domains: int = 5, seed: int = 0, program_seed: int | None = None) -> Path:
    """Write a synthetic Space Ranger folder to ``folder`` and return its path. ``program_seed``: the
    seed of the domains' gene programmes alone (default: drawn with ``seed``), so that slides of
    different ``seed`` but one ``program_seed`` are sections of one tissue (the same genes mark the
    same domains; counts and image texture differ)."""
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

    counts = _domain_counts(rng, domain, px_col / width, n_genes, n_domains, library_mean=1500,
                            program_rng=None if program_seed is None else np.random.default_rng(program_seed))

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

    inner = lambda xx, yy: ((xx > margin * 0.5) & (xx < width - margin * 0.5)
                           & (yy > margin * 0.5) & (yy < height - margin * 0.5))
    img = _he_like_image(rng, width, height, n_domains, inner)
    write_png(folder / "spatial" / "tissue_hires_image.png", img)
    low = cv2.resize(img, (int(width * LOWRES_SCALEF), int(height * LOWRES_SCALEF)), interpolation=cv2.INTER_AREA)
    write_png(folder / "spatial" / "tissue_lowres_image.png", low)
    return folder


def _domain_counts(rng, domain: np.ndarray, gradient_x: np.ndarray, n_genes: int, n_domains: int,
                   library_mean: float, program_rng=None) -> np.ndarray:
    """Counts (n, n_genes) int32: a shared base + per-domain programmes (markers up and down) + a smooth
    gradient along ``gradient_x`` (0-1 across the slide) for a tenth of the genes; negative binomial
    (theta 3) around a log-normal library of mean ~``library_mean`` UMIs. The base, programmes and
    gradient genes are drawn from ``program_rng`` when given, else from ``rng``."""
    n = len(domain)
    prng = rng if program_rng is None else program_rng
    base = prng.gamma(0.6, 1.0, n_genes) + 0.05
    programs = np.ones((n_domains, n_genes))
    per = max(8, n_genes // (3 * n_domains))
    for d in range(n_domains):
        up = prng.choice(n_genes, per, replace=False)
        programs[d, up] *= prng.uniform(1.8, 3.5, per)
        down = prng.choice(n_genes, per // 2, replace=False)
        programs[d, down] *= prng.uniform(0.3, 0.6, per // 2)
    gradient_genes = prng.choice(n_genes, n_genes // 10, replace=False)
    grad = np.ones((n, n_genes))
    grad[:, gradient_genes] *= np.exp(0.8 * (gradient_x - 0.5))[:, None]
    rate = base[None, :] * programs[domain] * grad
    rate /= rate.sum(1, keepdims=True)
    library = rng.lognormal(np.log(library_mean), 0.35, n)
    mu = rate * library[:, None]
    theta = 3.0
    return rng.poisson(rng.gamma(theta, mu / theta)).astype(np.int32)


def _he_like_image(rng, width: int, height: int, n_domains: int, tissue_at, domains_at=None) -> np.ndarray:
    """An H&E-like RGB uint8 image of a ``width`` x ``height`` full-resolution px slide, drawn at
    ``HIRES_SCALEF``: eosin where ``tissue_at(x, y)`` (full-res px arrays -> bool) holds, haematoxylin
    nuclei whose density, size and hue follow the domains ``domains_at(x, y)`` (default
    :func:`synthetic_domains` over the whole image)."""
    import cv2

    h, w = int(height * HIRES_SCALEF), int(width * HIRES_SCALEF)
    img = np.full((h, w, 3), 245, np.uint8)
    yy, xx = np.mgrid[:h, :w] / HIRES_SCALEF
    dom_img = (domains_at or (lambda x, y: synthetic_domains(x, y, width, height, n_domains)))(xx, yy)
    tissue = tissue_at(xx, yy)
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
    return img


HD_MICRONS_PER_PIXEL = 100.0 / SPOT_SPACING_FULLRES   # the same pixel size as the Visium slice above


def make_synthetic_visium_hd(folder, n_bins16: int = 64, n_genes: int = 300, n_domains: int = 5,
                             rotation: float = 0.02, seed: int = 0, cells: bool = False) -> Path:
    """Write a synthetic Visium HD run's ``outs/`` folder to ``folder`` (scale and format tests only).

    Laid out as Space Ranger 3 writes HD output: ``binned_outputs/square_008um/`` and
    ``binned_outputs/square_016um/``, each with ``filtered_feature_bc_matrix.h5`` and ``spatial/``
    (``tissue_positions.parquet`` listing every bin of the array with ``in_tissue``; a
    ``scalefactors_json.json`` with ``spot_diameter_fullres`` = the bin side in full-resolution px,
    ``bin_size_um`` and ``microns_per_pixel``; hires/lowres PNGs). A square array of ``2 * n_bins16``
    8 um bins per side, turned by ``rotation`` radians on the image; tissue is an ellipse; counts of
    8 um bins follow :func:`synthetic_domains` laid over the tissue (~120 UMIs per bin), and a 16 um
    bin holds the sum of its 2 x 2 8 um bins under tissue, as binning does. ``truth_016um.txt`` and
    ``truth_032um.txt`` give the domain at the centre of every 16 um bin and of every 32 um one
    (2 x 2 bins of 16 um, as the reader sums them).

    ``cells``: also Space Ranger 4's cell segmentation, ``segmented_outputs/``: cells ~7 um across, one per
    12 um square under tissue at a random place in it (no lattice), each an irregular 10-gon in
    ``cell_segmentations.geojson`` (full-resolution px, ``properties.cell_id``); their counts (~80 UMIs, the bins'
    gene programmes) in ``filtered_feature_cell_matrix.h5`` (barcodes ``cellid_000000001-1``); ``spatial/``
    with the scale factors and PNGs. ``truth_cells.txt`` gives each cell's domain and ``cell_centroids.csv`` its
    outline's centroid."""
    import cv2

    rng = np.random.default_rng(seed)
    folder = Path(folder)
    n8 = 2 * int(n_bins16)
    bin8_px = 8.0 / HD_MICRONS_PER_PIXEL
    margin = 2 * SPOT_SPACING_FULLRES
    extent = n8 * bin8_px
    width = height = int(extent * 1.1 + 2 * margin)
    centre = np.array([width, height]) / 2.0
    c, s_ = np.cos(rotation), np.sin(rotation)

    def place(row, col, bin_px):           # array indices -> full-res (x, y) of the bin centres
        u = (col + 0.5) * bin_px - extent / 2
        v = (row + 0.5) * bin_px - extent / 2
        return centre[0] + c * u - s_ * v, centre[1] + s_ * u + c * v

    def in_ellipse(x, y):
        return ((x - centre[0]) / (0.45 * extent)) ** 2 + ((y - centre[1]) / (0.40 * extent)) ** 2 <= 1

    def domains_at(x, y):                  # the bands laid over the tissue's bounding box
        return synthetic_domains(x - centre[0] + 0.45 * extent, y - centre[1] + 0.40 * extent,
                                 0.9 * extent, 0.8 * extent, n_domains)

    rows8, cols8 = (a.ravel() for a in np.meshgrid(np.arange(n8), np.arange(n8), indexing="ij"))
    x8, y8 = place(rows8, cols8, bin8_px)
    tissue8 = in_ellipse(x8, y8)
    domain8 = domains_at(x8, y8)
    counts8 = sp.csr_matrix(_domain_counts(rng, domain8[tissue8], x8[tissue8] / width, n_genes, n_domains,
                                           library_mean=120))            # the 8 um bins under tissue
    on8 = np.flatnonzero(tissue8)
    genes = np.array([f"Gene{g:04d}" for g in range(n_genes)])
    img = _he_like_image(rng, width, height, n_domains, in_ellipse, domains_at)
    low = cv2.resize(img, (int(width * LOWRES_SCALEF), int(height * LOWRES_SCALEF)), interpolation=cv2.INTER_AREA)

    for bin_um, k in ((8, 1), (16, 2)):
        rows, cols = (a.ravel() for a in np.meshgrid(np.arange(n8 // k), np.arange(n8 // k), indexing="ij"))
        member = (rows8[on8] // k) * (n8 // k) + cols8[on8] // k         # level bin of each 8 um bin under tissue
        counts = sp.csr_matrix((np.ones(len(member)), (member, np.arange(len(member)))),
                               shape=(len(rows), len(member))) @ counts8
        tissue = np.bincount(member, minlength=len(rows)) > 0
        x, y = place(rows, cols, bin8_px * k)
        barcodes = np.array([f"s_{bin_um:03d}um_{r:05d}_{q:05d}-1" for r, q in zip(rows, cols)])
        level = folder / "binned_outputs" / f"square_{bin_um:03d}um"
        (level / "spatial").mkdir(parents=True, exist_ok=True)
        write_10x_h5(level / "filtered_feature_bc_matrix.h5", counts[tissue], barcodes[tissue], genes)
        pd.DataFrame({"barcode": barcodes, "in_tissue": tissue.astype(int), "array_row": rows, "array_col": cols,
                      "pxl_row_in_fullres": y, "pxl_col_in_fullres": x}
                     ).to_parquet(level / "spatial" / "tissue_positions.parquet", index=False)
        (level / "spatial" / "scalefactors_json.json").write_text(json.dumps({
            "spot_diameter_fullres": bin8_px * k, "bin_size_um": float(bin_um),
            "microns_per_pixel": HD_MICRONS_PER_PIXEL, "tissue_hires_scalef": HIRES_SCALEF,
            "tissue_lowres_scalef": LOWRES_SCALEF, "fiducial_diameter_fullres": SPOT_SPACING_FULLRES * 0.8}))
        write_png(level / "spatial" / "tissue_hires_image.png", img)
        write_png(level / "spatial" / "tissue_lowres_image.png", low)
    # domains at the centres of the 16 um bins under tissue, and of the 32 um blocks the reader keeps
    # (2 x 2 bins of 16 um, at least 2 of them under tissue: data.readers.aggregate_square_bins)
    n16 = n8 // 2
    kept = {16: tissue.reshape(n16, n16),
            32: tissue.reshape(n16 // 2, 2, n16 // 2, 2).sum((1, 3)) >= 2}
    for bin_um, on in kept.items():
        f = bin_um // 16
        rows, cols = (a.ravel() for a in np.meshgrid(np.arange(n16 // f), np.arange(n16 // f), indexing="ij"))
        on = on.ravel()
        dom = domains_at(*place(rows[on], cols[on], bin8_px * 2 * f))
        pd.DataFrame({"barcode": [f"s_{bin_um:03d}um_{r:05d}_{q:05d}-1" for r, q in zip(rows[on], cols[on])],
                      "label": [f"D{d + 1}" for d in dom]}).to_csv(
            folder / f"truth_{bin_um:03d}um.txt", sep="\t", header=False, index=False)
    if cells:
        _write_hd_cells(folder, np.random.default_rng(seed + 1), np.random.default_rng(seed), place, in_ellipse,
                        domains_at, n8 * 8 // 12, 12.0 / HD_MICRONS_PER_PIXEL, genes, n_domains, width, img, low)
    return folder


def _write_hd_cells(folder: Path, rng, program_rng, place, in_ellipse, domains_at, n_side: int, step_px: float,
                    genes, n_domains: int, width: int, img, low) -> None:
    """``segmented_outputs/`` of :func:`make_synthetic_visium_hd` (see there); ``program_rng`` in the state the
    bins' counts started from, so that cells and bins share the domains' gene programmes."""
    rows, cols = (a.ravel() for a in np.meshgrid(np.arange(n_side), np.arange(n_side), indexing="ij"))
    x, y = place(rows, cols, step_px)
    x, y = x + rng.uniform(-0.45, 0.45, len(x)) * step_px, y + rng.uniform(-0.45, 0.45, len(y)) * step_px   # no lattice
    on = in_ellipse(x, y)
    x, y = x[on], y[on]
    domain = domains_at(x, y)
    counts = sp.csr_matrix(_domain_counts(rng, domain, x / width, len(genes), n_domains, library_mean=80,
                                          program_rng=program_rng))
    ids = np.arange(1, len(x) + 1)
    barcodes = np.array([f"cellid_{i:09d}-1" for i in ids])
    angles = np.linspace(0, 2 * np.pi, 11)[:-1]
    features, centroids = [], []
    for i, cx, cy in zip(ids, x, y):
        r = 0.3 * step_px * rng.uniform(0.8, 1.2, len(angles))
        ring = np.c_[cx + r * np.cos(angles), cy + r * np.sin(angles)]
        xs, ys = ring[:, 0], ring[:, 1]
        cross = xs * np.roll(ys, -1) - np.roll(xs, -1) * ys
        area = cross.sum() / 2
        centroids.append([((xs + np.roll(xs, -1)) * cross).sum() / (6 * area),
                          ((ys + np.roll(ys, -1)) * cross).sum() / (6 * area)])
        features.append({"type": "Feature", "properties": {"cell_id": int(i)},
                         "geometry": {"type": "Polygon", "coordinates": [np.r_[ring, ring[:1]].round(3).tolist()]}})
    seg = folder / "segmented_outputs"
    (seg / "spatial").mkdir(parents=True, exist_ok=True)
    write_10x_h5(seg / "filtered_feature_cell_matrix.h5", counts, barcodes, genes)
    (seg / "cell_segmentations.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    (seg / "spatial" / "scalefactors_json.json").write_text(json.dumps({     # as Space Ranger writes it: 2 um bins'
        "spot_diameter_fullres": 2.0 / HD_MICRONS_PER_PIXEL, "bin_size_um": 2.0,
        "microns_per_pixel": HD_MICRONS_PER_PIXEL, "tissue_hires_scalef": HIRES_SCALEF,
        "tissue_lowres_scalef": LOWRES_SCALEF}))
    write_png(seg / "spatial" / "tissue_hires_image.png", img)
    write_png(seg / "spatial" / "tissue_lowres_image.png", low)
    pd.DataFrame({"barcode": barcodes, "label": [f"D{d + 1}" for d in domain]}).to_csv(
        folder / "truth_cells.txt", sep="\t", header=False, index=False)
    pd.DataFrame(centroids, index=barcodes, columns=["x", "y"]).to_csv(folder / "cell_centroids.csv")


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
