"""Stage 4's learned image candidate: patch CNNs trained on the slide's own training pairs.

The stage-5 network (:class:`models.patch_cnn.PatchCNN`, trained from scratch, no downloaded
weights) maps the H&E patch around a location to that location's expression. In stage 4 it becomes
one more candidate estimate of the low-resolution base that the Restorer's per-gene stack combines
(:func:`pipeline.superres.fit_stack`):

* **Cross-fitted.** The stack is fitted on the training pairs, so the candidate's value at a
  training pair must not come from a network that saw that pair's expression. The pair locations
  (the slide's own and every ``train.sections`` block, pooled) are split into ``folds`` seeded
  parts; network k is trained on all parts but k and predicts part k (out of fold). At a query, the
  candidate is the mean of the ``folds`` networks. Nothing outside the context is used: the pairs'
  expression is the context's (or a training section's).
* **Fixed physical patch.** A patch is ``scale`` spot diameters of the slide (full-resolution px,
  converted to the image) whatever the spacing of the locations: a network trained at one
  magnification is applied at the same magnification. Trained on spots it predicts, at a finer grid
  point, the expression of a spot centred there; trained on super-spots (pooling protocol) the
  expression of a super-spot-like neighbourhood.
* **Units.** Targets and outputs are standardised log1p(CP10k) (each section by its own per-gene
  mean and sd, as every other candidate), patches are standardised per section and channel.
* **Needs pixels.** With ``use: auto`` the candidate is used only when every section's patch spans
  at least ``px / 2`` image pixels (i.e. it is not upsampled more than 2x): a 600 px low-resolution
  Visium image (~4 px per spot) has no texture for it to learn from.

Training length: ``max_epochs`` passes, fewer when a fold has many patches (at most
``patch_budget`` patch presentations per network), so many training sections do not multiply the time.
Prediction looks at each patch in ``tta`` orientations and averages them (1 by default: the patch as
it is; training already augments with all 8 rotations/reflections; 4 = the rotations, 8 = with their
mirror images, at 4x and 8x the cost). Both were set for time, each by a rule checked on MOB1-3
(DEVLOG 88-90: budget 10,000 and 4 orientations; DEVLOG 116-119: 1 orientation, which moved no
MOB cell's mean PCC-all by more than 0.0004).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np

from data.errors import InputError

log = logging.getLogger("stpipe")

PREDICT_CHUNK = 4096   # locations whose patches are cut and predicted at once (bounds memory on big grids)
PATCH_CNN_USES = ("auto", True, False)   # superres.patch_cnn.use


@dataclass
class PatchCandidateSettings:
    """``superres.patch_cnn`` (see configs/defaults.yaml). Fixed; never chosen by a score."""
    use: object = "auto"      # auto | true | false
    scale: float = 3.0        # patch side in spot diameters
    px: int = 48              # patch resampled to px x px
    folds: int = 2            # cross-fitting folds (= networks)
    max_epochs: int = 40
    patch_budget: int = 10000  # patch presentations per network at most
    tta: int = 1              # orientations averaged at prediction: 8 (rotations/reflections), 4 (rotations) or 1
    width: int = 16
    dim: int = 32
    dropout: float = 0.3
    batch: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-3

    @classmethod
    def from_config(cls, d: dict | None) -> "PatchCandidateSettings":
        d = dict(d or {})
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise InputError(f"superres.patch_cnn: unknown key(s) {unknown}; known: {sorted(cls.__dataclass_fields__)}.")
        s = cls(**d)
        if s.use not in PATCH_CNN_USES:
            raise InputError(f"superres.patch_cnn.use={s.use!r}: choose auto, true or false.")
        from models.patch_cnn_training import TEST_TRANSFORMS
        if s.tta not in TEST_TRANSFORMS:
            raise InputError(f"superres.patch_cnn.tta={s.tta!r}: choose one of {list(TEST_TRANSFORMS)} "
                             "(rotations/reflections averaged at prediction).")
        if s.scale <= 0 or int(s.px) < 16 or int(s.folds) < 2:
            raise InputError(f"superres.patch_cnn: need scale > 0, px >= 16, folds >= 2 "
                             f"(got scale={s.scale}, px={s.px}, folds={s.folds}).")
        return s


def patch_side_px(section, scale: float) -> float:
    """Side, in the section image's pixels, of a patch of ``scale`` spot diameters.
    ``section``: :class:`pipeline.superres.SectionImage`."""
    return float(scale) * section.spot_diameter * section.image.scale


def patch_candidate_wanted(settings: PatchCandidateSettings, sections: dict) -> bool:
    """Whether the candidate is used. ``sections``: {name: SectionImage} of the slide and every
    training section. ``auto``: only when no section's patch would be upsampled more than 2x."""
    from image_process.patches import patch_cnn_wanted

    sides = {n: (patch_side_px(s, settings.scale), s.image.source) for n, s in sections.items()}
    return patch_cnn_wanted(settings.use, sides, settings.px, settings.scale, "stage 4: the patch-CNN image candidate",
                            "superres.patch_cnn.use", "data.image")


