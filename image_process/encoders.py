"""Image encoders behind one registry: name -> builder(weights=local path or None, **options).

* ``handcrafted`` (default, no weights): colour, stain (haematoxylin/eosin by colour
  deconvolution) and texture statistics of the spot patch at several scales.
* ``timm``: any timm backbone (``arch``: resnet50, vit_large_patch16_224, ...), weights loaded
  from a local file named in the config (``image.weights``); nothing is ever downloaded.
* pathology foundation models (:data:`FOUNDATION_MODELS`: ``uni``, ``uni2-h``, ``virchow2``,
  ``h-optimus-0``): the ``timm`` encoder with the architecture, options, input normalisation and
  pooling each one's weights were published with, so that ``image.weights`` alone (the file from its
  model card) is enough; ``image.options`` still override any of them.

Every encoder has ``encode(image_rgb, centers_xy, spot_px, device) -> (n_spots, d) float32`` where
``centers_xy`` are spot centres in the image's pixels and ``spot_px`` the spot diameter there, and
``extent``: the side of the largest patch it cuts, in spot diameters (whole-slide tiling margins).
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Callable

import numpy as np

from data.errors import InputError
from image_process.patches import extract_patches

log = logging.getLogger("stpipe")
ENCODERS: dict[str, Callable] = {}


def register(name: str):
    def deco(builder):
        ENCODERS[name] = builder
        return builder
    return deco


def build_encoder(name: str, weights: str | None = None, **options):
    """Instantiate the encoder registered under ``name``."""
    if name not in ENCODERS:
        raise InputError(f"image.encoder={name!r} is unknown; choose one of {sorted(ENCODERS)}.")
    return ENCODERS[name](weights=weights, **options)


# ------------------------------------------------------------------------------------------
@register("handcrafted")
class HandcraftedEncoder:
    """Colour / stain / texture statistics at several patch scales (no weights needed).

    Per scale (patch side = spot diameter x scale, resized to ``size`` px), 22 features:
    RGB mean and std (6); haematoxylin and eosin optical density mean and std (4); grey-level
    10/50/90th percentiles (3); gradient magnitude mean and std (2); Laplacian energy (1);
    fraction of haematoxylin-dense (nucleus-like) pixels (1); radial power-spectrum energy in 5
    frequency bands (5). Default scales (1, 2, 4) give 66 features.
    """

    FEATURES_PER_SCALE = 22

    def __init__(self, weights=None, scales=(1.0, 2.0, 4.0), size: int = 32, **unknown):
        if weights:
            raise InputError("image.encoder=handcrafted takes no weights; unset image.weights.")
        if unknown:
            raise InputError(f"image.options: {sorted(unknown)} mean nothing to image.encoder=handcrafted, which takes "
                             "scales (patch sides in spot diameters, e.g. [1, 2, 4]) and size (px a patch is resized "
                             "to); arch and timm's options belong to image.encoder=timm.")
        try:
            self.scales = tuple(float(s) for s in (scales if isinstance(scales, (list, tuple)) else [scales]))
            self.size = int(size)
        except (TypeError, ValueError):
            raise InputError(f"image.options: scales={scales!r}, size={size!r}: scales must be numbers (spot "
                             "diameters) and size a whole number of pixels.") from None
        if not self.scales or min(self.scales) <= 0 or self.size < 4:
            raise InputError(f"image.options: scales={list(self.scales)}, size={self.size}: every scale must be > 0 "
                             "(a patch side in spot diameters) and size at least 4 px.")
        self.extent = max(self.scales)

    def encode(self, rgb, centers_xy, spot_px, device="cpu", batch: int = 2048):
        from image_process.process_pool import map_patches

        feats = []
        for s in self.scales:
            patches = [extract_patches(rgb, centers_xy[start:start + batch], spot_px * s, self.size)
                       for start in range(0, len(centers_xy), batch)]
            patches = np.concatenate(patches) if patches else np.zeros((0, self.size, self.size, 3), np.uint8)
            feats.append(map_patches(patch_statistics, patches))    # over the CPU cores; same numbers
        return np.concatenate(feats, axis=1).astype(np.float32)


def patch_statistics(patches: np.ndarray) -> np.ndarray:
    """22 colour/stain/texture statistics per patch. patches: (n, s, s, 3) uint8 -> (n, 22)."""
    from skimage.color import rgb2hed

    n, s = patches.shape[:2]
    rgb = patches.astype(np.float32) / 255.0
    flat = rgb.reshape(n, -1, 3)
    out = [flat.mean(1), flat.std(1)]
    hed = rgb2hed(rgb.reshape(-1, s, 3)).reshape(n, -1, 3)[..., :2]
    out += [hed.mean(1), hed.std(1)]
    gray = rgb @ np.array([0.299, 0.587, 0.114], np.float32)
    out.append(np.percentile(gray.reshape(n, -1), [10, 50, 90], axis=1).T)
    gy, gx = np.gradient(gray, axis=(1, 2))
    mag = np.sqrt(gx ** 2 + gy ** 2).reshape(n, -1)
    out += [mag.mean(1, keepdims=True), mag.std(1, keepdims=True)]
    lap = (np.roll(gray, 1, 1) + np.roll(gray, -1, 1) + np.roll(gray, 1, 2) + np.roll(gray, -1, 2) - 4 * gray)
    out.append((lap[:, 1:-1, 1:-1] ** 2).reshape(n, -1).mean(1, keepdims=True))
    h = hed[..., 0]
    out.append((h > np.float32(0.05)).mean(1, keepdims=True))
    spec = np.abs(np.fft.fftshift(np.fft.fft2(gray - gray.mean((1, 2), keepdims=True)), axes=(1, 2))) ** 2
    yy, xx = np.mgrid[:s, :s] - s // 2
    r = np.sqrt(xx ** 2 + yy ** 2) / (s / 2)
    bands = np.linspace(0, 1.0001, 6)
    total = spec.reshape(n, -1).sum(1, keepdims=True) + 1e-8
    out.append(np.stack([spec[:, (r >= lo) & (r < hi)].sum(1) for lo, hi in zip(bands[:-1], bands[1:])], 1) / total)
    return np.concatenate(out, axis=1)


# ------------------------------------------------------------------------------------------
@register("timm")
class TimmEncoder:
    """A timm backbone with weights from a local file (``image.weights``), features = pooled output.

    Patches of ``patch_scale`` x spot diameter are resized to ``input_size`` px and normalised with
    ImageNet statistics (or ``mean``/``std``); ``pool`` (:data:`POOLINGS`) says how a patch's features come
    out of the network. ``precision`` (:data:`PRECISIONS`): ``fp32`` (default), or the network run under
    torch's autocast in ``bf16`` (CPU or GPU) or ``fp16`` (a CUDA GPU; on the CPU it runs in fp32, with a
    warning), as the model cards of Virchow2 and H-optimus-0 run them on a GPU, for time and memory; the
    features come out as float32. ``name``: the registry name it was built under (``timm``, or a foundation
    model's from :data:`FOUNDATION_MODELS`), for messages; other options pass to ``timm.create_model``.
    """

    def __init__(self, weights=None, arch: str = "resnet50", input_size: int = 224, patch_scale: float = 2.0,
                 mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), batch_size: int = 64, pool: str = "model",
                 precision: str = "fp32", name: str = "timm", weights_hint: str = "", **timm_kwargs):
        import torch

        which = f"image.encoder={name}" + (f" ({arch})" if name == "timm" else "")
        if not weights:
            raise InputError(f"{which} needs image.weights: a local .pth/.bin/.safetensors file with the backbone's "
                             f"weights{weights_hint} (nothing is downloaded). Use image.encoder=handcrafted for a "
                             "weights-free encoder.")
        wpath = Path(str(weights)).expanduser()
        if not wpath.exists():
            raise InputError(f"{wpath}: weights file not found (image.weights).")
        if pool not in POOLINGS:
            raise InputError(f"image.options: pool={pool!r}; choose one of {list(POOLINGS)}.")
        if precision not in PRECISIONS:
            raise InputError(f"image.options: precision={precision!r}; choose one of {list(PRECISIONS)}.")
        self.precision = precision
        self.arch, self.pool = arch, pool
        self.model = create_timm_model(arch, which, **timm_kwargs)
        state = _load_state_dict(wpath)
        mismatched = {k: (tuple(v.shape), tuple(state[k].shape)) for k, v in self.model.state_dict().items()
                      if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(v.shape)}
        if mismatched:
            k, (want, got) = next(iter(mismatched.items()))
            raise InputError(f"{wpath}: {len(mismatched)} tensors differ in shape from {which}, timm architecture "
                             f"{arch!r} (e.g. {k}: {got} in the file, {want} in the model). Check image.encoder and "
                             "image.options: the arch and its timm options (img_size, patch_size, ...) must be those "
                             "the weights were saved with.")
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        check_weights_match(wpath, arch, len(self.model.state_dict()), missing, unexpected,
                            which="" if name == "timm" else which)
        self.model.eval()
        self.input_size, self.patch_scale, self.batch_size = int(input_size), float(patch_scale), int(batch_size)
        self.extent = self.patch_scale
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)

    def encode(self, rgb, centers_xy, spot_px, device="cpu"):
        import torch

        from models.progress import progress_bar

        self.model.to(device)
        out = []
        kind = torch.device(device).type
        dtype = getattr(torch, PRECISIONS[self.precision]) if PRECISIONS[self.precision] else None
        if dtype is torch.float16 and kind != "cuda":
            log.warning("image.options.precision=fp16 is for a CUDA GPU; on %s the network runs in fp32 (bf16 runs "
                        "on the CPU too)", kind)
            dtype = None
        autocast = torch.autocast(kind, dtype=dtype) if dtype is not None else contextlib.nullcontext()
        with torch.inference_mode(), autocast:
            for start in progress_bar(range(0, len(centers_xy), self.batch_size), desc=f"{self.arch} patches",
                                      unit="batch", leave=False):
                p = extract_patches(rgb, centers_xy[start:start + self.batch_size], spot_px * self.patch_scale,
                                    self.input_size)
                x = torch.from_numpy(p).permute(0, 3, 1, 2).float().div(255)
                x = ((x - self.mean) / self.std).to(device)
                out.append(POOLINGS[self.pool](self.model, x).float().cpu().numpy())
        return np.concatenate(out).astype(np.float32)


def _class_and_mean_patch_tokens(model, x):
    """(B, 2 D): the class token beside the mean of the patch tokens (register tokens left out), the
    embedding Virchow and Virchow2 are published with."""
    import torch

    tokens = model.forward_features(x)
    return torch.cat([tokens[:, 0], tokens[:, model.num_prefix_tokens:].mean(1)], dim=1)


# image.options.precision -> torch's autocast dtype (None: fp32, no autocast)
PRECISIONS = {"fp32": None, "bf16": "bfloat16", "fp16": "float16"}


# how a batch's features come out of the network: the model's own head-less output (timm's global_pool:
# the class token of a ViT, the average of a CNN), or the class token beside the mean patch token
POOLINGS = {"model": lambda model, x: model(x), "class_and_mean_patch": _class_and_mean_patch_tokens}


def create_timm_model(arch: str, which: str = "image.encoder=timm", **timm_kwargs):
    """``timm.create_model(arch)`` without a classifier and without pretrained weights (nothing is downloaded);
    ``mlp_layer`` / ``act_layer`` may be named (:data:`TIMM_LAYERS`). An architecture or option this timm
    does not have is refused with the fix, naming ``which`` (the encoder asked for)."""
    import timm

    kwargs = {k: _timm_layer(k, v) for k, v in timm_kwargs.items()}
    if arch not in timm.list_models():
        raise InputError(f"{which}: timm {timm.__version__} has no architecture {arch!r}; a newer timm may "
                         "(pip install -U timm), or check image.options.arch.")
    try:
        return timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)
    except TypeError as exc:       # an option the architecture does not take (or this timm does not know)
        raise InputError(f"{which}: timm {timm.__version__} cannot build {arch!r} with options "
                         f"{sorted(timm_kwargs)} ({exc}); a newer timm may (pip install -U timm), or check "
                         "image.options.") from None


# layer classes a timm option may name in a config (YAML holds no Python classes)
TIMM_LAYERS = {"mlp_layer": {"swiglu_packed": ("timm.layers", "SwiGLUPacked")},
               "act_layer": {"silu": ("torch.nn", "SiLU"), "gelu": ("torch.nn", "GELU")}}


def _timm_layer(option: str, value):
    if option not in TIMM_LAYERS or not isinstance(value, str):
        return value
    import importlib

    if value not in TIMM_LAYERS[option]:
        raise InputError(f"image.options: {option}={value!r}; the names known here are {sorted(TIMM_LAYERS[option])}.")
    module, name = TIMM_LAYERS[option][value]
    return getattr(importlib.import_module(module), name)


# ------------------------------------------------------------------------------------------
# Pathology foundation models: the timm architecture and options each one's published weights were saved
# with (so the weights file alone is enough), its input normalisation and pooling, and, to check a preset
# against its model card, the feature size and the parameter count published there (millions; to within
# params_rel, the precision it is published with, 0.5% unless given).
FOUNDATION_MODELS = {
    "uni": {"arch": "vit_large_patch16_224", "card": "MahmoodLab/UNI", "dim": 1024,
            "params_m": 303,
            "options": {"img_size": 224, "patch_size": 16, "init_values": 1e-5, "dynamic_img_size": True}},
    "uni2-h": {"arch": "vit_giant_patch14_224", "card": "MahmoodLab/UNI2-h", "dim": 1536,
               "params_m": 681,
               "options": {"img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24, "embed_dim": 1536,
                           "init_values": 1e-5, "mlp_ratio": 2.66667 * 2, "mlp_layer": "swiglu_packed",
                           "act_layer": "silu", "reg_tokens": 8, "no_embed_class": True, "dynamic_img_size": True}},
    "virchow2": {"arch": "vit_huge_patch14_224", "card": "paige-ai/Virchow2", "dim": 2560,
                 "params_m": 632, "pool": "class_and_mean_patch",
                 "options": {"img_size": 224, "init_values": 1e-5, "mlp_ratio": 5.3375, "mlp_layer": "swiglu_packed",
                             "act_layer": "silu", "reg_tokens": 4, "dynamic_img_size": True}},
    "h-optimus-0": {"arch": "vit_giant_patch14_reg4_dinov2", "card": "bioptimus/H-optimus-0",
                    "dim": 1536, "params_m": 1100, "params_rel": 0.05,     # published as "1.1B"
                    "mean": (0.707223, 0.578729, 0.703617), "std": (0.211883, 0.230117, 0.177517),
                    "options": {"img_size": 224, "init_values": 1e-5, "dynamic_img_size": False}},
}


def _foundation_model(name: str):
    preset = FOUNDATION_MODELS[name]

    def build(weights=None, **options):
        settings = {"arch": preset["arch"], "pool": preset.get("pool", "model"), **preset["options"],
                    **{k: preset[k] for k in ("mean", "std") if k in preset}, **options}
        return TimmEncoder(weights, name=name, weights_hint=f" (pytorch_model.bin of the {preset['card']} model card)",
                           **settings)
    build.__doc__ = f"image.encoder={name}: {preset['card']}, {preset['dim']} features."
    return build


for _name in FOUNDATION_MODELS:
    register(_name)(_foundation_model(_name))


WRAPPER_PREFIXES = ("module.", "backbone.", "model.", "encoder.", "trunk.")
CLASSIFIER_PREFIXES = ("head.", "fc.", "classifier.", "last_linear.", "head_dist.")   # dropped: num_classes=0


def check_weights_match(wpath: Path, arch: str, n_params: int, missing, unexpected, which: str = "") -> None:
    """Refuse a weights file that does not fill the backbone exactly: every tensor of ``arch`` must come
    from the file, and every tensor of the file but a classifier head must be used. A file loaded
    loosely gives features without an error: a UNI checkpoint (ViT-L with LayerScale) read into a plain
    ``vit_large_patch16_224`` silently drops its 48 LayerScale tensors. ``which``: the preset asked for
    (``image.encoder=uni``), named in the message."""
    unexpected = [k for k in unexpected if not k.startswith(CLASSIFIER_PREFIXES)]
    if not missing and not unexpected:
        return
    hint = ""
    if any(".ls1." in k or ".ls2." in k for k in unexpected):
        hint = (" The file has LayerScale tensors (...ls1.gamma) that the architecture lacks: add them with "
                "init_values, e.g. image.options='{arch: vit_large_patch16_224, init_values: 1.0e-5, "
                "dynamic_img_size: true}'; for UNI, image.encoder=uni sets them.")
    elif any(".ls1." in k or ".ls2." in k for k in missing):
        hint = " The architecture has LayerScale tensors the file lacks: remove init_values from image.options."
    raise InputError(f"{wpath}: does not match timm architecture {arch!r}{f' ({which})' if which else ''}: "
                     f"{len(missing)} of its {n_params} "
                     f"tensors are not in the file (e.g. {list(missing)[:3]}) and {len(unexpected)} tensors of "
                     f"the file are not in it (e.g. {unexpected[:3]}).{hint} Check image.options (arch and its "
                     "timm options) against the model the weights were saved from.")


def _load_state_dict(path: Path) -> dict:
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        state = load_file(str(path))
    else:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "teacher"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    state = {k.removeprefix("module.").removeprefix("backbone."): v for k, v in state.items()}
    while True:   # a wrapper's prefix on every key (Lightning 'model.', 'encoder.', 'trunk.'): strip it
        prefix = next((p for p in WRAPPER_PREFIXES if state and all(k.startswith(p) for k in state)), None)
        if prefix is None:
            return state
        state = {k.removeprefix(prefix): v for k, v in state.items()}
