"""Stage 5 library: expression predicted from the H&E image alone (HESpotEx), and its ridge baseline.

Units: coordinates in full-resolution pixels of each section's image; expression log1p(CP10k) with
CP10k computed on all genes the section's table has (``obs['total_counts']``); image features as the
stage-1 encoder returns them, standardised here; nucleus counts per spot relative to the section's
mean (``density``); spot patches (second image stream) uint8 RGB cut from the same image.

A *section spec* is a mapping with the keys of the ``data`` config section (``path``, or
``counts``/``spots``, plus ``image``) and an optional ``name``. A spec with only ``image`` is a
whole-slide image without spots (see :mod:`pipeline.wsi_prediction`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from data import keys
from data.errors import InputError
from pipeline.preprocess import GENE_CHUNK, match_gene_names, warn_genes_left_out

log = logging.getLogger("stpipe")

VISIUM_SPOT_UM = (55.0, 100.0)      # spot diameter, centre-to-centre spacing (micrometres)
LEGACY_ST_SPOT_UM = (100.0, 200.0)
FEATURE_NORMS = ("section", "global")   # predict.feature_norm


@dataclass
class Section:
    """One section: spots, their image features and nucleus counts, and (when measured) counts."""
    name: str
    obs_names: pd.Index
    xy: np.ndarray                 # (n, 2) spot centres, full-resolution px of ``image_source``
    spacing: float                 # centre-to-centre spot distance, same px
    features: np.ndarray           # (n, f) raw encoder features
    nucleus: np.ndarray            # (n, 8) nucleus statistics (image_process.nuclei); column 0 = count
    image_source: str
    spot_um: tuple | None = LEGACY_ST_SPOT_UM    # (diameter, spacing) um of the platform; None: not known
    counts: sp.csr_matrix | None = None   # (n, G) raw counts, genes = var_names
    total_counts: np.ndarray | None = None
    var_names: pd.Index | None = None
    info: dict = field(default_factory=dict)
    patches: np.ndarray | None = None     # (n, S, S, 3) uint8 spot patches for the patch CNN, or None
    patch_side_px: float | None = None    # the patches' side in pixels of the section's image, before resizing
    plot_entry: dict = field(default_factory=dict, repr=False)   # uns['spatial'] entry (image <= 2000 px) for plots
    gene_ids: pd.Index | None = None      # the genes' Ensembl ids when the reader named them by symbol instead

    def name_genes_like(self, genes) -> None:
        """Name this section's genes by their ids (``gene_ids``) when ``genes`` (a model's) are ids that
        only those match: a model trained on an .h5ad named by Ensembl id before the readers took its
        symbols (:func:`data.readers.read_h5ad`) still meets the same file's genes."""
        if self.gene_ids is None or set(genes) & set(self.var_names) or not set(genes) & set(self.gene_ids):
            return
        log.info("section %s: the model names genes by id; using the section's var['gene_ids']", self.name)
        self.var_names = self.gene_ids

    @property
    def n(self) -> int:
        return len(self.xy)

    @property
    def nuclei(self) -> np.ndarray:
        """(n,) nuclei counted under each spot."""
        return self.nucleus[:, 0]

    def model_inputs(self, with_nucleus: bool) -> np.ndarray:
        """The features a model sees: encoder features, plus the nucleus statistics if asked."""
        return np.hstack([self.features, self.nucleus]) if with_nucleus else self.features

    @property
    def density(self) -> np.ndarray:
        """Nuclei per spot relative to the section's mean (see :func:`relative_density`)."""
        return relative_density(self.nuclei)

    def expression(self, genes) -> np.ndarray:
        """(n, len(genes)) log1p(CP10k); a gene the section's table lacks counts as not detected (0)."""
        if self.counts is None:
            raise InputError(f"section {self.name}: has no expression (image-only section).")
        idx = self.var_names.get_indexer(list(genes))
        out = np.zeros((self.n, len(idx)), np.float32)
        have = idx >= 0
        if have.any():
            sub = self.counts[:, idx[have]]
            sub = sub.toarray() if sp.issparse(sub) else np.asarray(sub)
            out[:, have] = np.log1p(sub * (1e4 / np.maximum(self.total_counts, 1.0))[:, None])
        return out


def relative_density(nuclei: np.ndarray) -> np.ndarray:
    """Nuclei per spot relative to the mean over the section or slide (1 = average), floored at 0.05;
    all ones when no nucleus was found."""
    nuclei = np.asarray(nuclei, np.float32)
    m = float(nuclei.mean()) if len(nuclei) else 0.0
    return np.maximum(nuclei / m, 0.05).astype(np.float32) if m > 0 else np.ones(len(nuclei), np.float32)