def cut_patches(section, xy: np.ndarray, settings: PatchCandidateSettings) -> np.ndarray:
    """uint8 (n, px, px, 3) patches of ``scale`` spot diameters centred on ``xy`` (full-res px)."""
    from image_process.patches import extract_patches
    return extract_patches(section.image.pixels, np.asarray(xy, float) * section.image.scale,
                           patch_side_px(section, settings.scale), int(settings.px))


@dataclass
class PatchCandidate:
    """Cross-fitted patch CNNs; see the module docstring. ``fit`` returns the out-of-fold
    candidate of every training pair; ``predict`` the fold-mean candidate at new locations."""
    settings: PatchCandidateSettings
    seed: int = 0
    device: str = "cpu"
    nets: list = field(default_factory=list, repr=False)
    target_stats: tuple | None = None     # channel (mean, std) of the slide's own patches
    history: list = field(default_factory=list, repr=False)

    def _params(self, n_train: int, seed: int):
        from models.patch_cnn_training import PatchCNNParams
        s = self.settings
        epochs = int(min(s.max_epochs, max(1, math.ceil(s.patch_budget / max(n_train, 1)))))
        return PatchCNNParams(width=s.width, dim=s.dim, dropout=s.dropout, epochs=epochs, batch=s.batch, lr=s.lr,
                              weight_decay=s.weight_decay, align_weight=0.0, seed=seed)

    def fit(self, groups: list, target_section, target_xy: np.ndarray, progress: bool = False) -> list:
        """``groups``: [(SectionImage, xy (n_i, 2) full-res px, y (n_i, g) standardised expression)],
        one per block of training pairs; ``target_section``/``target_xy``: the slide and its context
        locations (their patches set the slide's channel statistics). Returns the out-of-fold
        predictions, one (n_i, g) array per group, in standardised units."""
        import torch

        from models.patch_cnn import patch_channel_stats, standardise_patches
        from models.patch_cnn_training import predict_patch_cnn, train_patch_cnn

        own = cut_patches(target_section, target_xy, self.settings)
        self.target_stats = patch_channel_stats(own)
        del own
        xs = []
        for sec, xy, _ in groups:
            p = cut_patches(sec, xy, self.settings)
            stats = self.target_stats if sec is target_section else patch_channel_stats(p)
            xs.append(standardise_patches(p, *stats))
        x = torch.cat(xs)
        y = torch.from_numpy(np.concatenate([g[2] for g in groups]).astype(np.float32))
        k = int(self.settings.folds)
        fold = np.random.default_rng(self.seed + 4242).permutation(len(x)) % k
        oof = np.zeros(tuple(y.shape), np.float32)
        self.nets, self.history = [], []
        for f in range(k):
            tr, te = np.flatnonzero(fold != f), np.flatnonzero(fold == f)
            net, hist = train_patch_cnn(x[tr], y[tr], self._params(len(tr), self.seed + f), self.device, progress)
            oof[te] = predict_patch_cnn(net, x[te], transforms=self.settings.tta)
            self.nets.append(net)
            self.history.append(hist["loss"])
        bounds = np.cumsum([0] + [len(g[1]) for g in groups])
        return [oof[a:b] for a, b in zip(bounds[:-1], bounds[1:])]

    def predict(self, section, xy: np.ndarray, progress: bool = False) -> np.ndarray:
        """(n, g) standardised candidate at ``xy`` on the slide: the mean over the fold networks."""
        from models.progress import progress_bar

        from models.patch_cnn import standardise_patches
        from models.patch_cnn_training import predict_patch_cnn

        if not self.nets:
            raise RuntimeError("PatchCandidate.predict before fit")
        out = []
        for s in progress_bar(range(0, len(xy), PREDICT_CHUNK), desc="patch CNN, predicting", unit="chunk",
                      disable=not progress or len(xy) <= PREDICT_CHUNK, leave=False):
            x = standardise_patches(cut_patches(section, xy[s:s + PREDICT_CHUNK], self.settings), *self.target_stats)
            out.append(np.mean([predict_patch_cnn(net, x, transforms=self.settings.tta) for net in self.nets], axis=0))
        g = self.nets[0].gene_head.out_features
        return np.concatenate(out).astype(np.float32) if out else np.zeros((0, g), np.float32)
