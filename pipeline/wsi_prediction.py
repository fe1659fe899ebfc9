"""Stage 5 on a whole-slide image with no spots: tissue, a spot grid, tiled features, prediction.

Memory stays bounded by the tile: the slide is read ``wsi.tile_px`` level-0 pixels at a time (plus a
margin of half the largest patch), each tile's grid points are featurised and counted, and only the
per-point features are kept. The tissue mask comes from a thumbnail also built tile by tile.

Units: grid coordinates in level-0 pixels; ``mpp`` microns per level-0 pixel; spot diameter and
spacing in micrometres (default: the training platform's, stored in the model).
"""
from __future__ import annotations

import logging

import numpy as np

from data.errors import InputError

log = logging.getLogger("stpipe")


GRID_LAYOUTS = ("auto", "square", "hex")


def lattice(width: float, height: float, spacing: float, layout: str = "square") -> np.ndarray:
    """Points ``spacing`` apart covering a width x height rectangle: (m, 2) (x, y).

    ``square``: rows and columns ``spacing`` apart (legacy ST arrays: 4 neighbours at 1 spacing);
    ``hex``: rows ``spacing * sqrt(3) / 2`` apart, every other row shifted by half a spacing (the
    Visium layout: 6 neighbours at 1 spacing).
    """
    if layout == "square":
        gx, gy = np.meshgrid(np.arange(spacing / 2, width, spacing), np.arange(spacing / 2, height, spacing))
        return np.column_stack([gx.ravel(), gy.ravel()])
    if layout == "hex":
        pts = []
        for i, y in enumerate(np.arange(spacing / 2, height, spacing * np.sqrt(3) / 2)):
            xs = np.arange(spacing / 2 + (i % 2) * spacing / 2, width, spacing)
            pts.append(np.column_stack([xs, np.full(len(xs), y)]))
        return np.concatenate(pts) if pts else np.zeros((0, 2))
    raise InputError(f"wsi.grid={layout!r}: choose one of {GRID_LAYOUTS}.")


def tissue_grid(slide, spacing_px: float, thumb_side: int = 2048,
                layout: str = "square") -> tuple[np.ndarray, np.ndarray, float]:
    """Grid of spots ``spacing_px`` level-0 px apart (see :func:`lattice`) over the slide's tissue
    (:func:`image_process.patches.slide_tissue`: stained pieces of at least one grid cell).

    Returns (grid (m, 2) level-0 (x, y), thumbnail RGB, thumbnail px per level-0 px).
    """
    from image_process.patches import slide_tissue

    thumb, tscale = slide.thumbnail(thumb_side)
    mask, mscale = slide_tissue(thumb, min_area=(spacing_px * tscale) ** 2)   # no specks, frames or pen marks
    if mask.mean() < 1e-3:
        raise InputError(f"{slide.source}: no tissue found (the tissue mask is empty). Is this an H&E image? "
                         "A blank or fully dark image cannot be predicted.")
    s = tscale * mscale
    W, H = slide.size
    xy = lattice(W, H, spacing_px, layout)
    mx = np.clip((xy[:, 0] * s).astype(int), 0, mask.shape[1] - 1)
    my = np.clip((xy[:, 1] * s).astype(int), 0, mask.shape[0] - 1)
    grid = xy[mask[my, mx]]
    if len(grid) < 3:
        raise InputError(f"{slide.source}: only {len(grid)} grid points fall on tissue at a spacing of "
                         f"{spacing_px:.0f} px; check wsi.mpp and wsi.spot_spacing_um.")
    return grid, thumb, tscale