def spot_size_um(adata) -> tuple | None:
    """(spot diameter, spacing) in micrometres from what the spots are: a Visium HD bin (side = spacing =
    ``bin_size_um`` of its scale factors), Visium HD cells (the median cell diameter and distance to the
    nearest cell, by the scale factors' ``microns_per_pixel``), Visium where Space Ranger's scale factors
    give a spot diameter and the spots lie on a hexagonal array, else legacy ST where they lie on an array
    (square, or staggered as MOB's). None for spots on no array (a cell-based store, an .h5ad off any
    lattice), whose size in micrometres is not known."""
    from data.lattice import is_hex_grid

    sf = keys.scalefactors(adata)
    if sf.get("bin_size_um"):
        return (float(sf["bin_size_um"]), float(sf["bin_size_um"]))
    if keys.CELL_AREA in adata.obs and sf.get("microns_per_pixel") and sf.get("spot_diameter_fullres"):
        from positions_enhancement.spatial_weights import estimate_spot_spacing
        mpp = float(sf["microns_per_pixel"])
        return (float(sf["spot_diameter_fullres"]) * mpp, estimate_spot_spacing(adata.obsm[keys.SPATIAL]) * mpp)
    if keys.ARRAY_COL not in adata.obs or keys.ARRAY_ROW not in adata.obs:
        return None
    hexagonal = is_hex_grid(adata.obs[[keys.ARRAY_COL, keys.ARRAY_ROW]].to_numpy())
    return VISIUM_SPOT_UM if sf.get("spot_diameter_fullres") and hexagonal else LEGACY_ST_SPOT_UM


NEEDS_IMAGE = "Stage 5 predicts expression from the H&E image"   # why a section without an image is refused


def load_section(spec: dict, image_cfg: dict, device: str = "cpu", patch: dict | None = None) -> Section:
    """Read a section spec and compute its spot image features and nucleus counts.

    The image is the full-resolution one (``image``) when given, else the Space Ranger folder's
    hires/lowres PNG; spots are checked to land on it (:func:`check_spots_on_image`).
    ``patch`` ({'scale': spot diameters, 'px': side}, see :func:`patch_geometry`): also cut each
    spot's patch for the patch CNN (``Section.patches``).
    """
    from pipeline.sections import read_section

    adata, image, diameter = read_section(spec, image_cfg, "section", NEEDS_IMAGE)
    return section_from_slide(spec["name"], adata, image, diameter, image_cfg, device, patch)


def section_from_slide(name: str, adata, image, diameter: float, image_cfg: dict, device: str = "cpu",
                       patch: dict | None = None) -> Section:
    """A :class:`Section` named ``name`` from a slide already read (``adata`` as the readers return it,
    ``image`` its :class:`SlideImage`, closed here once read, ``diameter`` the spot diameter in full-resolution px):
    spot image features, nucleus statistics and, with ``patch``, the patch CNN's patches (see
    :func:`load_section`)."""
    from image_process.features import spot_image_features
    from image_process.nuclei import nucleus_features
    from image_process.patches import extract_patches, scanpy_spatial_entry
    from positions_enhancement.spatial_weights import estimate_spot_spacing

    try:
        feats, info = spot_image_features(adata, image_cfg, device, image=image)
        nucleus, thr = nucleus_features(image.pixels, adata.obsm[keys.SPATIAL] * image.scale, diameter * image.scale)
        patches = side = None
        if patch:
            side = diameter * image.scale * float(patch["scale"])
            patches = extract_patches(image.pixels, adata.obsm[keys.SPATIAL] * image.scale, side, int(patch["px"]))
        plot_entry = scanpy_spatial_entry(image, diameter)
    finally:
        image.close()        # the section keeps what it needs; a streamed image holds its file open
    arr = adata.obs[[keys.ARRAY_COL, keys.ARRAY_ROW]].to_numpy() if keys.ARRAY_COL in adata.obs else None
    spacing = estimate_spot_spacing(adata.obsm[keys.SPATIAL], arr)
    info.update(nucleus_threshold=thr, n_spots=int(adata.n_obs))
    return Section(name=name, obs_names=adata.obs_names.copy(), xy=np.asarray(adata.obsm[keys.SPATIAL], float),
                   spacing=float(spacing), features=feats, nucleus=nucleus, image_source=str(info["image"]),
                   spot_um=spot_size_um(adata), counts=sp.csr_matrix(adata.X),
                   total_counts=adata.obs[keys.TOTAL_COUNTS].to_numpy(float), var_names=adata.var_names.copy(),
                   info=info, patches=patches, patch_side_px=side, plot_entry=plot_entry,
                   gene_ids=pd.Index(adata.var["gene_ids"].astype(str)) if "gene_ids" in adata.var else None)


# ------------------------------------------------------------------------------------------
# genes, folds, features
# ------------------------------------------------------------------------------------------
def top_mean_genes(sections: list[Section], n: int = 250) -> list[str]:
    """The ``n`` genes with the highest mean log1p(CP10k) over the spots of ``sections`` pooled
    (the ST-Net/TRIPLEX convention). A gene absent from a section's table counts as 0 there."""
    union = pd.Index(sorted(set().union(*[set(s.var_names) for s in sections])))
    total = np.zeros(len(union))
    n_spots = 0
    for s in sections:
        for start in range(0, len(union), GENE_CHUNK):   # a full Visium table has ~33,000 genes
            total[start:start + GENE_CHUNK] += s.expression(union[start:start + GENE_CHUNK]).sum(0)
        n_spots += s.n
    order = np.argsort(-total, kind="stable")[:n]
    return [union[i] for i in order]


