"""PNG figures: spot maps of labels or expression, optionally over the slide image."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.graphs import median_nearest_distance
from pipeline.stages import atomic_write


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def lattice_raster(xy: np.ndarray, values: np.ndarray, max_cells: int = 25_000_000):
    """``(raster (rows, cols) float with NaN off the points, extent)`` for points on a square lattice
    (a super-resolution grid), for ``imshow(raster, origin="lower", extent=extent)``; None when the
    points are not on one. Scattered square markers cannot tile such a grid exactly: at figure
    resolution their sizes round differently, leaving white lines and a moire of darker and lighter
    blocks that look like structure in the prediction. A raster shows each grid value as one cell."""
    xy = np.asarray(xy, float)
    step = median_nearest_distance(xy) if len(xy) >= 4 else None
    if step is None:
        return None
    idx = (xy - xy.min(0)) / step
    cells = np.round(idx).astype(np.int64)
    if np.abs(idx - cells).max() > 0.01:
        return None
    cols, rows = cells.max(0) + 1
    if rows * cols > max_cells:
        return None
    raster = np.full((rows, cols), np.nan)
    raster[cells[:, 1], cells[:, 0]] = np.asarray(values, float)
    x0, y0 = xy.min(0)
    extent = (x0 - step / 2, x0 + (cols - 0.5) * step, y0 - step / 2, y0 + (rows - 0.5) * step)
    return raster, extent


def _fill_lattice(fig, fitted: list, fill: float) -> None:
    """Size each scatter in ``fitted`` [(axes, PathCollection, spacing in data units)] so that a
    marker spans ``fill`` of the points' spacing at the axes' final scale: spots tile the tissue
    (as ``sc.pl.spatial`` draws them) whatever their number or the panel size."""
    fig_w_pt = fig.get_figwidth() * 72.0
    for ax, coll, spacing in fitted:
        ax.apply_aspect()
        width_units = abs(np.diff(ax.get_xlim())[0])
        pt_per_unit = ax.get_position().width * fig_w_pt / width_units
        coll.set_sizes([max(0.5, (fill * spacing * pt_per_unit) ** 2)])


# an image drawn under the spots is shrunk to this longest side first: a panel is ~500 px wide, and
# matplotlib converts what it draws to float RGBA (a 13k px H&E drawn whole took 9 GB and a minute)
MAX_BACKGROUND_PX = 1000


FILL = 0.95             # marker diameter / spot spacing
FILL_OVER_IMAGE = 0.6   # the same over an H&E, so that the tissue shows between the spots


def _natural_key(label: str) -> list:
    """Sort key putting 'domain 2' before 'domain 10' and 'n/a' last."""
    import re
    return [label == "n/a"] + [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", label) if t]


def _label_strings(values) -> pd.Series:
    """Labels as the figures show them: strings, missing values as 'n/a'. (``astype(str)`` is not used: pandas 3
    keeps a missing value missing there, where pandas 2 wrote 'nan'.)"""
    vals = pd.Series(values)
    return vals.astype(object).map(str).where(vals.notna(), "n/a")


def _save_figure(fig, path) -> Path:
    """Write ``fig`` as a PNG (110 dpi) to ``path`` atomically and close it; returns the path."""
    out = atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    _pyplot().close(fig)
    return out


def _qualitative_colors(n: int) -> list:
    """``n`` distinct RGBA colours: tab10 up to 10, tab20 beyond (cycled past 20)."""
    cmap = _pyplot().get_cmap("tab20" if n > 10 else "tab10")
    return [cmap(i % cmap.N) for i in range(n)]


def matched_label_colors(domains, truth, domain_colors: dict | None = None) -> tuple[dict, dict]:
    """Colours for a domains panel and a ground-truth panel that can be compared at a glance.

    The truth labels keep the colours :func:`spot_maps` would give them by default (natural order); each
    domain takes the colour of the truth label it shares most annotated spots with, one to one (Hungarian
    assignment on the domain x label contingency table, ``scipy.optimize.linear_sum_assignment``); domains
    left over (more domains than labels) get colours no label uses. Display only: the domain names are
    not changed. Spots whose truth is missing ('n/a') take no part in the matching.
    With ``domain_colors`` (domain label -> colour, e.g. a reference slice's, ``cluster.reference``) the
    roles swap: the domains keep those colours and each truth label takes its matched domain's; labels left
    over get colours no domain uses.

    Returns (domain label -> colour, truth label -> colour), keyed by the label strings the figure shows.
    """
    from scipy.optimize import linear_sum_assignment

    dom, tru = _label_strings(domains), _label_strings(truth)
    if len(dom) != len(tru):
        raise ValueError(f"{len(dom)} domain labels but {len(tru)} truth labels")
    truth_cats = sorted((t for t in tru.unique() if t != "n/a"), key=_natural_key)
    dom_cats = sorted(dom.unique(), key=_natural_key)
    annotated = (tru != "n/a").to_numpy()
    table = pd.crosstab(dom[annotated], tru[annotated]).reindex(index=dom_cats, columns=truth_cats, fill_value=0)
    rows, cols = linear_sum_assignment(-table.to_numpy())
    match = {dom_cats[r]: truth_cats[c] for r, c in zip(rows, cols) if table.iat[r, c] > 0}
    if domain_colors is not None:
        from matplotlib.colors import to_hex

        fixed = {d: domain_colors[d] for d in dom_cats}
        label_of = {t: d for d, t in match.items()}
        used = {to_hex(c) for c in fixed.values()}
        spare = [c for c in _qualitative_colors(len(dom_cats) + len(truth_cats)) if to_hex(c) not in used]
        left = [t for t in truth_cats if t not in label_of]
        truth_colors = {t: fixed[label_of[t]] for t in label_of}
        truth_colors.update({t: spare[i % len(spare)] if spare else "#808080" for i, t in enumerate(left)})
        return fixed, truth_colors
    leftover = [d for d in dom_cats if d not in match]
    palette = _qualitative_colors(len(truth_cats) + len(leftover))
    truth_colors = {t: palette[i] for i, t in enumerate(truth_cats)}
    domain_colors = {d: truth_colors[match[d]] for d in match}
    domain_colors.update({d: palette[len(truth_cats) + i] for i, d in enumerate(leftover)})
    return domain_colors, truth_colors


def scanpy_colors(categories, colors: dict | None = None) -> list[str]:
    """Hex colours for ``categories`` (an obs column's categories, in order) as :func:`spot_maps` draws
    them (``colors``: label string -> colour, e.g. from :func:`matched_label_colors`; others take the
    default palette by natural order), for ``uns['<column>_colors']``, where scanpy's and squidpy's
    plots look for a column's colours."""
    from matplotlib.colors import to_hex

    labels = [str(c) for c in categories]
    natural = sorted(labels, key=_natural_key)
    default = dict(zip(natural, _qualitative_colors(len(natural))))
    return [to_hex((colors or {}).get(label, default[label])) for label in labels]


def no_gene_panels(path, key: str) -> None:
    """None of the genes ``key`` names (``plot.genes``, ...) can be drawn: ``path`` is not drawn, and an
    earlier run's copy (of other genes, maybe of another model) is removed so that it cannot pass for
    this run's figure."""
    import logging

    path = Path(path)
    removed = path.exists()
    if removed:
        path.unlink()
    logging.getLogger("stpipe").warning("%s: none of its genes can be drawn, so %s is not drawn%s", key, path,
                                        "; an earlier run's copy was removed" if removed else "")


def numeric_panel(values) -> bool:
    """Whether :func:`spot_maps` draws ``values`` (one per spot) with a colour bar rather than as labels with a
    legend: floats always (a confident mixture's uncertainty or a sparse gene has only a few distinct values, and
    each would otherwise become a legend entry such as '1.2e-11'), integers when they take more than 20 values;
    text, categories and booleans never."""
    kind = pd.Series(values).dtype.kind
    return kind == "f" or (kind in "iu" and pd.Series(values).nunique() > 20)


def percentile_ranges(panels: dict, low: float = 1.0, high: float = 99.0) -> dict:
    """{panel name: (the ``low``-th, the ``high``-th percentile of its finite values)} for :func:`spot_maps`'s
    ``value_ranges``, so that a few extreme spots (features of spots half off the tissue at its edge) do not
    squeeze every other spot into one colour; the clipped ends get arrows on the colour bar."""
    ranges = {}
    for name, values in panels.items():
        v = np.asarray(values, float)
        v = v[np.isfinite(v)]
        if v.size:
            lo, hi = np.percentile(v, [low, high])
            ranges[name] = (float(lo), float(hi)) if hi > lo else (float(v.min()), float(v.max()))
    return ranges


def spot_maps(coords_xy: np.ndarray, panels: dict, path, image=None, image_scale: float = 1.0,
              spot_size: float | None = None, ncols: int = 3, title: str | None = None,
              colors: dict | None = None, under_spots: bool = True, value_ranges: dict | None = None) -> Path:
    """One panel per entry of ``panels`` (name -> labels or numeric values per spot, or a tuple
    (own coordinates (m, 2) full-res px, values) for a panel on other locations, e.g. a grid).

    coords_xy: (n, 2) full-resolution pixels; ``image`` (H, W, 3) is drawn under the spots with
    image pixel = full-res pixel x ``image_scale`` (shrunk first to ``MAX_BACKGROUND_PX``), or, with
    ``under_spots=False``, only in the panels whose value is None (the H&E alone, beside the maps). Categorical panels get a legend, numeric ones a
    colour bar; a numeric panel on a square lattice (a super-resolution grid) is drawn as a raster,
    one cell per grid point (:func:`lattice_raster`). ``spot_size``: marker area in points^2; by
    default each marker spans 95% of the points' spacing (60% over an image, so the tissue shows
    between), so the spots tile the tissue at any spot count (a fixed area left a 14k-spot slide as
    faint dots on white). ``colors``: panel name -> {label: colour} for categorical panels (e.g. from
    :func:`matched_label_colors`); labels it leaves out, and panels not in it, get the default colours.
    A panel is numeric (:func:`numeric_panel`) when its values are floats, or integers of more than 20 values;
    ``value_ranges``: panel name -> (low, high) of its colour bar (default: its values' range). Written
    atomically to ``path``.
    """
    plt = _pyplot()
    from mpl_toolkits.axes_grid1 import make_axes_locatable
    if image is not None:
        from image_process.patches import shrink_image
        image, image_scale = shrink_image(image, image_scale, MAX_BACKGROUND_PX)
    xy = np.asarray(coords_xy, float) * image_scale
    n = len(panels)
    ncols = min(ncols, n)
    nrows = int(np.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 4.2 * nrows), squeeze=False)
    spacing = median_nearest_distance(xy) if spot_size is None else None
    fitted = []    # (axes, scatter, spacing) to size once the layout is final
    # every panel shows the same area: the spots and any grid with a margin (the image cropped to it)
    everything = np.vstack([xy] + [np.asarray(v[0], float) * image_scale for v in panels.values()
                                   if isinstance(v, tuple)])
    lo, hi = everything.min(0), everything.max(0)
    pad = 0.03 * (hi - lo).max()
    for ax, (name, values) in zip(axes.ravel(), panels.items()):
        pxy, size, panel_spacing = xy, spot_size or 4.0, spacing
        if isinstance(values, tuple):
            pxy = np.asarray(values[0], float) * image_scale
            values = values[1]
            if spot_size is None:
                panel_spacing = median_nearest_distance(pxy)
            else:
                size = spot_size * len(xy) / max(len(pxy), 1)
        if image is not None and under_spots and values is not None:
            ax.imshow(image, alpha=0.6)
        vals = None if values is None else pd.Series(values)
        if vals is None:                                     # the image alone, over the same area
            if image is not None:
                ax.imshow(image)
        elif numeric_panel(vals):
            raster = lattice_raster(pxy, vals.to_numpy(float)) if pxy is not xy else None
            low, high = (value_ranges or {}).get(name, (None, None))
            if raster is not None:
                sc = ax.imshow(raster[0], origin="lower", extent=raster[1], cmap="viridis", interpolation="nearest",
                               vmin=low, vmax=high)
            else:
                sc = ax.scatter(pxy[:, 0], pxy[:, 1], c=vals.to_numpy(float), s=size, cmap="viridis", linewidths=0,
                                marker="s" if pxy is not xy else "o", vmin=low, vmax=high)
                if panel_spacing:
                    fitted.append((ax, sc, panel_spacing))
            finite = vals.to_numpy(float)
            finite = finite[np.isfinite(finite)]
            below = bool(low is not None and finite.size and finite.min() < low)
            above = bool(high is not None and finite.size and finite.max() > high)
            bar_ax = make_axes_locatable(ax).append_axes("right", size="5%", pad=0.08)   # as tall as the map drawn
            fig.colorbar(sc, cax=bar_ax, extend=("both" if below and above else "min" if below   # arrows at the
                                                 else "max" if above else "neither"))        # ends the range clips
        else:
            labels = _label_strings(vals)
            cats = pd.Categorical(labels, categories=sorted(labels.unique(), key=_natural_key))   # 2 before 10
            default = _qualitative_colors(len(cats.categories))
            chosen = (colors or {}).get(name, {})
            for i, cat in enumerate(cats.categories):
                m = np.asarray(cats == cat)
                color = "lightgrey" if cat == "n/a" else chosen.get(cat, default[i])
                coll = ax.scatter(pxy[m, 0], pxy[m, 1], s=size, color=color, label=cat, linewidths=0)
                if panel_spacing:
                    fitted.append((ax, coll, panel_spacing))
            # beside the panel, not over the tissue (the spots fill the panel now)
            ax.legend(markerscale=2, fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False,
                      borderaxespad=0.2)
        ax.set_title(name, fontsize=10)
        ax.set_aspect("equal")
        ax.set_xlim(lo[0] - pad, hi[0] + pad)
        ax.set_ylim(hi[1] + pad, lo[1] - pad)   # y down, as in the image
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    _fill_lattice(fig, fitted, FILL if image is None or not under_spots else FILL_OVER_IMAGE)
    return _save_figure(fig, path)


PAGA_MIN_DRAWN = 0.05     # weaker PAGA connections are left out of the figure (they stay in uns['paga'])


def embedding_scatter(coords: np.ndarray, panels: dict, path, colors: dict | None = None,
                      title: str | None = None, graph: tuple | None = None) -> Path:
    """Labels over a 2-D view of an embedding (a UMAP): one panel per entry of ``panels`` (name -> (n,)
    labels), points in the colours ``colors`` gives (panel name -> {label: colour}, as :func:`spot_maps`
    takes them; others the default palette, 'n/a' grey and drawn first). ``coords``: (n, 2) in the view's own
    units (no image, no aspect kept). ``graph``: (panel name, group names, (g, g) connectivities in 0-1), a graph
    between that panel's labels (the domains' PAGA) drawn in a last panel: a node per group at the median of
    its points, sized by their number, an edge per connection of at least :data:`PAGA_MIN_DRAWN`, its width
    growing with it. Written atomically to ``path``."""
    plt = _pyplot()
    xy = np.asarray(coords, float)
    n_panels = len(panels) + (graph is not None)
    fig, axes = plt.subplots(1, n_panels, figsize=(4.6 * n_panels, 4.2), squeeze=False)
    size = float(np.clip(15000.0 / max(len(xy), 1), 1.0, 20.0))
    if graph is not None:
        _graph_panel(axes.ravel()[-1], xy, _label_strings(panels[graph[0]]), graph[1], graph[2],
                     (colors or {}).get(graph[0], {}))
    for ax, (name, values) in zip(axes.ravel(), panels.items()):
        labels = _label_strings(values)
        cats = sorted(labels.unique(), key=_natural_key)
        default = dict(zip(cats, _qualitative_colors(len(cats))))
        chosen = (colors or {}).get(name, {})
        for cat in sorted(cats, key=lambda c: c != "n/a"):          # unannotated spots underneath
            m = np.asarray(labels == cat)
            ax.scatter(xy[m, 0], xy[m, 1], s=size, linewidths=0, label=cat,
                       color="lightgrey" if cat == "n/a" else chosen.get(cat, default[cat]))
        handles, names = ax.get_legend_handles_labels()
        order = sorted(range(len(names)), key=lambda i: _natural_key(names[i]))
        ax.legend([handles[i] for i in order], [names[i] for i in order], markerscale=max(1.0, 8 / size ** 0.5),
                  fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False, borderaxespad=0.2)
        ax.set_title(name, fontsize=10)
        _umap_axes(ax)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save_figure(fig, path)


def _graph_panel(ax, xy: np.ndarray, labels, names, connectivities, colors: dict) -> None:
    """:func:`embedding_scatter`'s graph panel: the points in light grey, a node per group in ``names`` at the
    median of its points in ``xy``, edges of ``connectivities`` (g, g) >= :data:`PAGA_MIN_DRAWN`."""
    names = [str(g) for g in names]
    conn = np.asarray(connectivities, float)
    labels = np.asarray(labels, dtype=object)
    centre = np.array([np.median(xy[labels == g], axis=0) for g in names])
    count = np.array([(labels == g).sum() for g in names], float)
    default = dict(zip(names, _qualitative_colors(len(names))))
    ax.scatter(xy[:, 0], xy[:, 1], s=1, color="0.9", linewidths=0)
    for i, j in zip(*np.nonzero(np.triu(conn, 1) >= PAGA_MIN_DRAWN)):
        ax.plot(centre[[i, j], 0], centre[[i, j], 1], color="0.25", lw=0.5 + 6 * conn[i, j], zorder=2,
                solid_capstyle="round")
    ax.scatter(centre[:, 0], centre[:, 1], s=60 + 600 * count / max(count.max(), 1), zorder=3,
               color=[colors.get(g, default[g]) for g in names], edgecolors="black", linewidths=0.6)
    for (x, y), g in zip(centre, names):
        ax.annotate(g, (x, y), fontsize=8, ha="center", va="center", zorder=4)
    ax.set_title(f"PAGA of the domains (connectivity >= {PAGA_MIN_DRAWN:g})", fontsize=10)
    _umap_axes(ax)


def _umap_axes(ax) -> None:
    """A UMAP panel's axes: no ticks (its units mean nothing), labelled UMAP 1 and 2."""
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel("UMAP 1", fontsize=8)
    ax.set_ylabel("UMAP 2", fontsize=8)


def marker_dotplot(expression: np.ndarray, genes: list, domains, markers: dict, path,
                   colors: dict | None = None) -> Path:
    """A dot plot of each domain's marker genes: one row per domain, the columns its ``markers`` (domain ->
    genes, best first; at least one in all) in domain order; a dot's size is the share of the domain's spots
    where the gene is detected (``expression`` > 0), its colour the domain's mean ``expression`` scaled to 0-1
    per gene across the domains. ``expression``: (n, genes) log1p(CP10k) of the spots, ``domains`` their labels,
    ``colors``: domain -> colour for the row labels. Written atomically to ``path``."""
    plt = _pyplot()
    labels = _label_strings(pd.Series(domains))
    rows = sorted(labels.unique(), key=_natural_key)
    cols = list(dict.fromkeys(g for d in rows for g in markers.get(d, [])))
    index = {g: i for i, g in enumerate(genes)}
    x = np.asarray(expression)[:, [index[g] for g in cols]]
    mean = np.vstack([x[np.asarray(labels == d)].mean(0) for d in rows])
    share = np.vstack([(x[np.asarray(labels == d)] > 0).mean(0) for d in rows])
    span = mean.max(0) - mean.min(0)
    scaled = (mean - mean.min(0)) / np.where(span > 0, span, 1)
    fig, ax = plt.subplots(figsize=(max(3.0, 0.32 * len(cols) + 1.2) + 2.3, max(3.4, 0.36 * len(rows) + 1.6)))
    yy, xx = np.meshgrid(np.arange(len(rows)), np.arange(len(cols)), indexing="ij")
    dots = ax.scatter(xx.ravel(), yy.ravel(), s=12 + 140 * share.ravel(), c=scaled.ravel(), cmap="Reds",
                      vmin=0, vmax=1, edgecolors="grey", linewidths=0.3)
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels(cols, rotation=90, fontsize=8)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(rows, fontsize=8)
    for tick, d in zip(ax.get_yticklabels(), rows):
        if colors and d in colors:
            tick.set_color(colors[d])
    ax.set_xlim(-0.6, len(cols) - 0.4)
    ax.set_ylim(len(rows) - 0.4, -0.6)
    ax.set_ylabel("domain")
    ax.set_title("marker genes per domain (vs the other spots)", fontsize=10)
    from mpl_toolkits.axes_grid1 import make_axes_locatable
    divider = make_axes_locatable(ax)      # colour bar, then the size key, each in its own column (inches)
    fig.colorbar(dots, cax=divider.append_axes("right", size=0.15, pad=0.1),
                 label="mean expression (scaled per gene)")
    key = divider.append_axes("right", size=1.0, pad=0.7)
    key.axis("off")
    for frac in (0.25, 0.5, 1.0):
        key.scatter([], [], s=12 + 140 * frac, color="lightgrey", edgecolors="grey", linewidths=0.3,
                    label=f"{frac:.0%} of spots")
    key.legend(loc="upper left", frameon=False, fontsize=7, labelspacing=1.2, borderaxespad=0)
    fig.tight_layout()
    return _save_figure(fig, path)


def spread_labels(values: np.ndarray, height_in: float, label_in: float = 0.11) -> np.ndarray:
    """Heights (in ``values``' units) for one text label per value, in the values' order from bottom to top and at
    least one label height apart (``label_in`` inches on a plot ``height_in`` inches tall), each group of labels
    that would overlap centred on its values' mean and the others at their values, so that runs with equal or
    close scores keep readable names."""
    values = np.asarray(values, float)
    order = np.argsort(values, kind="stable")
    span = float(np.ptp(values)) or max(abs(float(values.mean())), 1.0) * 0.1
    gap = span * label_in / max(height_in * 0.7, 1e-6) * 1.1     # the data span fills ~70% of the axes' height
    groups = []                                   # [first index in order, size, centre], bottom to top
    for i, v in enumerate(values[order]):
        groups.append([i, 1, v])
        while len(groups) > 1:                    # merge with the group below while their labels would overlap
            (i0, n0, c0), (_, n1, c1) = groups[-2], groups[-1]
            if (c1 - (n1 - 1) * gap / 2) - (c0 + (n0 - 1) * gap / 2) >= gap - 1e-12:
                break
            groups[-2:] = [[i0, n0 + n1, values[order][i0:i0 + n0 + n1].mean()]]
    y = np.empty(len(values))
    for first, size, centre in groups:
        y[first:first + size] = centre + (np.arange(size) - (size - 1) / 2) * gap
    out = np.empty_like(y)
    out[order] = y
    return out


def metric_boxplots(table: pd.DataFrame, metrics: list, path) -> Path:
    """Each metric of ``metrics`` (columns of ``table``, one row per run, indexed by the runs' names: e.g.
    :func:`pipeline.summary.summarise`) over the runs: a box, every run a point with its name; a metric that no run
    has a value of is left out. Written atomically to ``path``."""
    plt = _pyplot()
    shown = [m for m in metrics if table[m].notna().any()]
    fig, axes = plt.subplots(1, max(len(shown), 1), figsize=(2.2 + 1.6 * len(table) ** 0.5, 4.2) if len(shown) <= 1
                             else (3.0 * len(shown), 4.2), squeeze=False)
    rng = np.random.default_rng(0)
    for ax, metric in zip(axes.ravel(), shown):
        values = table[metric].dropna()
        ax.boxplot(values.to_numpy(), widths=0.5, showfliers=False)
        x = 1 + rng.uniform(-0.15, 0.15, len(values))
        ax.scatter(x, values.to_numpy(), s=18, color="tab:blue", zorder=3)
        label_y = spread_labels(values.to_numpy(float), ax.get_figure().get_figheight())
        for xi, (run, v), ly in zip(x, values.items(), label_y):      # names in a column right of the box, in order
            ax.annotate(str(run)[-12:], (xi, v), xytext=(1.42, ly), textcoords="data", fontsize=6, va="center",
                        arrowprops={"arrowstyle": "-", "color": "0.6", "lw": 0.5, "shrinkA": 0, "shrinkB": 3})
        ax.set_xlim(0.6, 1.95)
        ax.set_xticks([])
        ax.set_title(f"{metric} (n = {len(values)}, median {values.median():.3f})", fontsize=9)
    if not shown:
        axes.ravel()[0].set_axis_off()
        axes.ravel()[0].text(0.5, 0.5, "no metric to show", ha="center", va="center")
    fig.tight_layout()
    return _save_figure(fig, path)
