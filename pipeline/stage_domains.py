"""Stage 3: M-STGCN domains and denoising -> ``03_domains.h5ad``, ``03_domains.csv``, ``metrics.json``, PNG figures.

``03_domains.h5ad`` = stage 2's AnnData plus ``obs['domain']``, ``obs['domain_unrefined']``,
``obsm['embedding']``, ``layers['denoised']`` (log1p(CP10k), every gene in var_names) and
``uns['mstgcn']``. ``03_domains.csv``: ``Barcode,M-STGCN domain`` per spot (Loupe Browser's import
layout). ``metrics.json`` gains ``ari``, ``nmi`` (annotated spots, when truth is given),
``n_clusters``, ``device`` and ``seconds.domains``.

    python pipeline/stage_domains.py --config configs/dlpfc.yaml --out runs/151673
"""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data import keys
from data.errors import InputError
from pipeline import stages
from pipeline.cli import stage_main

log = logging.getLogger("stpipe")
STAGE = "domains"
OUTPUT = "03_domains.h5ad"
DOMAINS_CSV = "03_domains.csv"  # Barcode,M-STGCN domain: for Loupe Browser, R, spreadsheets
FIGURE = "03_domains.png"


def check_model(cfg: dict) -> str:
    """Stage 3 runs M-STGCN: ``model.name`` may be null or ``mstgcn``. With neither ``model.n_clusters``
    nor labels to count (``data.truth``, ``data.truth_column``, or an ``.h5ad`` that may hold
    ``obs['truth']``) the number of domains is unknown: refused here, before stages 1 and 2 run, not
    when stage 3 starts."""
    from pipeline.config import model_name
    name = model_name(cfg, ("mstgcn",), "mstgcn")
    data = cfg.get("data") or {}
    may_hold_truth = data.get("truth") or data.get("truth_column") or str(data.get("path") or "").endswith(".h5ad")
    if (cfg.get("model") or {}).get("n_clusters") is None and not may_hold_truth:
        raise InputError("model.n_clusters is not set and there is no truth to count labels from: "
                         "set it, e.g. --set model.n_clusters=7")
    return name


def fingerprint(cfg: dict, device: str) -> str:
    from positions_enhancement.run_enhancement import fingerprint as fp2
    return stages.fingerprint({k: cfg[k] for k in ("graph", "model", "cluster", "seed")} | {"device": device},
                              upstream=fp2(cfg))


def plot_settings(cfg: dict) -> dict:
    """What only the figures use (``plot.genes``): changing it redraws them from ``03_domains.h5ad``."""
    return {"plot": cfg.get("plot")}


# metrics.json keys written only with truth or several seeds: dropped before a rerun writes its own, also
# in a folder written before stages recorded their keys (stages.update_metrics)
OPTIONAL_METRICS = ("ari", "nmi", "n_annotated", "ari_unrefined", "nmi_unrefined", "seed_kept", "seed_agreement")


def run_stage(cfg: dict, out: Path, device: str = "cpu", force: bool = False, progress: bool = True) -> bool:
    import anndata as ad

    from pipeline.domains import find_domains
    from pipeline.metrics import clustering_scores
    from positions_enhancement.run_enhancement import OUTPUT as STAGE2

    check_model(cfg)
    fp = fingerprint(cfg, device)
    if not force and stages.is_fresh(out, STAGE, fp, [OUTPUT, DOMAINS_CSV]):
        stages.figures_fresh_or_redrawn(out, STAGE, fp, plot_settings(cfg), FIGURE,
                                        lambda: draw_figures(ad.read_h5ad(out / OUTPUT), cfg, out),
                                        "stage 3 (M-STGCN domains)", "figures redrawn for the plot settings")
        return False
    src = out / STAGE2
    if not src.exists():
        raise InputError(f"{src}: stage 2 output not found; run positions_enhancement/run_enhancement.py "
                         "with the same --out first.")
    from positions_enhancement.run_enhancement import STAGE as STAGE2_NAME
    from positions_enhancement.run_enhancement import fingerprint as fp2
    stages.check_upstream(out, STAGE2_NAME, fp2(cfg), src, "positions_enhancement/run_enhancement.py")
    t0 = time.perf_counter()
    adata = ad.read_h5ad(src)
    adata = find_domains(adata, cfg, device, progress=progress)
    store_label_colors(adata)
    stages.save_h5ad(out / OUTPUT, adata)
    save_domains_csv(out / DOMAINS_CSV, adata)
    seconds = time.perf_counter() - t0

    values = {"n_spots": int(adata.n_obs), "n_clusters": int(adata.uns[keys.MSTGCN]["n_clusters"]), "device": device,
              "graphs": adata.uns[keys.MSTGCN]["graphs"],
              "attention_mean": [round(a, 4) for a in adata.uns[keys.MSTGCN]["attention_mean"]]}
    if "seed_agreement" in adata.uns[keys.MSTGCN]:
        values.update(seed_kept=int(adata.uns[keys.MSTGCN]["seed_kept"]),
                      seed_agreement=[float(a) for a in adata.uns[keys.MSTGCN]["seed_agreement"]])
    if _annotated(adata):
        s = clustering_scores(adata.obs[keys.DOMAIN], adata.obs[keys.TRUTH])
        s0 = clustering_scores(adata.obs[keys.DOMAIN_UNREFINED], adata.obs[keys.TRUTH])
        values.update(ari=s["ari"], nmi=s["nmi"], n_annotated=s["n_annotated"],
                      ari_unrefined=s0["ari"], nmi_unrefined=s0["nmi"])
        log.info("ARI %.3f, NMI %.3f on %d annotated spots", s["ari"], s["nmi"], s["n_annotated"])
    draw_figures(adata, cfg, out)
    stages.update_metrics(out, values, {STAGE: seconds}, drop=OPTIONAL_METRICS, stage=STAGE)
    stages.write_stamp(out, STAGE, fp)
    stages.write_figures_stamp(out, STAGE, fp, plot_settings(cfg))
    log.info("stage 3 (M-STGCN domains): %d domains in %.1fs on %s", values["n_clusters"], seconds, device)
    return True