def check_training_genes(train: list[Section], genes: list[str]) -> None:
    """Refuse a training section whose gene identifiers barely meet the other sections' (under 10% of
    the smaller table: Ensembl ids vs symbols, or another species' capitalisation), which would be
    trained on as zero expression for the others' genes; warn when a section lacks more than half of
    the chosen ``genes`` (they count as zero there)."""
    for s in train:
        others = [t for t in train if t is not s]
        if others:
            theirs = pd.Index(sorted(set().union(*[set(t.var_names) for t in others])))
            shared = int(pd.Index(s.var_names).isin(theirs).sum())
            if shared < 0.1 * min(len(s.var_names), len(theirs)):
                raise InputError(
                    f"train.sections {s.name}: only {shared} of its {len(s.var_names)} genes (e.g. "
                    f"{', '.join(map(str, list(s.var_names)[:3]))}) are in {', '.join(t.name for t in others)} (e.g. "
                    f"{', '.join(map(str, list(theirs)[:3]))}); are the gene identifiers of the same kind (symbols vs "
                    "Ensembl ids) and the species the same?")
        have = int(pd.Index(genes).isin(s.var_names).sum())
        if have < len(genes) / 2:
            log.warning("train.sections %s has only %d of the %d chosen genes; the others count as zero expression "
                        "there", s.name, have, len(genes))


def restrict_genes(genes: list[str], wanted) -> list[str]:
    """``wanted`` genes (config) that the model knows, in the model's order; an error if none."""
    if not wanted:
        return genes
    found, missing = match_gene_names(wanted, genes, "predict.genes")
    keep = [g for g in genes if g in set(found)]
    if not keep:
        raise InputError(f"predict.genes: none of the {len(wanted)} genes asked for (e.g. {list(wanted)[:3]}) is "
                         f"among the {len(genes)} genes the model predicts (e.g. {genes[:3]}).")
    if missing:
        log.warning("predict.genes: %d gene(s) not predicted by the model, ignored: %s", len(missing), missing[:10])
    return keep


def leave_one_out_folds(names: list[str]) -> list[tuple[list[str], str]]:
    """(training names, test name) for each section; asserts the test section is never in training."""
    folds = []
    for test in names:
        train = [n for n in names if n != test]
        assert test not in train, "leave-one-out: the test section entered training"
        folds.append((train, test))
    return folds


@dataclass
class FeatureScaler:
    """Standardise image features. ``mode='section'``: every section by its own mean/std (removes
    staining and scanner differences between sections; uses only that section's image);
    ``mode='global'``: by the training sections' pooled mean/std."""
    mode: str = "section"
    mean: np.ndarray | None = None
    std: np.ndarray | None = None

    def fit(self, feature_blocks: list[np.ndarray]) -> "FeatureScaler":
        X = np.concatenate(feature_blocks)
        self.mean, self.std = X.mean(0), X.std(0) + 1e-6
        return self

    def transform(self, X: np.ndarray) -> np.ndarray:
        if self.mode == "section":
            Z = (X - X.mean(0)) / (X.std(0) + 1e-6)
        elif self.mode == "global":
            Z = (X - self.mean) / self.std
        else:
            raise InputError(f"predict.feature_norm={self.mode!r}: choose section or global.")
        return np.clip(Z, -6, 6).astype(np.float32)


def spatial_edge_index(xy: np.ndarray, spacing: float, radius: float = 1.5) -> np.ndarray:
    """(2, m) directed edges between spots within ``radius`` x spacing (both directions listed)."""
    from pipeline.graphs import RadiusGraph

    A = RadiusGraph(radius * spacing).build(np.asarray(xy, float)).tocoo()
    return np.vstack([A.row, A.col]).astype(np.int64)


# ------------------------------------------------------------------------------------------
# ridge baseline
# ------------------------------------------------------------------------------------------
RIDGE_ALPHAS = (0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0)