def tiled_features(slide, grid: np.ndarray, encoder, spot_px: float, extent: float, tile_px: int = 4096,
                   progress: bool = True, patch_stream=None, device: str = "cpu"):
    """Encoder features and nucleus counts of every grid point, reading one tile at a time.

    ``extent``: the largest patch the encoder cuts, in spot diameters (sets the tile margin).
    Returns (features (m, d) float32, nucleus statistics (m, 8) float32, column 0 = count; see
    :mod:`image_process.nuclei`; patch-stream expression (m, g) or None). The nucleus threshold and,
    with a ``patch_stream`` (:class:`pipeline.expression_prediction.PatchStream`), the patch channel
    statistics are fixed once from a sample of grid points spread over the slide, so all tiles are
    treated alike; the patch CNNs run tile by tile and only their (m, g) output is kept.
    """
    from models.progress import progress_bar

    from image_process.nuclei import N_MORPHOLOGY, haematoxylin, nucleus_features, otsu_threshold
    from image_process.patches import extract_patches
    from models.patch_cnn import patch_channel_stats

    geom = None if patch_stream is None else patch_stream.geometry
    patch_side_px = 0.0 if geom is None else spot_px * geom["scale"]
    margin = int(np.ceil(max(spot_px * extent, patch_side_px) / 2)) + 2
    # one haematoxylin threshold (and patch statistics) for the whole slide, from up to 256 points read one by one
    rng = np.random.default_rng(0)
    sample = grid[rng.choice(len(grid), min(256, len(grid)), replace=False)]
    side = int(np.ceil(max(spot_px, patch_side_px))) + 2
    hs, sample_patches = [], []
    for x, y in sample.astype(int):
        region = slide.read_region(x - side // 2, y - side // 2, side, side)
        centre = np.array([[side / 2, side / 2]])
        hs.append(haematoxylin(extract_patches(region, centre, spot_px, 64)))
        if geom is not None:
            sample_patches.append(extract_patches(region, centre, patch_side_px, geom["px"]))
    threshold = otsu_threshold(np.concatenate(hs))
    stats = patch_channel_stats(np.concatenate(sample_patches)) if geom is not None else None
    patch_expr = None if patch_stream is None else np.zeros((len(grid), len(patch_stream.gene_mean)), np.float32)

    feats = np.zeros((len(grid), 0), np.float32)
    nucleus = np.zeros((len(grid), N_MORPHOLOGY), np.float32)
    x0s = np.arange(int(grid[:, 0].min() // tile_px) * tile_px, grid[:, 0].max() + 1, tile_px)
    y0s = np.arange(int(grid[:, 1].min() // tile_px) * tile_px, grid[:, 1].max() + 1, tile_px)
    tiles = [(x0, y0) for y0 in y0s for x0 in x0s]
    for x0, y0 in progress_bar(tiles, desc="whole-slide tiles", disable=not progress, leave=False):
        inside = np.flatnonzero((grid[:, 0] >= x0) & (grid[:, 0] < x0 + tile_px) &
                                (grid[:, 1] >= y0) & (grid[:, 1] < y0 + tile_px))
        if len(inside) == 0:
            continue
        ox, oy = int(x0) - margin, int(y0) - margin
        region = slide.read_region(ox, oy, tile_px + 2 * margin, tile_px + 2 * margin)
        local = grid[inside] - np.array([ox, oy], float)
        f = encoder.encode(region, local, spot_px)
        if feats.shape[1] == 0:
            feats = np.zeros((len(grid), f.shape[1]), np.float32)
        feats[inside] = f
        nucleus[inside], _ = nucleus_features(region, local, spot_px, threshold=threshold)
        if patch_stream is not None:
            patch_expr[inside] = patch_stream.expression(extract_patches(region, local, patch_side_px, geom["px"]),
                                                         stats, device)
        del region
    return feats, nucleus, patch_expr


NO_MPP = "the file does not say its microns per pixel; set wsi.mpp (e.g. --set wsi.mpp=0.5 for a 20x scan)."


SCAN_MPP_MAX = 25.0   # um per pixel: coarser than any microscope scan of a slide (0.1-10 um/px)


def check_stated_mpp(mpp: float | None, source) -> None:
    """Refuse microns per pixel that a file states (``wsi.mpp`` unset) when missing, or coarser than
    :data:`SCAN_MPP_MAX`: image editors and converters write 72, 96 or 300 dots per inch as a
    placeholder (353, 265, 85 um/px), which would lay the grid's 100 um spots on 0.3-1.2 px."""
    if mpp is None:
        raise InputError(f"{source}: {NO_MPP}")
    if mpp > SCAN_MPP_MAX:
        raise InputError(f"{source}: the file states {mpp:.3g} um per pixel ({25400 / mpp:.0f} dots per inch), coarser "
                         f"than any microscope scan (0.1-10 um/px): a placeholder that image editors write, not the scan's "
                         "resolution; set wsi.mpp to its microns per pixel (e.g. --set wsi.mpp=0.5 for a 20x scan).")


def check_whole_slide_mpp(test_specs, wsi_cfg: dict) -> None:
    """Refuse, before any training, a whole-slide test section whose file does not state its microns per
    pixel (a plain JPEG/PNG never does), or states a placeholder (:func:`check_stated_mpp`), when
    ``wsi.mpp`` is unset: found only when the section was predicted, it cost a training run (~80 s on
    the default config)."""
    from data.wsi import file_mpp
    from pipeline.config import resolve_path
    from pipeline.sections import is_whole_slide_spec

    if (wsi_cfg or {}).get("mpp"):
        return
    for spec in filter(is_whole_slide_spec, test_specs):
        image = resolve_path(spec["image"])
        check_stated_mpp(file_mpp(image), f"{image} (test.sections {spec.get('name')})")


def grid_spot_um(wsi_cfg: dict, trained_um) -> tuple[float, float]:
    """(spot diameter, spacing) in um of a whole-slide grid: ``wsi.spot_diameter_um`` / ``wsi.spot_spacing_um``,
    else the training platform's (``trained_um``); refused when neither says (a model trained on spots of no
    known size: cells of a SpatialData store, an .h5ad off any lattice)."""
    given = (wsi_cfg.get("spot_diameter_um"), wsi_cfg.get("spot_spacing_um"))
    if trained_um is None and not all(given):
        raise InputError("the model was trained on spots of no known size in micrometres (no Visium or ST array, no "
                         "Visium HD bins or cells): set the whole-slide grid's wsi.spot_diameter_um and "
                         "wsi.spot_spacing_um, those of the training spots (e.g. --set wsi.spot_diameter_um=10 "
                         "--set wsi.spot_spacing_um=12 for cells).")
    return (float(given[0] or trained_um[0]), float(given[1] or trained_um[1]))


def check_grid_geometry(diam_um: float, spacing_um: float, mpp: float, trained_um) -> None:
    """Refuse a whole-slide grid whose spots would be over 4 times wider than their spacing
    (``wsi.spot_spacing_um=1`` laid 7.6 million points on a her2st H&E, hours of work;
    ``wsi.spot_diameter_um=100000`` asked for a 513 GB patch) or smaller than 2 pixels.
    ``trained_um``: the training platform's (diameter, spacing) in um, or None when not known."""
    where = (f"(the model was trained on {trained_um[0]:g} um spots {trained_um[1]:g} um apart)" if trained_um
             else "(the model's training spots are of no known size)")
    if spacing_um < 0.25 * diam_um:
        raise InputError(f"wsi.spot_spacing_um={spacing_um:g} with wsi.spot_diameter_um={diam_um:g}: the grid's spots "
                         f"would be over 4 times wider than their spacing {where}; both are in micrometres.")
    if diam_um / mpp < 2:
        raise InputError(f"wsi.spot_diameter_um={diam_um:g} is {diam_um / mpp:.2g} px at {mpp:g} um/px; check wsi.mpp "
                         "and wsi.spot_diameter_um (micrometres).")


def predict_whole_slide(predictor, spec: dict, wsi_cfg: dict, device: str = "cpu", progress: bool = True):
    """Predict every gene on a spot grid over a whole-slide image's tissue.

    Returns (AnnData: ``X`` predicted log1p(CP10k), ``obsm['spatial']`` level-0 px,
    ``uns['spatial'][name]`` with a ``lowres`` thumbnail and its scale factor; the thumbnail; its
    scale (thumbnail px per level-0 px); info dict). The caller writes ``uns['prediction']``.
    """
    import anndata as ad
    import pandas as pd

    from data import keys
    from data.readers import warn_if_grey
    from data.wsi import open_whole_slide
    from image_process.encoders import build_encoder
    from pipeline.config import resolve_path
    from pipeline.expression_prediction import VISIUM_SPOT_UM, relative_density

    diam_um, spacing_um = grid_spot_um(wsi_cfg, predictor.spot_um)
    with open_whole_slide(resolve_path(spec["image"]), wsi_cfg.get("mpp")) as slide:   # closed once read
        if not wsi_cfg.get("mpp"):
            check_stated_mpp(slide.mpp or None, slide.source)
        spot_px, spacing_px = diam_um / slide.mpp, spacing_um / slide.mpp
        check_grid_geometry(diam_um, spacing_um, slide.mpp, predictor.spot_um)
        layout = wsi_cfg.get("grid") or "auto"
        if layout == "auto":   # the training platform's layout, so the spatial graph looks as in training
            layout = "hex" if predictor.spot_um and tuple(predictor.spot_um) == tuple(VISIUM_SPOT_UM) else "square"
        grid, thumb, tscale = tissue_grid(slide, spacing_px, layout=layout)
        warn_if_grey(thumb, slide.source)
        image_cfg = predictor.image
        encoder = build_encoder(image_cfg.get("encoder") or "handcrafted", image_cfg.get("weights"),
                                **(image_cfg.get("options") or {}))
        extent = getattr(encoder, "extent", 4.0)
        log.info("%s: %dx%d px at %.3f um/px, %d grid points (spacing %.0f px, spot %.0f px)", slide.source,
                 *slide.size, slide.mpp, len(grid), spacing_px, spot_px)
        feats, nucleus, patch_expr = tiled_features(slide, grid, encoder, spot_px, extent,
                                                    int(wsi_cfg.get("tile_px", 4096)), progress,
                                                    predictor.patch_stream, device)
    nuclei = nucleus[:, 0]
    if predictor.nucleus_features:
        feats = np.hstack([feats, nucleus])
    pred = predictor.predict(feats, grid, spacing_px, relative_density(nuclei), device, patch_expr)
    out = ad.AnnData(X=pred, obs=pd.DataFrame({"nuclei": nuclei}, index=[f"g{i}" for i in range(len(grid))]),
                     var=pd.DataFrame(index=predictor.genes))
    out.obsm[keys.SPATIAL] = grid
    from image_process.patches import SlideImage, scanpy_spatial_entry
    out.uns[keys.SPATIAL_UNS] = {spec["name"]: scanpy_spatial_entry(
        SlideImage(thumb, float(tscale), slide.source, "tissue thumbnail"), spot_px,
        metadata={"source": slide.source, "mpp": float(slide.mpp)})}
    info = {"n_spots": int(len(grid)), "mpp": float(slide.mpp), "spot_px": float(spot_px),
            "spacing_px": float(spacing_px), "grid": layout, "image_size": list(slide.size)}
    return out, thumb, tscale, info
