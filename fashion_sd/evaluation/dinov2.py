"""DINOv2 ViT features for FD-DINOv2 (Stein et al., NeurIPS 2023, "Exposing flaws of generative
model evaluation metrics", https://arxiv.org/abs/2306.04675), computed in Keras on any backend.

What this follows: **dgm-eval** (layer6ai-labs/dgm-eval, the paper's code), whose ``dinov2``
encoder is ``torch.hub.load('facebookresearch/dinov2', 'dinov2_vitl14')`` fed by its
``DINOv2Encoder.transform`` (dgm_eval/models/dinov2.py)::

    TF.Compose([TF.Resize((224, 224), TF.InterpolationMode.BICUBIC), TF.ToTensor()])(image)
    TF.Normalize(imagenet_mean, imagenet_std)  # (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

on a PIL RGB image (dataloaders.py: ``Image.open(path).convert('RGB')``). So:

1. The whole image is squashed to 224 x 224: no aspect kept, no centre crop (unlike DINOv2's
   own evaluation transform and transformers' ``BitImageProcessor``, which resize the short side
   to 256 and crop 224). ``resize`` names how (:func:`preprocess`):

   - ``dgm-eval`` (the default, dgm-eval's default): torchvision's ``Resize`` on a PIL image is
     PIL's bicubic ``Image.resize`` on the uint8 image (antialiased when shrinking, rounded to
     uint8), then ToTensor's / 255.
   - ``clean``: dgm-eval's ``--clean_resize`` (``resizer.pil_resize``): PIL bicubic on each
     channel as a float image, clipped to [0, 255], not rounded; clean-fid's resize.
   - ``torch-fidelity``: torch-fidelity's ``FeatureExtractorDinoV2`` (the same hub network)
     resizes by ``interpolate_bilinear_2d_like_tensorflow1x``: TensorFlow 1's bilinear
     (source = dst * in / out, no antialiasing) on the float image. Its FD-DINOv2 numbers differ
     from dgm-eval's on the same images.
2. ImageNet's mean and std on x / 255.
3. The feature: the hub model's ``forward`` returns ``head(x_norm_clstoken)`` with an identity
   head: the class token after the final LayerNorm, 1024 numbers for ViT-L/14. That is
   transformers' ``Dinov2Model(...).pooler_output`` and token 0 of keras-hub's
   ``DINOV2Backbone`` output (which ends in that LayerNorm).

Position embeddings at 224: DINOv2 was trained at 518 (37 x 37 patches of 14) and a 224 input has
16 x 16, so the patch position embeddings are resampled bicubically (PyTorch's kernel, a = -0.75,
no antialiasing). ``positions`` says with which step:

- ``dinov2`` (the default: what dgm-eval and torch-fidelity run): the hub model's
  ``interpolate_pos_encoding`` passes ``scale_factor = (16 + 0.1) / 37`` (its
  ``interpolate_offset``), so a source position is (dst + 0.5) * 37 / 16.1 - 0.5.
- ``transformers``: transformers' ``Dinov2Embeddings.interpolate_pos_encoding`` (5.x) passes
  ``size=(16, 16)``: (dst + 0.5) * 37 / 16 - 0.5. A slightly different network input, hence
  slightly different features from the same weights.

keras-hub's ``DINOV2Backbone`` resamples with ``keras.ops.image.resize(bicubic)``, which on
TensorFlow and JAX is Keys' a = -0.5 kernel with renormalised edges: 0.3 away from PyTorch's on
unit-variance embeddings, whatever ``antialias_in_interpolation`` says (tested). So the resampling
here is written out (:func:`interpolate_positions`, a pair of 1-D matrices) and assigned to the
backbone's ``interpolated_position_embeddings``; everything else is keras-hub's.

Weights (``eval.dinov2``): ``hf:DIR``, a folder transformers' ``Dinov2Model.save_pretrained``
wrote (config.json + model.safetensors, or its sharded form), converted by keras-hub's own
transformers converter (``DINOV2Backbone.from_preset(DIR)``, which reads the tensors with
``safetensors.safe_open(framework="np")``: no torch) and cached once in ``DIR/keras-hub-dinov2/``
by the project's cache (:func:`fashion_sd.cache.cached`, keyed by the source files and the
keras-hub version). ``hf:OWNER/NAME`` that is not a local folder is fetched from the Hugging Face
Hub with ``huggingface_hub`` (:data:`DEFAULT`, ``facebook/dinov2-large``: transformers' port of
the hub's ``dinov2_vitl14``); offline and not in the Hub cache, that is an error saying what to
download. DINOv2 with registers (``dinov2_with_registers``) is refused by name: FD-DINOv2 does not
use it and transformers resamples its positions differently. The SwiGLU MLP (ViT-g) is supported.

All compute is float32, whatever the global dtype policy.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
from PIL import Image

from fashion_sd.cache import cache_key, cached, file_id, key_path
from fashion_sd.errors import FashionSDError

log = logging.getLogger(__name__)

DEFAULT = "hf:facebook/dinov2-large"
IMAGE_SIZE = 224  # dgm-eval's and torch-fidelity's input size
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406])
IMAGENET_STD = np.array([0.229, 0.224, 0.225])
RESIZES = ("dgm-eval", "clean", "torch-fidelity")
POSITIONS = ("dinov2", "transformers")
HUB_OFFSET = 0.1  # facebookresearch/dinov2's interpolate_offset for its hub models
CACHE_NAME = "keras-hub-dinov2"
CONVERTER_VERSION = 1  # part of the cache key: a change in the mapping converts again
# The version of the steps in the module docstring, for keys of cached statistics.
PREPROCESSING = "v1:{resize}-{size}/imagenet-mean-std/cls-after-layernorm/positions-{positions}"
# What keras-hub's converter reads from config.json; transformers writes all of them.
_READ = ("image_size", "patch_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
         "mlp_ratio", "layerscale_value", "use_swiglu_ffn", "hidden_dropout_prob",
         "drop_path_rate")
# What keras-hub's DINOV2Backbone hard-codes (exact GELU, LayerNorm eps 1e-6, q/k/v biases, RGB).
_FIXED = {"hidden_act": "gelu", "layer_norm_eps": 1e-6, "qkv_bias": True, "num_channels": 3}
_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


class DinoV2Unavailable(FashionSDError, RuntimeError):
    """The DINOv2 weights asked for cannot be loaded; the message names the folder and the fix."""


# --------------------------------------------------------------------------------------------
# Images


def _resize_pil_uint8(image: np.ndarray, size: int) -> np.ndarray:
    """torchvision ``Resize((size, size), BICUBIC)`` on a PIL image: PIL's resize, uint8 out."""
    im = Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(im, dtype=np.float64)