def ridge_fit_predict(train: list[Section], test_features: list[np.ndarray], genes: list[str],
                      n_features: int | None = None, alphas=RIDGE_ALPHAS,
                      feature_norm: str = "global") -> tuple[list[np.ndarray], dict]:
    """Ridge regression from handcrafted patch features to log1p(CP10k), alpha chosen by
    leave-one-training-section-out CV (mean per-gene PCC) -- the test sections never take part.

    ``n_features`` keeps the first columns of the features (the handcrafted encoder lists scales in
    order, so 44 = the two smallest scales). Features standardised with the training pool
    (``feature_norm='global'``, the issue's baseline) or each section by itself (``'section'``).
    Returns (predictions per test block, {'alpha', 'cv_pcc'}).
    """
    from sklearn.linear_model import Ridge

    from pipeline.metrics import per_gene_pearson

    def cols(X):
        return X[:, :n_features] if n_features else X

    Xs = [cols(s.features) for s in train]
    Ys = [s.expression(genes) for s in train]
    cv = {}
    if len(train) >= 2:
        for a in alphas:
            rs = []
            for i in range(len(train)):
                fit_idx = [j for j in range(len(train)) if j != i]
                sc = FeatureScaler(feature_norm).fit([Xs[j] for j in fit_idx])
                m = Ridge(alpha=a).fit(np.concatenate([sc.transform(Xs[j]) for j in fit_idx]),
                                       np.concatenate([Ys[j] for j in fit_idx]))
                rs.append(np.nanmean(per_gene_pearson(m.predict(sc.transform(Xs[i])), Ys[i])))
            cv[a] = float(np.mean(rs))
        alpha = max(cv, key=cv.get)
    else:
        alpha = 100.0
    sc = FeatureScaler(feature_norm).fit(Xs)
    m = Ridge(alpha=alpha).fit(np.concatenate([sc.transform(x) for x in Xs]), np.concatenate(Ys))
    return [m.predict(sc.transform(cols(X))).astype(np.float32) for X in test_features], \
        {"alpha": alpha, "cv_pcc": cv}


def prediction_scores(pred: np.ndarray, measured: np.ndarray, genes: list[str], n_heg: int = 50) -> dict:
    """pcc_all (mean per-gene Pearson r over the section's spots; genes constant in either are skipped),
    pcc_heg (the same over the first ``n_heg`` genes: ``genes`` come ordered by their mean in the
    training sections, so these are the highest-mean genes, chosen without the test section),
    mse, n_genes. A gene whose ``measured`` column is NaN (not in the section's count table) is left
    out of all of them."""
    from pipeline.metrics import per_gene_pearson

    scored = np.isfinite(measured).all(0)
    r = np.full(len(genes), np.nan)
    r[scored] = per_gene_pearson(pred[:, scored], measured[:, scored])
    heg = np.arange(min(n_heg, len(genes)))
    return {"pcc_all": float(np.nanmean(r)), "pcc_heg": float(np.nanmean(r[heg])),
            "mse": float(np.mean((pred[:, scored] - measured[:, scored]) ** 2)), "n_genes": int(np.isfinite(r).sum())}


def train_seeded(n_models, seed: int, train_one) -> tuple[list, list]:
    """Train ``max(1, n_models)`` networks with seeds ``seed, seed+1, ...``: ``train_one(seed)`` returns
    (network, history); returns (their state dicts on CPU, their histories)."""
    states, histories = [], []
    for k in range(max(1, int(n_models))):
        net, hist = train_one(seed + k)
        states.append({kk: v.detach().cpu() for kk, v in net.state_dict().items()})
        histories.append(hist)
    return states, histories


# ------------------------------------------------------------------------------------------
# the second image stream: patch CNNs trained here
# ------------------------------------------------------------------------------------------
PATCH_PARAM_KEYS = ("width", "dropout", "epochs", "batch", "lr", "weight_decay", "align_weight")


def patch_geometry(predict_cfg: dict) -> dict | None:
    """{'scale': patch side in spot diameters, 'px': side in pixels} of ``predict.patch_cnn``, or
    None when the patch CNN stream is off (``use: false``). With ``use: auto`` the sections are cut
    their patches and :func:`patch_stream_wanted` decides from them."""
    from pipeline.superres_patches import PATCH_CNN_USES

    pc = predict_cfg.get("patch_cnn") or {}
    use = pc.get("use", False)
    if use not in PATCH_CNN_USES and use is not None:
        raise InputError(f"predict.patch_cnn.use={use!r}: choose auto, true or false.")
    if not use:
        return None
    scale, px = float(pc.get("scale", 3.0)), int(pc.get("px", 48))
    if scale <= 0 or px < 16:
        raise InputError(f"predict.patch_cnn: scale must be > 0 spot diameters and px >= 16 (got {scale}, {px}).")
    return {"scale": scale, "px": px}


def patch_stream_wanted(train: list[Section], predict_cfg: dict) -> bool:
    """Whether the patch CNN stream is trained. ``predict.patch_cnn.use``: false, never; true, always (with
    a warning when a training section's patches are upsampled more than 2x); auto (the default), only when
    none is: a 3-diameter patch of a 600 px low-resolution Visium image is ~13 px, upsampled to 48 px it
    has no texture to learn from, and training on it took ~10 minutes of 2 cores (stage 4's rule,
    :func:`image_process.patches.patch_cnn_wanted`)."""
    from image_process.patches import patch_cnn_wanted

    geometry = patch_geometry(predict_cfg)
    if geometry is None:
        return False
    sides = {s.name: (s.patch_side_px, s.image_source) for s in train if s.patch_side_px is not None}
    return patch_cnn_wanted(predict_cfg["patch_cnn"]["use"], sides, geometry["px"], geometry["scale"],
                            "stage 5: the patch CNN stream", "predict.patch_cnn.use", "the section's 'image'")