def save_domains_csv(path: Path, adata) -> None:
    """The domains as a two-column CSV, ``Barcode,M-STGCN domain`` (one row per spot, the spot names as
    read): the layout 10x Loupe Browser imports as a clustering, and easy to join in R or pandas."""
    table = adata.obs[[keys.DOMAIN]].rename(columns={keys.DOMAIN: "M-STGCN domain"})
    table.index.name = "Barcode"
    stages.atomic_write(path, lambda tmp: table.to_csv(tmp))


def label_colors(adata) -> dict | None:
    """The figure's colours, {'M-STGCN domains': {domain: colour}, 'ground truth': {label: colour}}: each
    domain in the colour of the truth label it overlaps most (:func:`pipeline.plotting.matched_label_colors`);
    None without truth (the default palette)."""
    from pipeline.plotting import matched_label_colors

    if not _annotated(adata):
        return None
    return dict(zip(("M-STGCN domains", "ground truth"),
                    matched_label_colors(adata.obs[keys.DOMAIN].astype(str).to_numpy(),
                                         adata.obs[keys.TRUTH].astype(object).to_numpy())))


def store_label_colors(adata) -> None:
    """Write ``uns['domain_colors']`` (and ``uns['truth_colors']`` when the truth is categorical): the
    colours of ``03_domains.png``, where ``sc.pl.spatial(adata, color='domain')`` and squidpy look, so
    their plots match the pipeline's figure."""
    import pandas as pd

    from pipeline.plotting import scanpy_colors

    colors = label_colors(adata) or {}
    adata.uns[f"{keys.DOMAIN}_colors"] = scanpy_colors(adata.obs[keys.DOMAIN].cat.categories,
                                                       colors.get("M-STGCN domains"))
    truth = adata.obs.get(keys.TRUTH)
    if colors and isinstance(truth.dtype, pd.CategoricalDtype):
        adata.uns[f"{keys.TRUTH}_colors"] = scanpy_colors(truth.cat.categories, colors["ground truth"])


def _annotated(adata) -> bool:
    return keys.TRUTH in adata.obs and bool(adata.obs[keys.TRUTH].notna().any())


def background_image(adata) -> tuple:
    """(image (H, W, 3) uint8, its px per full-resolution px) of the slide's ``uns['spatial']`` entry,
    hires before lowres (a legacy ST slide's <= 2000 px copy of ``data.image`` is its hires); (None, 1.0)
    when it holds none."""
    lib = keys.library_id(adata)
    entry = adata.uns[keys.SPATIAL_UNS][lib] if lib is not None else {}
    images, sf = entry.get("images") or {}, entry.get("scalefactors") or {}
    for kind in ("hires", "lowres"):
        if kind in images and sf.get(f"tissue_{kind}_scalef"):
            return np.asarray(images[kind]), float(sf[f"tissue_{kind}_scalef"])
    return None, 1.0


def draw_figures(adata, cfg: dict, out: Path) -> None:
    """``03_domains.png`` (domains beside the truth when there is one, coloured to match, ARI in the
    title, and beside the slide's H&E when it has one) and ``03_denoised.png`` (``plot.genes``, else the 3 most spatially patterned genes:
    measured beside denoised) from stage 3's AnnData."""
    from pipeline.metrics import clustering_scores, most_patterned_genes
    from pipeline.plotting import no_gene_panels, spot_maps
    from pipeline.preprocess import match_gene_names

    panels = {"M-STGCN domains": adata.obs[keys.DOMAIN].astype(str).to_numpy()}
    title = None
    colors = label_colors(adata)       # each domain drawn in the colour of the layer it overlaps most
    if _annotated(adata):
        panels["ground truth"] = adata.obs[keys.TRUTH].astype(object).to_numpy()
        title = f"ARI {clustering_scores(adata.obs[keys.DOMAIN], adata.obs[keys.TRUTH])['ari']:.3f}"
    image, scale = background_image(adata)
    if image is not None:
        panels["H&E"] = None            # the tissue beside the domains, over the same area
    spot_maps(adata.obsm[keys.SPATIAL], panels, out / FIGURE, title=title, colors=colors, image=image,
              image_scale=scale, under_spots=False)
    genes = (cfg.get("plot") or {}).get("genes") or most_patterned_genes(
        adata.layers[keys.LOGNORM], adata.obsm[keys.SPATIAL], list(adata.var_names))
    genes, missing = match_gene_names(genes, adata.var_names, "plot.genes")
    if missing:
        log.warning("plot.genes not among the modelled genes, skipped: %s", ", ".join(missing))
    panels = {}
    for gname in genes:
        j = adata.var_names.get_loc(gname)
        panels[f"{gname} measured"] = adata.layers[keys.LOGNORM][:, j]
        panels[f"{gname} denoised"] = adata.layers[keys.DENOISED][:, j]
    if panels:
        spot_maps(adata.obsm[keys.SPATIAL], panels, out / "03_denoised.png", ncols=2)
    else:
        no_gene_panels(out / "03_denoised.png", "plot.genes")


if __name__ == "__main__":
    stage_main(__doc__, run_stage)