def _resize_pil_float(image: np.ndarray, size: int) -> np.ndarray:
    """dgm-eval's ``pil_resize``: each channel as a float32 ("F") image, bicubic, clipped."""
    channels = [np.asarray(Image.fromarray(image[:, :, c].astype(np.float32))
                           .resize((size, size), Image.Resampling.BICUBIC)) for c in range(3)]
    return np.clip(np.stack(channels, axis=-1), 0.0, 255.0).astype(np.float64)


def _tf1_bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of TF1's bilinear (source = dst * in / out, upper tap clamped).

    The source positions are float32 products, as TensorFlow's kernel and torch-fidelity's port
    compute them: in float64 a fraction moves by up to 1e-5, a pixel by up to 4e-3."""
    src = np.arange(n_out, dtype=np.float32) * np.float32(n_in / n_out)
    lo = np.floor(src).astype(int)
    frac = (src - lo.astype(np.float32)).astype(np.float64)
    m = np.zeros((n_out, n_in))
    np.add.at(m, (np.arange(n_out), lo), 1.0 - frac)
    np.add.at(m, (np.arange(n_out), np.minimum(lo + 1, n_in - 1)), frac)
    return m


def _resize_tf1_bilinear(image: np.ndarray, size: int) -> np.ndarray:
    # The project's tensorflow1 FID resize runs TensorFlow's op; this one must also run on JAX
    # without TensorFlow, and separable 1-D weights are exactly that op's arithmetic.
    rows = _tf1_bilinear_matrix(image.shape[0], size)
    cols = _tf1_bilinear_matrix(image.shape[1], size)
    return np.einsum("ia,jb,abc->ijc", rows, cols, image.astype(np.float64), optimize=True)


_RESIZERS = {"dgm-eval": _resize_pil_uint8, "clean": _resize_pil_float,
             "torch-fidelity": _resize_tf1_bilinear}


def check_choices(resize: str, positions: str) -> None:
    """ValueError unless ``resize`` is one of :data:`RESIZES` and ``positions`` of :data:`POSITIONS`."""
    if resize not in RESIZES:
        raise ValueError(f"DINOv2 resize {resize!r}: use one of {RESIZES}")
    if positions not in POSITIONS:
        raise ValueError(f"DINOv2 positions {positions!r}: use one of {POSITIONS}")


def preprocess(images, size: int = IMAGE_SIZE, resize: str = "dgm-eval") -> np.ndarray:
    """uint8 RGB images, (H, W, 3) each or (n, H, W, 3), any sizes -> float32 (n, size, size, 3):
    squashed to ``size`` by ``resize``, / 255, ImageNet's mean and std (module docstring)."""
    check_choices(resize, POSITIONS[0])
    batch = [images] if isinstance(images, np.ndarray) and images.ndim == 3 else images
    out = np.empty((len(batch), size, size, 3), np.float32)
    for i, image in enumerate(batch):
        a = np.asarray(image)
        if a.dtype != np.uint8 or a.ndim != 3 or a.shape[-1] != 3:
            raise ValueError(f"images must be uint8 RGB arrays (H, W, 3) or (n, H, W, 3); image "
                             f"{i} is {a.dtype} {a.shape}")
        out[i] = (_RESIZERS[resize](a, size) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    return out


# --------------------------------------------------------------------------------------------
# Position embeddings


def _cubic(t: np.ndarray, a: float = -0.75) -> np.ndarray:
    """(n, 4) weights of the taps at -1, 0, +1, +2 for fractions ``t``: PyTorch's bicubic kernel
    (``upsample_bicubic2d``, Keys' convolution with a = -0.75)."""
    x = np.stack([t + 1.0, t, 1.0 - t, 2.0 - t], axis=-1)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
    return np.where(x <= 1.0, near, far)


def bicubic_matrix(n_in: int, n_out: int, step: float) -> np.ndarray:
    """(n_out, n_in) weights of PyTorch's bicubic ``interpolate`` (align_corners False, no
    antialias): source = (dst + 0.5) * step - 0.5, taps beyond the edge clamped to it."""
    src = (np.arange(n_out) + 0.5) * step - 0.5
    lo = np.floor(src).astype(int)
    weights = _cubic(src - lo)
    m = np.zeros((n_out, n_in))
    for k in range(4):
        np.add.at(m, (np.arange(n_out), np.clip(lo - 1 + k, 0, n_in - 1)), weights[:, k])
    return m


def interpolate_positions(position_embeddings: np.ndarray, grid: int,
                          positions: str = "dinov2") -> np.ndarray:
    """(1, 1 + m*m, d) position embeddings (class token first) -> (1, 1 + grid*grid, d) for a
    grid x grid patch input, as the hub model (``dinov2``) or transformers (``transformers``)
    resamples them; unchanged when the grid is the trained one, as both do."""
    check_choices(RESIZES[0], positions)
    pos = np.asarray(position_embeddings, dtype=np.float64)
    m = math.isqrt(pos.shape[1] - 1)
    if m * m != pos.shape[1] - 1:
        raise ValueError(f"{pos.shape[1] - 1} patch position embeddings are not a square grid")
    if grid == m:
        return pos.astype(np.float32)
    step = m / grid if positions == "transformers" else m / (grid + HUB_OFFSET)
    w = bicubic_matrix(m, grid, step)
    patches = np.einsum("ia,jb,abd->ijd", w, w, pos[0, 1:].reshape(m, m, -1), optimize=True)
    return np.concatenate([pos[:, :1], patches.reshape(1, grid * grid, -1)],
                          axis=1).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Weights


def resolve(spec: str, key: str = "eval.dinov2") -> Path:
    """The transformers folder ``spec`` names: ``hf:DIR``, or ``hf:OWNER/NAME`` fetched from the
    Hugging Face Hub (or its local cache) when no such folder exists."""
    if not spec.startswith("hf:"):
        raise DinoV2Unavailable(f"{key}: {spec!r}: use hf:DIR (a folder transformers' "
                                f"Dinov2Model.save_pretrained wrote) or hf:OWNER/NAME from the "
                                f"Hugging Face Hub, e.g. {DEFAULT}")
    target = spec[3:]
    folder = Path(target).expanduser()
    if folder.is_dir():
        return folder
    if folder.exists() or not _REPO_ID.match(target):
        raise DinoV2Unavailable(f"{key}: {spec}: {folder} is not a folder; give the folder a "
                                "transformers Dinov2Model was saved to (config.json + "
                                "model.safetensors)")
    return _download(target, key)


def _download(repo: str, key: str) -> Path:
    try:
        from huggingface_hub import snapshot_download  # noqa: PLC0415 - only for hub names
    except ImportError:
        raise DinoV2Unavailable(f"{key}: hf:{repo}: no local folder of that name, and fetching "
                                "it needs huggingface_hub (pip install huggingface_hub)") from None
    try:
        return Path(snapshot_download(repo, allow_patterns=["config.json", "*.safetensors",
                                                            "*.safetensors.index.json"]))
    except Exception as exc:  # noqa: BLE001 - offline, unknown repo, gated, ...: one message
        raise DinoV2Unavailable(
            f"{key}: hf:{repo}: no local folder of that name, and the Hugging Face Hub "
            f"repository {repo} cannot be fetched ({type(exc).__name__}: {str(exc)[:200]}). "
            f"Offline: on a machine with internet run `hf download {repo} config.json "
            f"model.safetensors --local-dir DIR`, copy DIR here and set {key}: hf:DIR") from None


def read_config(folder: Path) -> dict:
    """The transformers DINOv2 config in ``folder``; refuses what keras-hub's backbone cannot
    hold, naming the field, before any tensor is read."""
    path = folder / "config.json"
    if not path.is_file():
        raise DinoV2Unavailable(f"{folder}: no config.json; give the folder transformers' "
                                "Dinov2Model.save_pretrained wrote (config.json + model.safetensors), "
                                "e.g. a download of facebook/dinov2-large")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DinoV2Unavailable(f"{path}: not a readable transformers config ({exc})") from None
    kind = config.get("model_type") if isinstance(config, dict) else None
    if kind == "dinov2_with_registers":
        raise DinoV2Unavailable(f"{path}: DINOv2 with registers (model_type "
                                "dinov2_with_registers) is not supported: FD-DINOv2 (dgm-eval, "
                                "torch-fidelity) uses dinov2_vitl14 without registers, and "
                                "transformers resamples its positions with antialiasing; give a "
                                "facebook/dinov2-* folder")
    if kind != "dinov2":
        raise DinoV2Unavailable(f"{path}: model_type {kind!r} is not a DINOv2 (transformers' "
                                "Dinov2Model writes 'dinov2')")
    missing = [k for k in _READ if k not in config]
    if missing:
        raise DinoV2Unavailable(f"{path}: no {', '.join(missing)}; save the model with "
                                "transformers' save_pretrained, which writes them all")
    for field, wanted in _FIXED.items():
        if field in config and config[field] != wanted:
            raise DinoV2Unavailable(f"{path}: {field} is {config[field]!r}; keras-hub's "
                                    f"DINOV2Backbone has {wanted!r}, so this model cannot be "
                                    "converted")
    return config


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files (and their index) of ``folder``; refuses a torch-only folder."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
        return [index] + [folder / s for s in shards]
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    found = sorted(p.name for p in folder.iterdir() if p.is_file())
    raise DinoV2Unavailable(f"{folder}: no model.safetensors (found {found}); a "
                            "pytorch_model.bin is not read (it needs torch): download "
                            "model.safetensors, or save with save_pretrained(safe_serialization=True)")


def backbone_arguments(config: dict, size: int) -> dict:
    """``DINOV2Backbone(**arguments)`` for ``config`` at a ``size`` x ``size`` input, the trained
    size kept as ``position_embedding_shape``; the fields keras-hub's converter sets (checked
    against it in :func:`_convert`)."""
    patch, trained = int(config["patch_size"]), int(config["image_size"])
    if size % patch:
        raise ValueError(f"DINOv2 input size {size} is not a multiple of its patch size {patch} "
                         "(the hub model refuses it)")
    return dict(patch_size=patch, num_layers=int(config["num_hidden_layers"]),
                hidden_dim=int(config["hidden_size"]),
                num_heads=int(config["num_attention_heads"]),
                intermediate_dim=int(config["hidden_size"] * config["mlp_ratio"]),
                layer_scale_init_value=float(config["layerscale_value"]),
                num_register_tokens=0, use_mask_token=bool(config.get("use_mask_token", True)),
                use_swiglu_ffn=bool(config["use_swiglu_ffn"]),
                image_shape=(size, size, 3), position_embedding_shape=(trained, trained),
                data_format="channels_last", dtype="float32")


def _keras_hub():
    try:
        import keras_hub  # noqa: PLC0415 - only the DINOv2 metrics need it
    except ImportError as exc:
        raise DinoV2Unavailable(f"FD-DINOv2 needs keras-hub ({exc}): pip install --no-deps "
                                "keras-hub==0.32.0 (and regex, tokenizers)") from None
    return keras_hub


def _kept(backbone) -> list:
    """Every variable but the resampled position embeddings (a function of the input size)."""
    resampled = backbone.embeddings.interpolated_position_embeddings
    return [v for v in backbone.weights if v is not resampled]


def _flatten(variables: list) -> np.ndarray:
    return np.concatenate([keras.ops.convert_to_numpy(v).ravel() for v in variables]
                          ).astype(np.float32)


def _assign(variables: list, flat: np.ndarray, source: Path) -> None:
    sizes = [math.prod(v.shape) for v in variables]
    if sum(sizes) != flat.size:
        raise DinoV2Unavailable(f"{source}: the cached weights hold {flat.size} numbers, the "
                                f"backbone {sum(sizes)}; delete {source} to convert again")
    start = 0
    for v, n in zip(variables, sizes):
        v.assign(flat[start: start + n].reshape(v.shape))
        start += n


_ARCHITECTURE = ("patch_size", "num_layers", "hidden_dim", "num_heads", "intermediate_dim",
                 "layer_scale_init_value", "num_register_tokens", "use_swiglu_ffn")


def _convert(folder: Path, arguments: dict):
    """keras-hub's own conversion of the transformers folder, at our input size and in float32."""
    hub = _keras_hub()
    try:
        backbone = hub.models.DINOV2Backbone.from_preset(
            str(folder), image_shape=arguments["image_shape"], dtype="float32",
            data_format="channels_last")
    except Exception as exc:  # noqa: BLE001 - keras-hub and safetensors raise many kinds
        raise DinoV2Unavailable(f"{folder}: keras-hub cannot convert this DINOv2 "
                                f"({type(exc).__name__}: {str(exc)[:300]})") from exc
    theirs = backbone.get_config()
    differ = [k for k in _ARCHITECTURE if theirs[k] != arguments[k]]
    if differ:  # our cache would rebuild another network than keras-hub converted
        raise DinoV2Unavailable(f"{folder}: keras-hub's converter builds {differ} as "
                                f"{[theirs[k] for k in differ]}, this module as "
                                f"{[arguments[k] for k in differ]}: update backbone_arguments")
    return backbone


def load_backbone(folder: Path, size: int = IMAGE_SIZE, use_cache: bool = True):
    """keras-hub's ``DINOV2Backbone`` for the transformers folder at a ``size`` input, float32;
    converted on first use and cached in ``folder/keras-hub-dinov2`` (older files there, made
    from other source files, are removed: each is the size of the model). A folder that cannot
    be written still loads: converted again each time, with a warning."""
    config = read_config(folder)
    files = [folder / "config.json"] + weight_files(folder)
    arguments = backbone_arguments(config, size)
    hub = _keras_hub()
    if not use_cache:
        return _convert(folder, arguments)
    made = {}

    def convert() -> np.ndarray:
        made["backbone"] = _convert(folder, arguments)
        return _flatten(_kept(made["backbone"]))

    cache = folder / CACHE_NAME
    architecture = {k: arguments[k] for k in _ARCHITECTURE + ("use_mask_token",
                                                              "position_embedding_shape")}
    key = cache_key("dinov2-keras-hub", f"keras-hub-{hub.__version__}/v{CONVERTER_VERSION}",
                    [file_id(str(f)) for f in files] + [json.loads(json.dumps(architecture))],
                    dtype="float32")
    try:
        flat = cached(cache, key, convert)
    except OSError as exc:  # converted, but the folder is read-only or full
        if "backbone" not in made:
            raise
        log.warning("cannot cache the converted DINOv2 in %s (%s): converting on every load",
                    cache, exc)
        return made["backbone"]
    if "backbone" in made:
        current = key_path(cache, key)
        for stale in cache.glob("dinov2-keras-hub-*.npz"):
            if stale != current:
                stale.unlink(missing_ok=True)
        log.info("converted the transformers DINOv2 in %s to keras-hub's (cached in %s)",
                 folder, current)
        return made["backbone"]
    backbone = hub.models.DINOV2Backbone(**arguments)
    _assign(_kept(backbone), flat, cache)
    return backbone


# --------------------------------------------------------------------------------------------
# The judge


@dataclass
class DinoV2:
    """keras-hub's DINOv2 with the resampling and preprocessing FD-DINOv2 needs."""

    name: str
    backbone: object  # keras_hub.models.DINOV2Backbone; never saved (see set_positions)
    encoder: keras.Model  # images -> the class token after the final LayerNorm
    size: int
    resize: str
    positions: str

    @property
    def hidden_dim(self) -> int:
        return int(self.backbone.hidden_dim)

    @property
    def preprocessing(self) -> str:
        """What the features depend on besides the weights: for keys of cached statistics."""
        return PREPROCESSING.format(resize=self.resize, size=self.size, positions=self.positions)

    @property
    def label(self) -> str:
        return (f"DINOv2 {self.name} at {self.size} px ({self.resize} resize, {self.positions} "
                "position resampling)")


def set_positions(backbone, positions: str) -> None:
    """Replace keras-hub's resampled position embeddings by PyTorch's (module docstring).

    keras-hub's ``save_own_variables`` writes a differing resample back into the trained
    embeddings, so a backbone changed here is never saved: the cache holds the other variables.
    """
    grid = int(backbone.image_shape[0]) // backbone.patch_size
    trained = keras.ops.convert_to_numpy(backbone.embeddings.position_embeddings)
    backbone.embeddings.interpolated_position_embeddings.assign(
        interpolate_positions(trained, grid, positions))


def class_token_model(backbone) -> keras.Model:
    """The backbone's images -> token 0 of its output (after the final LayerNorm)."""
    return keras.Model(backbone.input, backbone.output[:, 0, :], name="dinov2_class_token")


def load(spec: str = DEFAULT, size: int = IMAGE_SIZE, resize: str = "dgm-eval",
         positions: str = "dinov2", use_cache: bool = True) -> DinoV2:
    """The DINOv2 judge ``spec`` names (``hf:DIR`` or ``hf:OWNER/NAME``), ready for
    :func:`features`; raises :class:`DinoV2Unavailable` saying what is missing."""
    check_choices(resize, positions)
    folder = resolve(spec)
    backbone = load_backbone(folder, size, use_cache)
    set_positions(backbone, positions)
    return DinoV2(f"hf:{folder.name}", backbone, class_token_model(backbone), size, resize,
                  positions)


def features(images: Sequence[np.ndarray] | np.ndarray, model: DinoV2,
             batch_size: int = 32) -> np.ndarray:
    """(n, hidden) float64 FD-DINOv2 features of uint8 RGB images (any sizes), computed in
    float32 a batch at a time: ViT-L/14 at 224 px and batch 16 peaked at 3.2 GiB of host memory,
    its 1.2 GB of weights included (2-core CPU, TensorFlow and JAX alike)."""
    out = [np.asarray(model.encoder.predict_on_batch(
               {"images": preprocess(images[s: s + batch_size], model.size, model.resize)}),
               dtype=np.float64)
           for s in range(0, len(images), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, model.hidden_dim))