@dataclass
class PatchStream:
    """Patch CNNs (:class:`models.patch_cnn.PatchCNN`, one per seed) and how to use them.

    ``geometry``: see :func:`patch_geometry`; ``gene_mean``/``gene_std`` (g,): the training spots'
    log1p(CP10k) statistics that turn the networks' standardised outputs back into log units;
    ``weight``: the stream's share of the final prediction.
    """
    geometry: dict
    params: dict
    weight: float
    gene_mean: np.ndarray
    gene_std: np.ndarray
    states: list
    _nets: list = field(default_factory=list, repr=False)

    def networks(self, device: str = "cpu"):
        from models.patch_cnn import PatchCNN
        if not self._nets:
            for st in self.states:
                net = PatchCNN(len(self.gene_mean), self.params["width"], self.params["dim"], self.params["dropout"])
                net.load_state_dict(st)
                self._nets.append(net.eval())
        return [n.to(device) for n in self._nets]

    def expression(self, patches: np.ndarray, stats: tuple | None = None, device: str = "cpu") -> np.ndarray:
        """(n, g) log1p(CP10k) from uint8 patches (n, S, S, 3), the mean over the networks.
        ``stats``: the section's channel (mean, std) (default: those of ``patches``)."""
        from models.patch_cnn import patch_channel_stats, standardise_patches
        from models.patch_cnn_training import predict_patch_cnn

        if len(patches) == 0:
            return np.zeros((0, len(self.gene_mean)), np.float32)
        x = standardise_patches(patches, *(stats or patch_channel_stats(patches)))
        z = np.mean([predict_patch_cnn(net, x) for net in self.networks(device)], axis=0)
        return (z * self.gene_std + self.gene_mean).astype(np.float32)

    def payload(self) -> dict:
        import torch
        return {"geometry": dict(self.geometry), "params": dict(self.params), "weight": float(self.weight),
                "gene_mean": torch.from_numpy(np.asarray(self.gene_mean, np.float32)),
                "gene_std": torch.from_numpy(np.asarray(self.gene_std, np.float32)), "states": self.states}

    @classmethod
    def from_payload(cls, d: dict | None) -> "PatchStream | None":
        if not d:
            return None
        return cls(geometry=dict(d["geometry"]), params=dict(d["params"]), weight=float(d["weight"]),
                   gene_mean=d["gene_mean"].numpy(), gene_std=d["gene_std"].numpy(), states=list(d["states"]))


def fit_patch_stream(train: list[Section], genes: list[str], predict_cfg: dict, seed: int = 0,
                     device: str = "cpu", progress: bool = False,
                     embeddings: list | None = None) -> tuple[PatchStream, list]:
    """Train ``predict.patch_cnn.n_models`` patch CNNs (seeds ``seed, seed+1, ...``) on the training
    sections' patches (each section's channels standardised by its own statistics) to their
    standardised log1p(CP10k), and their image embeddings (dimension ``predict.dim``) to the
    sections' expression embeddings ``embeddings`` (one (n_s, dim) tensor per section, from the
    graph stream's autoencoder) when given; return (stream, per-network loss histories)."""
    import torch

    from models.patch_cnn import patch_channel_stats, standardise_patches
    from models.patch_cnn_training import PatchCNNParams, train_patch_cnn

    pc = predict_cfg["patch_cnn"]
    missing = [s.name for s in train if s.patches is None]
    if missing:
        raise InputError(f"training sections {missing} were loaded without spot patches, which predict.patch_cnn "
                         "needs: load them with load_section(..., patch=patch_geometry(predict_cfg)).")
    x = torch.cat([standardise_patches(s.patches, *patch_channel_stats(s.patches)) for s in train])
    y = np.concatenate([s.expression(genes) for s in train])
    mean, std = y.mean(0), y.std(0) + 1e-3
    target = torch.from_numpy(((y - mean) / std).astype(np.float32))
    params = dict(PatchCNNParams().__dict__, **{k: pc[k] for k in PATCH_PARAM_KEYS if k in pc},
                  dim=int(predict_cfg.get("dim", PatchCNNParams.dim)))
    params.pop("seed")
    z = None if embeddings is None else torch.cat(list(embeddings)).float()
    stream = PatchStream(geometry=patch_geometry(predict_cfg), params=params, weight=float(pc.get("weight", 0.5)),
                         gene_mean=mean.astype(np.float32), gene_std=std.astype(np.float32), states=[])
    stream.states, histories = train_seeded(
        pc.get("n_models", 1), seed,
        lambda sd: train_patch_cnn(x, target, PatchCNNParams(**params, seed=sd), device, progress, z))
    return stream, histories


# ------------------------------------------------------------------------------------------
# the trained predictor (HESpotEx networks + everything needed to featurise a new image)
# ------------------------------------------------------------------------------------------
MODEL_FORMAT = "stpipe-hespotex-1"
PARAM_KEYS = ("dim", "hidden", "n_gcn", "dropout", "ae_epochs", "epochs", "lr", "weight_decay",
              "align_weight", "mse_weight", "pcc_weight")
IMAGE_KEYS = ("use", "encoder", "weights", "patch_size_fullres", "options")


@dataclass
class Predictor:
    """Trained HESpotEx networks (one per seed, predictions averaged) and how to feed them.

    With a ``patch_stream`` (patch CNNs trained here), the prediction is
    ``(1 - w) * graph stream + w * patch stream``, ``w = patch_stream.weight``.

    ``image`` holds the stage-1 image settings the features were made with (a new section is
    featurised the same way); ``nucleus_features``: whether the per-spot nucleus statistics
    (:mod:`image_process.nuclei`) are appended to them; ``scaler_mean``/``scaler_std`` the training pool's feature statistics
    (used when ``feature_norm == 'global'``); ``spot_um`` the training platform's spot diameter and
    spacing in micrometres (the default grid of a whole-slide image), None when not known.
    """
    genes: list
    states: list
    params: dict
    n_features: int
    feature_norm: str
    scaler_mean: np.ndarray
    scaler_std: np.ndarray
    image: dict
    spot_um: tuple | None
    graph_radius: float
    train_sections: list
    nucleus_features: bool = False
    patch_stream: PatchStream | None = None
    _nets: list = field(default_factory=list, repr=False)

    @property
    def patch_geometry(self) -> dict | None:
        """Patch geometry a section must be loaded with (None: the model has no patch stream)."""
        return None if self.patch_stream is None else dict(self.patch_stream.geometry)

    def networks(self, device: str = "cpu"):
        from models.hespotex import ImageToExpression
        if not self._nets:
            for st in self.states:
                net = ImageToExpression(self.n_features, len(self.genes), self.params["dim"], self.params["hidden"],
                                        self.params["n_gcn"], self.params["dropout"])
                net.load_state_dict(st)
                self._nets.append(net.eval())
        return [n.to(device) for n in self._nets]

    def sample(self, features: np.ndarray, xy: np.ndarray, spacing: float, density: np.ndarray, expr=None):
        import torch

        from models.hespotex_training import GraphSample

        if features.shape[1] != self.n_features:
            raise InputError(f"image features have {features.shape[1]} columns but the model was trained on "
                             f"{self.n_features}; featurise with the model's image settings {self.image}.")
        sc = FeatureScaler(self.feature_norm, self.scaler_mean, self.scaler_std)
        return GraphSample(torch.from_numpy(sc.transform(features)),
                           torch.from_numpy(spatial_edge_index(xy, spacing, self.graph_radius)),
                           torch.from_numpy(np.asarray(density, np.float32)),
                           None if expr is None else torch.from_numpy(expr))

    def predict(self, features, xy, spacing, density, device: str = "cpu",
                patch_expression: np.ndarray | None = None) -> np.ndarray:
        """(n, len(genes)) predicted log1p(CP10k): the mean over the graph-stream networks, blended
        with ``patch_expression`` ((n, g), :meth:`PatchStream.expression`) when the model has a patch
        stream."""
        from models.hespotex_training import predict_hespotex

        s = self.sample(features, xy, spacing, density)
        out = np.mean([predict_hespotex(net, s) for net in self.networks(device)], axis=0)
        if self.patch_stream is not None:
            if patch_expression is None or patch_expression.shape != out.shape:
                raise ValueError("this model has a patch CNN stream: pass its (n, g) patch_expression")
            w = self.patch_stream.weight
            out = (1 - w) * out + w * patch_expression
        return out.astype(np.float32)

    def predict_section(self, section: Section, device: str = "cpu") -> np.ndarray:
        patch_expression = None
        if self.patch_stream is not None:
            if section.patches is None:
                raise InputError(f"section {section.name}: the model needs spot patches; load the section with "
                                 f"patch={self.patch_geometry}.")
            patch_expression = self.patch_stream.expression(section.patches, device=device)
        return self.predict(section.model_inputs(self.nucleus_features), section.xy, section.spacing,
                            section.density, device, patch_expression)

    def save(self, path) -> Path:
        import torch

        from pipeline.stages import save_tagged

        payload = {"genes": list(self.genes), "states": self.states, "params": self.params,
                   "n_features": int(self.n_features), "feature_norm": self.feature_norm,
                   "scaler_mean": torch.from_numpy(np.asarray(self.scaler_mean, np.float64)),
                   "scaler_std": torch.from_numpy(np.asarray(self.scaler_std, np.float64)),
                   "image": self.image, "spot_um": None if self.spot_um is None else list(self.spot_um),
                   "graph_radius": float(self.graph_radius),
                   "train_sections": list(self.train_sections), "nucleus_features": bool(self.nucleus_features),
                   "patch_stream": None if self.patch_stream is None else self.patch_stream.payload()}
        return save_tagged(path, MODEL_FORMAT, payload)

    @classmethod
    def load(cls, path) -> "Predictor":
        from pipeline.stages import load_tagged

        path = Path(path)
        if not path.exists():
            raise InputError(f"{path}: model file not found (predict.model_file).")
        try:
            d = load_tagged(path, MODEL_FORMAT)
        except ValueError as why:           # any unreadable file gets the same clear message
            raise InputError(f"{path}: not a model saved by predict_expression.py ({why}).") from None
        return cls(genes=list(d["genes"]), states=d["states"], params=dict(d["params"]), n_features=d["n_features"],
                   feature_norm=d["feature_norm"], scaler_mean=d["scaler_mean"].numpy(),
                   scaler_std=d["scaler_std"].numpy(), image=dict(d["image"]),
                   spot_um=None if d["spot_um"] is None else tuple(d["spot_um"]),
                   graph_radius=float(d["graph_radius"]), train_sections=list(d["train_sections"]),
                   nucleus_features=bool(d.get("nucleus_features", False)),
                   patch_stream=PatchStream.from_payload(d.get("patch_stream")))


def predict_section(predictor: "Predictor", sec: Section, genes: list, device: str = "cpu") -> tuple:
    """Predict the section ``sec`` (from :func:`load_section` or :func:`section_from_slide`, made with the
    model's image settings and patch geometry) with ``predictor`` and score it against its measured
    expression; ``genes``: the predicted genes kept (some or all of ``predictor.genes``, in its order).

    Returns (AnnData, scores): ``X`` predicted log1p(CP10k), ``obsm['spatial']`` the spots' full-resolution
    px, ``layers['measured']`` the measured log1p(CP10k) (NaN for a gene its count table lacks, left out of
    the scores), ``obs['nuclei']``, ``uns['prediction']`` (:func:`prediction_uns`), ``uns['spatial'][name]``
    the H&E at <= 2000 px; scores as :func:`prediction_scores`.
    """
    sec.name_genes_like(predictor.genes)
    if not set(predictor.genes) & set(sec.var_names):
        raise InputError(f"section {sec.name}: none of the model's {len(predictor.genes)} genes (e.g. "
                         f"{predictor.genes[:3]}) is in its count table (e.g. {list(sec.var_names[:3])}); "
                         "are the gene identifiers of the same kind (symbols vs Ensembl ids)?")
    gi = [predictor.genes.index(g) for g in genes]
    pred = predictor.predict_section(sec, device)[:, gi]
    measured = sec.expression(genes)
    absent = ~pd.Index(genes).isin(sec.var_names)
    if absent.any():   # not measured there (a gene subset), not "not detected": left out of the scores
        measured[:, absent] = np.nan
        log.warning("section %s: %d of the %d predicted genes are not in its count table (e.g. %s); they "
                    "are not scored there (layers['measured'] holds NaN for them)",
                    sec.name, int(absent.sum()), len(genes), [str(g) for g in np.array(genes)[absent][:3]])
    adata = predicted_anndata(pred, genes, sec.xy, sec.obs_names, predictor, sec.name, sec.nuclei, measured)
    adata.uns[keys.SPATIAL_UNS] = {sec.name: sec.plot_entry}
    return adata, prediction_scores(pred, measured, genes)


def predicted_anndata(pred, genes, xy, obs_names, predictor, name, nuclei, measured=None):
    """The AnnData of one predicted section or whole slide (keys: :func:`predict_section`)."""
    import anndata as ad

    out = ad.AnnData(X=pred, obs=pd.DataFrame({"nuclei": nuclei}, index=[str(o) for o in obs_names]),
                     var=pd.DataFrame(index=list(genes)))
    out.obsm[keys.SPATIAL] = np.asarray(xy, float)
    if measured is not None:
        out.layers[keys.MEASURED] = measured
    out.uns[keys.PREDICTION] = prediction_uns(predictor, name, genes)
    return out


def prediction_uns(predictor, name, genes, **extra) -> dict:
    """``uns['prediction']`` of a predicted section or whole slide (the one place that builds it)."""
    return {"model": "hespotex", "genes": list(genes), "section": name,
            "train_sections": list(predictor.train_sections), "n_models": len(predictor.states),
            "patch_cnn": None if predictor.patch_stream is None else
            {"n_models": len(predictor.patch_stream.states), "weight": predictor.patch_stream.weight,
             **predictor.patch_stream.geometry},
            "units": "log1p(CP10k)", **extra}


def settings_not_used(predictor: Predictor, cfg: dict) -> list[str]:
    """The config settings that a loaded model (``predict.model_file``) overrides, as
    ``'predict.dim=32 (model: 64)'``: a saved model predicts with the settings it was trained with
    (its networks, feature scaling, graph radius, patch stream and the stage-1 image settings its
    features need), so these keys of the config have no effect on the run."""
    pcfg, image_cfg = cfg.get("predict") or {}, cfg.get("image") or {}
    pc = pcfg.get("patch_cnn") or {}
    model = {**{f"predict.{k}": predictor.params.get(k) for k in PARAM_KEYS},
             "predict.n_genes": len(predictor.genes), "predict.n_models": len(predictor.states),
             "predict.feature_norm": predictor.feature_norm, "predict.nucleus_features": predictor.nucleus_features,
             "predict.graph_radius": predictor.graph_radius,
             "predict.patch_cnn.use": predictor.patch_stream is not None,
             **({"predict.patch_cnn.weight": predictor.patch_stream.weight} if predictor.patch_stream else {}),
             **{f"image.{k}": predictor.image.get(k) for k in IMAGE_KEYS}}
    given = {**{f"predict.{k}": v for k, v in pcfg.items()}, "predict.patch_cnn.use": bool(pc.get("use", False)),
             "predict.patch_cnn.weight": pc.get("weight"), **{f"image.{k}": image_cfg.get(k) for k in IMAGE_KEYS}}
    if pc.get("use") == "auto":         # decided by the training sections' images: not a setting the model overrides
        given.pop("predict.patch_cnn.use")
    differs = []
    for key, used in model.items():
        value = given.get(key)
        same = (value == used or (isinstance(value, (int, float)) and isinstance(used, (int, float))
                                  and np.isclose(float(value), float(used))))
        if key in given and not same:
            word = lambda v: "null" if v is None else str(v).lower() if isinstance(v, bool) else v   # noqa: E731
            differs.append(f"{key}={word(value)} (model: {word(used)})")
    return differs


def image_settings(image_cfg: dict) -> dict:
    """The stage-1 settings that define the features (stored with a model)."""
    return {k: image_cfg.get(k) for k in IMAGE_KEYS}


def fit_predictor(train: list[Section], predict_cfg: dict, image_cfg: dict, seed: int = 0,
                  device: str = "cpu", progress: bool = False) -> tuple[Predictor, dict]:
    """Train HESpotEx on the training sections only; return (predictor, training info).

    Genes: the top ``predict_cfg['n_genes']`` by mean log1p(CP10k) over the training sections.
    ``predict_cfg['n_models']`` networks with seeds ``seed, seed+1, ...`` are trained; their
    predictions are averaged. With ``predict_cfg['patch_cnn']['use']`` (``auto``: see
    :func:`patch_stream_wanted`), patch CNNs are trained as a second image stream
    (:func:`fit_patch_stream`; the sections need ``patches``). Nothing else is
    chosen: epochs and weights are fixed by the config.
    """
    from models.hespotex_training import HESpotExParams, train_hespotex

    if not train:
        raise InputError("train.sections is empty: stage 5 needs at least one section with expression and an "
                         "image to train on (or predict.model_file to reuse a trained model).")
    genes = top_mean_genes(train, int(predict_cfg.get("n_genes", 250)))
    restrict_genes(genes, predict_cfg.get("genes"))     # a predict.genes list that none of them meets: stop now, not after training
    warn_genes_left_out(predict_cfg.get("plot_genes"), genes, "predict.plot_genes", "genes the model will predict",
                        "the maps will leave them out (check the spelling, or raise predict.n_genes)")
    check_training_genes(train, genes)
    norm = predict_cfg.get("feature_norm", "section")
    with_nucleus = bool(predict_cfg.get("nucleus_features", False))
    scaler = FeatureScaler(norm).fit([s.model_inputs(with_nucleus) for s in train])
    params = {k: predict_cfg[k] for k in PARAM_KEYS if k in predict_cfg}
    spot_um = {s.spot_um for s in train}
    if len(spot_um) > 1:
        log.warning("training sections mix platforms (spot sizes %s um); the patch of each is its own spot", spot_um)
    pred = Predictor(genes=genes, states=[], params=dict(HESpotExParams().__dict__, **params),
                     n_features=int(train[0].model_inputs(with_nucleus).shape[1]), feature_norm=norm, scaler_mean=scaler.mean,
                     scaler_std=scaler.std, image=image_settings(image_cfg), spot_um=train[0].spot_um,
                     graph_radius=float(predict_cfg.get("graph_radius", 1.5)),
                     train_sections=[s.name for s in train], nucleus_features=with_nucleus)
    samples = [pred.sample(s.model_inputs(with_nucleus), s.xy, s.spacing, s.density, s.expression(genes)) for s in train]
    pred.states, histories = train_seeded(
        predict_cfg.get("n_models", 1), seed,
        lambda sd: train_hespotex(samples, HESpotExParams(**{kk: pred.params[kk] for kk in PARAM_KEYS}, seed=sd),
                                  device, progress))
    info = {"loss_first": [h["loss"][0] for h in histories], "loss_last": [h["loss"][-1] for h in histories],
            "n_train_spots": int(sum(s.n for s in train))}
    if patch_stream_wanted(train, predict_cfg):
        pred.patch_stream, cnn_histories = fit_patch_stream(train, genes, predict_cfg, seed, device, progress,
                                                            histories[0]["expression_embedding"])
        info.update(patch_loss_first=[h["loss"][0] for h in cnn_histories],
                    patch_loss_last=[h["loss"][-1] for h in cnn_histories])
    return pred, info
