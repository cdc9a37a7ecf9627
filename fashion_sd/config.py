"""One typed configuration for every part of fashion-sd.

A run is described by a YAML file over the defaults below, plus ``--set section.key=value``
overrides from the command line. :func:`load_config` validates everything once, before any heavy
work, and raises one :class:`ConfigError` that lists every problem with its key and its file.
The resolved config is saved beside every output (:meth:`Config.save`).

Example:
    >>> cfg = load_config("configs/demo.yaml", ["lora.rank=8"])
    >>> cfg.lora.rank
    8

Relative paths in a config are relative to the working directory (the repository root for the
shipped configs), as with any command-line tool.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from fashion_sd.caption_template import (
    CATEGORY_COLUMNS,
    PAPER_TEMPLATE,
    template_errors,
)
from fashion_sd.errors import FashionSDError
from fashion_sd.clip_spec import ARCHITECTURES
from fashion_sd.files import atomic_write_text
from fashion_sd.images import valid_size
from fashion_sd.paper import PAPER_PROMPTS


class ConfigError(FashionSDError, ValueError):
    """A config that cannot run: every line names the key and where its value came from."""


@dataclass
class DataConfig:
    styles: str = "data/demo/styles.csv"  # Kaggle styles.csv (10 columns)
    images: str | None = "data/demo/images"  # folder of {id}.jpg; null: no image is opened
    captions: str = "runs/demo/captions.csv"  # written by build_captions.py, read by training
    # training and sampling size in pixels: one number (a square) or [width, height], each a
    # multiple of 64; the catalogue's photos are 3:4 portrait, e.g. [384, 512]
    resolution: int | list[int] = 256
    flip: bool = True  # random horizontal flip in training
    cache_dir: str = "runs/cache"  # encoder outputs, keyed by weights, resolution and data
    # The encoder cache is written in shards of this many images (each atomic: an interrupted
    # encoding resumes at the first missing one) and read memory-mapped (fashion_sd/training/shards.py).
    shard_rows: int = 1024
    cache_dtype: Literal["float32", "float16"] = "float32"  # how VAE moments are stored


@dataclass
class SplitConfig:
    train: float = 0.8
    val: float = 0.1
    test: float = 0.1


@dataclass
class CaptionsConfig:
    # Fields: {year} {usage} {season} {colour} {gender} (possessive) {article} (singular), and any
    # source column by name, e.g. {subCategory}. Missing values are left out.
    template: str = PAPER_TEMPLATE
    max_images: int | None = None  # seeded sample of kept rows before splitting (paper: 850)
    split: SplitConfig = field(default_factory=SplitConfig)
    # Article types with fewer rows are split together with the other rare types.
    stratify_min_count: int = 10
    # Keys are masterCategory, subCategory or articleType. An empty include list keeps everything.
    include: dict[str, list[str]] = field(default_factory=dict)
    exclude: dict[str, list[str]] = field(
        default_factory=lambda: {
            "masterCategory": ["Personal Care", "Free Items", "Home", "Sporting Goods"]
        }
    )
    image_workers: int = 8  # threads that open images in parallel
    max_tokens: int = 77  # CLIP's context length: longer captions are reported


@dataclass
class ModelConfig:
    # pretrained | local:DIR | random | auto (auto: pretrained if reachable, else random; demo only)
    weights: str = "pretrained"
    cache_dir: str | None = None  # where downloads are cached; null: Keras' default (~/.keras)
    # How the U-Net computes attention: keras.ops.dot_product_attention (fused: the backend's
    # fused kernel) or KerasCV's reshape + two dots + softmax; same weights, same function.
    attention: Literal["fused", "kerascv"] = "fused"


@dataclass
class LoraConfig:
    rank: int = 4
    alpha: float = 8.0
    # Dense layers inside the U-Net's attention blocks (self- and cross-attention).
    targets: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "out_proj"])
    # A LoRA checkpoint to start training from (e.g. one made by scripts/convert.py import-lora);
    # its rank, alpha and targets must be these. null: start from zero (B = 0).
    init_from: str | None = None
    # separate: x W + s (x A) B, no weight gradient for the frozen W (PEFT's form, the fast one);
    # merged: Keras' enable_lora kernel x (W + s A B). Same function; for benchmarks.
    form: Literal["separate", "merged"] = "separate"
    # Also train LoRA on the CLIP text encoder's q/k/v/out projections (te00.q_proj, ...), at
    # this rank and alpha and train.text_encoder_lr; captions are then encoded at every step.
    text_encoder: bool = False
    # How A starts (B starts at zero): kaiming = loralib / PEFT / kohya (uniform +-1/sqrt(fan_in));
    # gaussian = PEFT's and diffusers' init_lora_weights="gaussian" (std 1/rank); keras = Keras'
    # enable_lora (he_uniform, 2.45x kaiming's spread; what runs before this key used).
    init: Literal["kaiming", "gaussian", "keras"] = "kaiming"
    # lora: W + s B A. dora (Liu et al. 2024, PEFT's use_dora): m * (W + s B A) / ||W + s B A||,
    # the norm per output channel and held constant in the gradient, m (one number per output
    # channel, starting at W's norms) trained beside A and B; the same targets, rank and alpha.
    type: Literal["lora", "dora"] = "lora"

    def to_meta(self) -> dict[str, str]:
        """What a LoRA file's metadata says of this section (safetensors metadata are strings)."""
        return {"rank": str(self.rank), "alpha": repr(float(self.alpha)),
                "targets": json.dumps(list(self.targets)), "type": self.type}

    @classmethod
    def from_meta(cls, meta: dict[str, str]) -> LoraConfig:
        """The rank, alpha, targets and type a LoRA file was made with (:meth:`to_meta`'s
        inverse); files written before DoRA have no type and are plain LoRA."""
        return cls(rank=int(meta["rank"]), alpha=float(meta["alpha"]),
                   targets=json.loads(meta["targets"]), type=meta.get("type", "lora"))


@dataclass
class TrainConfig:
    epochs: int = 20
    max_steps: int | None = None  # stop at this exact optimizer step (checkpoint written there)
    batch_size: int = 3
    learning_rate: float = 5e-5
    warmup_steps: int = 0
    weight_decay: float = 1e-2
    grad_clip: float | None = 1.0  # global-norm clipping; null turns it off
    grad_accum: int = 1  # micro-batches per optimizer step
    precision: Literal["auto", "float32", "mixed_float16", "mixed_bfloat16"] = "auto"
    jit_compile: Union[bool, Literal["auto"]] = "auto"
    # auto: a TPU when one is found, mirrored over several GPUs, else one device; multi_worker
    # (MultiWorkerMirroredStrategy, one process per host, TF_CONFIG) only when asked for.
    # train.batch_size is the global batch, split over every replica of every worker.
    strategy: Literal["auto", "one_device", "mirrored", "multi_worker", "tpu"] = "auto"
    deterministic: bool = False  # TensorFlow op determinism (slower; exact resume on CPU)
    keep_last: int = 3  # epoch checkpoints kept besides best and last (and as many step ones)
    # Every N optimizer steps the train state is written (atomically, replacing the last one), so
    # --resume continues mid-epoch from there: a disconnect loses at most N steps (500: a few
    # minutes of a GPU run; the state is the LoRA and its optimizer moments, ~10 MB at rank 4).
    # 0: at epoch ends only.
    save_every_steps: int = 500
    # Every N optimizer steps also a step-named LoRA checkpoint (step_000500.lora.safetensors,
    # ~3 MB at rank 4; the last keep_last kept) that evaluation and the app list; 0: none.
    checkpoint_every_steps: int = 0
    max_nonfinite: int = 20  # consecutive non-finite (unscaled) losses that stop the run
    # float16: the run stops when the dynamic loss scale falls below this (gradients would
    # underflow silently); overflow skips themselves are routine and never stop a run.
    min_loss_scale: float = 1.0
    # Options of the leading trainers (README: "Training options"); all off by default.
    snr_gamma: float | None = None  # min-SNR-gamma loss weighting (Hang et al. 2023); 5 usual
    noise_offset: float = 0.0  # + offset * N(0,1) per sample and channel; 0.05 usual
    caption_dropout: float = 0.0  # share of samples trained on the empty prompt (CFG's branch)
    # Masked loss (training/masks.py): the loss weight off the garment, 1 on it; 0 is kohya's
    # --masked_loss, null: no masks. mask_normalize divides by the masked area (OneTrainer's).
    mask_background_weight: float | None = None
    mask_normalize: bool = False
    ema_decay: float | None = None  # EMA of the LoRA weights per optimizer step, e.g. 0.999
    text_encoder_lr: float | None = None  # with lora.text_encoder; null: train.learning_rate
    val_repeats: int = 4  # fixed timesteps per val image, so val loss compares across epochs
    sample_every: int = 1  # epochs between sample grids; 0: none
    # Epochs between evaluations during training (FID/KID, CLIP and garment scores of the epoch's
    # checkpoint on eval.split, appended to eval/fid.csv as evaluate_fid.py would); 0: none.
    eval_every: int = 0
    eval_images: int = 8  # the fixed prompt set those evaluations use (eval.num_images after)
    sample_steps: int = 25  # sampler steps for those grids
    sample_guidance: float = 7.5
    sample_seeds: list[int] = field(default_factory=lambda: [0, 1])
    sample_prompts: list[str] = field(default_factory=lambda: list(PAPER_PROMPTS))


@dataclass
class EvalConfig:
    backend: Literal["tfhub", "keras", "auto"] = "tfhub"  # auto: demo only, may be untrained
    inception_weights: str | None = None  # local TF-Hub module folder or Keras weights file
    num_images: int | None = None  # generated images per checkpoint; null: one per split image
    split: Literal["train", "val", "test"] = "test"
    steps: int = 50  # sampler steps (the paper: 50)
    guidance: float = 7.5
    batch_size: int = 4
    kid_subsets: int = 100
    kid_subset_size: int = 1000  # at most; smaller sets use half their size (the table says so)
    # How images reach Inception's 299 px (evaluation/inception.py): clean-fid's "clean" resize,
    # TensorFlow 2's bilinear (tf.image.resize) or TensorFlow 1's (the 2015 FID graph's, TTUR's
    # and clean-fid's legacy_tensorflow); FIDs compare only within one protocol.
    protocol: Literal["clean", "tensorflow2", "tensorflow1"] = "clean"
    # CLIP for the CLIP score and zero-shot garment type / on-model rate (evaluation/clip.py):
    # auto (pretrained when cached or downloadable, else those columns stay empty and the
    # summary says why), pretrained, random (labelled: numbers mean nothing), none, local:DIR,
    # hf:DIR (a transformers CLIP folder, e.g. FashionCLIP; converted once, cached beside it).
    clip: str = "auto"
    clip_preset: str = "clip-vit-large-patch14"
    # The column that marks a run's best checkpoint in fid.md, the grid and the sweep table.
    select: Literal["kid", "fid", "clip", "type_accuracy", "colour_top1", "gender_top1",
                    "cmmd", "fd_dinov2", "coverage", "density"] = "kid"
    # DINOv2 ViT for FD-DINOv2 and precision/recall/density/coverage (evaluation/dinov2.py):
    # auto (facebook/dinov2-large when cached or downloadable, else those columns are marked off
    # with the reason), none, hf:DIR (a transformers Dinov2Model folder) or hf:OWNER/NAME.
    dinov2: str = "auto"
    # Bootstrap resamples of the images for FID's, FD-DINOv2's and CMMD's standard errors and
    # 95% intervals (evaluation/distances.py); 0: none.
    bootstrap: int = 20


@dataclass
class OutputConfig:
    dir: str = "runs/default"
    # Also write each LoRA checkpoint in these formats beside it (best.kohya.safetensors, ...):
    # kohya for AUTOMATIC1111 / ComfyUI, diffusers for load_lora_weights.
    export: list[Literal["kohya", "diffusers"]] = field(default_factory=list)


@dataclass
class Config:
    seed: int = 42
    data: DataConfig = field(default_factory=DataConfig)
    captions: CaptionsConfig = field(default_factory=CaptionsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    def save(self, path: str | Path) -> Path:
        """Write the resolved config atomically; ``load_config(path)`` gives it back."""
        return atomic_write_text(path, "# fashion-sd resolved config\n" + self.to_yaml())


# --------------------------------------------------------------------------------------------
# Loading: YAML + overrides -> typed values, collecting every problem with its key and source.


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in typing.get_args(tp))}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


_MISMATCH = object()


def _coerce(value: Any, tp: Any) -> Any:
    """``value`` as type ``tp``, or ``_MISMATCH``. Never guesses beyond what is stated below."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            out = _coerce(value, arg)
            if out is not _MISMATCH:
                return out
        return _MISMATCH
    if origin is Literal:
        return value if value in typing.get_args(tp) else _MISMATCH
    if tp is type(None):
        return None if value is None else _MISMATCH
    if tp is bool:
        return value if isinstance(value, bool) else _MISMATCH
    if tp is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _MISMATCH
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # PyYAML reads YAML 1.1, where `5e-5` (no dot) is a string; accept it as the number it is.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                return _MISMATCH
        return _MISMATCH
    if tp is str:
        return value if isinstance(value, str) else _MISMATCH
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            return _MISMATCH
        items = [_coerce(v, item_tp) for v in value]
        return _MISMATCH if any(i is _MISMATCH for i in items) else items
    if origin is dict:
        key_tp, val_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            return _MISMATCH
        out = {}
        for k, v in value.items():
            ck, cv = _coerce(k, key_tp), _coerce(v, val_tp)
            if ck is _MISMATCH or cv is _MISMATCH:
                return _MISMATCH
            out[ck] = cv
        return out
    raise TypeError(f"config type {tp!r} is not supported")  # a programming error, not user input


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def valid_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted key a config accepts, e.g. ``lora.rank``."""
    keys = []
    for name, tp in _field_types(cls).items():
        key = prefix + name
        keys.append(key)
        if dataclasses.is_dataclass(tp):
            keys.extend(valid_keys(tp, key + "."))
    return keys


def _unknown_key(key: str, source: str) -> str:
    close = difflib.get_close_matches(key, valid_keys(), n=1, cutoff=0.6)
    if not close:  # a typo in the last part only: compare with siblings
        section, _, leaf = key.rpartition(".")
        siblings = [k.rpartition(".")[2] for k in valid_keys() if k.rpartition(".")[0] == section]
        close = [f"{section}.{m}" if section else m
                 for m in difflib.get_close_matches(leaf, siblings, n=1, cutoff=0.5)]
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"{source}: unknown key '{key}'{hint}"


# Values that no longer exist under their old name: (key, old value) -> why and what to set.
RENAMED_VALUES = {
    ("eval.protocol", "legacy_tensorflow"):
        "was renamed 'tensorflow2': it is TensorFlow 2's half-pixel bilinear resize "
        "(tf.image.resize), not clean-fid's legacy_tensorflow mode, which resizes as TensorFlow 1 "
        "did (no half-pixel offset; the original FID's): set eval.protocol: tensorflow2 to keep "
        "the old numbers, or tensorflow1 to compare with clean-fid's legacy_tensorflow / TTUR",
}


def _apply(obj: Any, mapping: dict, source: str, prefix: str, errors: list[str],
           sources: dict[str, str]) -> None:
    """Set fields of dataclass ``obj`` from ``mapping``; a sub-mapping updates a nested section.

    ``sources`` records where each key's value came from, for the messages of :func:`validate`.
    """
    types_ = _field_types(type(obj))
    for name, value in mapping.items():
        key = f"{prefix}{name}"
        if name not in types_:
            errors.append(_unknown_key(key, source))
            continue
        tp = types_[name]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                errors.append(f"{source}: '{key}' must be a mapping of {', '.join(_field_types(tp))}"
                              f", got {value!r}")
                continue
            _apply(getattr(obj, name), value, source, key + ".", errors, sources)
            continue
        if isinstance(value, str) and (key, value) in RENAMED_VALUES:
            errors.append(f"{source}: '{key}' {value!r} {RENAMED_VALUES[key, value]}")
            continue
        coerced = _coerce(value, tp)
        if coerced is _MISMATCH:
            errors.append(f"{source}: '{key}' must be {_type_name(tp)}, got {value!r}")
            continue
        if typing.get_origin(tp) is dict:
            # Mappings merge key by key, so `--set captions.exclude.articleType=[Socks]` keeps the
            # default masterCategory excludes; set a key to [] to clear it.
            coerced = {**getattr(obj, name), **coerced}
        setattr(obj, name, coerced)
        sources.pop(key, None)  # re-insert, so the newest setting is last
        sources[key] = source


def _nest(key: str, value: Any) -> dict:
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


def parse_override(text: str) -> tuple[str, Any]:
    """``'train.learning_rate=1e-4'`` -> ``('train.learning_rate', 1e-4)``; values are YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected section.key=value, e.g. --set lora.rank=8")
    key = key.strip()
    try:
        value = strict_yaml(raw) if raw.strip() else None
    except YamlLimitError as exc:
        raise ConfigError(f"--set {text!r}: {exc}") from None
    except yaml.YAMLError:
        value = raw  # every non-string value has a YAML form, so this was meant as text
    if not isinstance(value, str) and value is not None and _accepts_str(key):
        value = raw  # e.g. a template "{article} {productDisplayName}" reads as a YAML mapping
    return key, value


def _accepts_str(key: str) -> bool:
    cls: Any = Config
    for part in key.split("."):
        hints = _field_types(cls) if dataclasses.is_dataclass(cls) else {}
        if part not in hints:
            return False
        cls = hints[part]
    return not dataclasses.is_dataclass(cls) and _coerce("x", cls) is not _MISMATCH


# A config or sweep file is a few hundred values nested four deep; these bounds are far above
# that and far below what a crafted file (YAML aliases that expand to billions of values, a
# nesting that overflows the parser's recursion) would need.
YAML_MAX_DEPTH = 32  # nested mappings / lists
YAML_MAX_VALUES = 100_000  # values once every alias is expanded


class YamlLimitError(yaml.YAMLError):
    """A YAML file this project refuses to read: a duplicate key, too deep, too large."""


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader that refuses a key given twice in one mapping (YAML forbids it;
    PyYAML keeps the last silently), nesting deeper than ``YAML_MAX_DEPTH`` and documents whose
    aliases expand to more than ``YAML_MAX_VALUES`` values (a "billion laughs" file)."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > YAML_MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise YamlLimitError(f"nested more than {YAML_MAX_DEPTH} levels deep (line "
                                     f"{mark.line + 1}); a config is a few levels deep")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    first = seen.get(key)
                    seen.setdefault(key, line)
                except TypeError:
                    continue  # an unhashable key: PyYAML's own error says so
                if first is not None:
                    where = f"on lines {first} and {line}" if first != line else f"on line {line}"
                    raise YamlLimitError(f"key {key!r} is given twice, {where}; keep one (YAML "
                                         "forbids duplicates, and only one value would count)")
        return super().construct_mapping(node, deep=deep)


def _expanded_size(node, sizes: dict, open_: set) -> int:
    """How many values ``node`` stands for once every alias is expanded (memoised: linear in
    the distinct nodes, however far the aliases expand)."""
    if id(node) in sizes:
        return sizes[id(node)]
    if id(node) in open_:
        raise YamlLimitError(f"an alias refers to a value that contains it (line "
                             f"{node.start_mark.line + 1}): it would expand without end")
    open_.add(id(node))
    total = 1
    if isinstance(node, yaml.SequenceNode):
        total += sum(_expanded_size(child, sizes, open_) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        total += sum(_expanded_size(k, sizes, open_) + _expanded_size(v, sizes, open_)
                     for k, v in node.value)
    open_.discard(id(node))
    sizes[id(node)] = total
    if total > YAML_MAX_VALUES:
        raise YamlLimitError(f"expands to more than {YAML_MAX_VALUES:,} values (line "
                             f"{node.start_mark.line + 1}: aliases that repeat aliases?); a "
                             "config holds a few hundred")
    return total


def strict_yaml(text: str):
    """``yaml.safe_load(text)`` that raises :class:`YamlLimitError` for a duplicate key, nesting
    deeper than ``YAML_MAX_DEPTH`` or more than ``YAML_MAX_VALUES`` values after aliases."""
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node, {}, set())
        return loader.construct_document(node)
    finally:
        loader.dispose()


def read_yaml_mapping(path: Path, error: type[Exception], example: str, what: str) -> dict:
    """A YAML file's top-level mapping, or ``error`` naming the file: not text, not YAML, not a
    mapping (of ``what``), a key given twice, too deep or too large (:func:`strict_yaml`);
    ``example`` is what to give instead."""
    try:
        data = strict_yaml(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise error(f"{path}: not a text file; give {example}") from None
    except YamlLimitError as exc:
        raise error(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise error(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a mapping of {what} at the top level")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the YAML file at ``path``, then each ``key=value`` override; validated."""
    cfg = Config()
    errors: list[str] = []
    sources: dict[str, str] = {}
    source = str(path) if path is not None else "defaults"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found (the shipped ones are in configs/)"
                              if not p.exists() else f"{p}: is a folder; give a config .yaml file")
        data = read_yaml_mapping(p, ConfigError, "a YAML config such as configs/demo.yaml",
                                 "sections")
        _apply(cfg, data, source, "", errors, sources)
    for text in overrides:
        key, value = parse_override(text)
        _apply(cfg, _nest(key, value), "--set", "", errors, sources)
    for key, msg in validate(cfg):
        # A section-level problem (the split's sum) names the last place one of its keys was set.
        origin = sources.get(key) or next(
            (src for k, src in reversed(sources.items()) if k.startswith(key + ".")), source)
        errors.append(f"{origin}: {msg}")
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))
    return cfg


# --------------------------------------------------------------------------------------------
# Values that type-check but cannot run.

_WEIGHTS = re.compile(r"^(pretrained|random|auto|local:.+)$")
# Seeds go to NumPy's and TensorFlow's generators, which take 32-bit unsigned ones.
SEED_END = 2**32
SEED_RULE = "from 0 to 4294967295 (2**32 - 1): NumPy and TensorFlow take 32-bit seeds"


class _Checks:
    """The impossible values found so far, as (key, "'key' ... how to fix")."""

    def __init__(self, cfg: Config):
        self.cfg, self.errs = cfg, []

    def need(self, ok: bool, key: str, msg: str) -> None:
        if not ok:
            self.errs.append((key, f"'{key}' {msg}, got {_get(self.cfg, key)!r}"))


def validate(cfg: Config) -> list[tuple[str, str]]:
    """Every impossible value in ``cfg`` as (key, "'key' ... how to fix"), section by section."""
    checks = _Checks(cfg)
    for section in (_check_data, _check_model, _check_train, _check_eval):
        section(checks, cfg)
    return checks.errs


def _check_data(c: _Checks, cfg: Config) -> None:
    """The seed, data and captions sections."""
    c.need(0 <= cfg.seed < SEED_END, "seed", "must be " + SEED_RULE)
    c.need(valid_size(cfg.data.resolution), "data.resolution",
         "must be a positive multiple of 64, or [width, height] of two (the VAE downsamples by "
         "8, the U-Net by 8 more)")
    s = cfg.captions.split
    for name in ("train", "val", "test"):
        c.need(getattr(s, name) >= 0, f"captions.split.{name}", "must be >= 0")
    c.need(s.train > 0, "captions.split.train", "must be > 0")
    total = s.train + s.val + s.test
    if not math.isclose(total, 1.0, abs_tol=1e-6):
        c.errs.append(("captions.split", f"'captions.split' fractions must sum to 1, got train {s.train} + val {s.val} "
                    f"+ test {s.test} = {total:g}"))
    c.errs.extend(("captions.template", e) for e in template_errors(cfg.captions.template))
    c.need(cfg.captions.max_images is None or cfg.captions.max_images > 0,
         "captions.max_images", "must be > 0 or null (all rows)")
    c.need(cfg.captions.stratify_min_count >= 1, "captions.stratify_min_count", "must be >= 1")
    c.need(cfg.captions.image_workers >= 1, "captions.image_workers", "must be >= 1")
    c.need(cfg.captions.max_tokens >= 3, "captions.max_tokens", "must be >= 3")
    for section in ("include", "exclude"):
        for col in getattr(cfg.captions, section):
            if col not in CATEGORY_COLUMNS:
                c.errs.append((f"captions.{section}", f"'captions.{section}.{col}' is not a "
                             f"category column; use one of {', '.join(CATEGORY_COLUMNS)}"))


def _check_model(c: _Checks, cfg: Config) -> None:
    """The model and LoRA sections."""
    c.need(bool(_WEIGHTS.match(cfg.model.weights)), "model.weights",
         "must be pretrained, random, auto or local:DIR")
    c.need(cfg.lora.rank > 0, "lora.rank", "must be > 0")
    c.need(cfg.lora.rank <= 1024, "lora.rank", "must be at most 1024 (SD 1.x's widest projection "
         "is 1280; 4 to 128 is usual)")
    c.need(cfg.lora.alpha > 0, "lora.alpha", "must be > 0")
    c.need(cfg.lora.alpha <= 64 * max(cfg.lora.rank, 1), "lora.alpha",
         "must be at most 64 x lora.rank (the LoRA's scale alpha / rank; 1 to 2 is usual)")
    c.need(len(cfg.lora.targets) > 0, "lora.targets", "must name at least one layer")
    c.need(cfg.lora.init_from is None or bool(cfg.lora.init_from.strip()), "lora.init_from",
         "must be a LoRA checkpoint path or null")


def _check_train(c: _Checks, cfg: Config) -> None:
    """The train section."""
    t = cfg.train
    c.need(t.epochs > 0, "train.epochs", "must be > 0")
    c.need(t.max_steps is None or t.max_steps > 0, "train.max_steps", "must be > 0 or null")
    c.need(t.batch_size > 0, "train.batch_size", "must be > 0")
    c.need(0 < t.learning_rate <= 1, "train.learning_rate",
         "must be a positive number, at most 1 (1e-5 to 1e-3 is usual for LoRA)")
    c.need(t.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
    c.need(0 <= t.weight_decay <= 1, "train.weight_decay", "must be from 0 to 1 (0.01 is usual)")
    c.need(t.grad_clip is None or 0 < t.grad_clip <= 1e6, "train.grad_clip",
         "must be above 0 and at most 1e6 (1 is usual), or null (off)")
    c.need(t.grad_accum >= 1, "train.grad_accum", "must be >= 1")
    c.need(t.keep_last >= 0, "train.keep_last", "must be >= 0")
    c.need(t.save_every_steps >= 0, "train.save_every_steps", "must be >= 0 (0: at epoch ends only)")
    c.need(t.checkpoint_every_steps >= 0, "train.checkpoint_every_steps", "must be >= 0 (0: none)")
    c.need(t.max_nonfinite >= 1, "train.max_nonfinite", "must be >= 1")
    c.need(0 < t.min_loss_scale <= 1e12, "train.min_loss_scale",
         "must be above 0 and at most 1e12 (Keras' first loss scale is 32768; 1 is usual)")
    c.need(not (t.jit_compile is True and t.deterministic), "train.jit_compile",
         "true cannot hold with train.deterministic: true (Keras runs op-deterministic steps "
         "without XLA); set train.jit_compile: auto or false, or train.deterministic: false")
    c.need(t.snr_gamma is None or 0 < t.snr_gamma <= 1000,
         "train.snr_gamma", "must be above 0 and at most 1000 (5 is usual) or null (off)")
    c.need(0 <= t.noise_offset <= 1, "train.noise_offset", "must be from 0 (off) to 1; 0.05 is usual")
    c.need(0 <= t.caption_dropout < 1, "train.caption_dropout", "must be from 0 (off) to below 1")
    c.need(t.mask_background_weight is None or 0 <= t.mask_background_weight <= 1,
         "train.mask_background_weight", "must be from 0 (the garment only) to 1, or null (no "
         "masks)")
    c.need(not t.mask_normalize or t.mask_background_weight is not None, "train.mask_normalize",
         "needs train.mask_background_weight (the masks it normalises by)")
    c.need(t.ema_decay is None or 0 < t.ema_decay < 1, "train.ema_decay",
         "must be between 0 and 1 (0.999 is usual) or null (off)")
    c.need(t.text_encoder_lr is None or 0 < t.text_encoder_lr <= 1, "train.text_encoder_lr",
         "must be above 0 and at most 1, or null (train.learning_rate)")
    c.need(t.val_repeats >= 1, "train.val_repeats", "must be >= 1")
    c.need(cfg.data.shard_rows >= 1, "data.shard_rows", "must be >= 1 (1024 is usual)")
    c.need(t.sample_every >= 0, "train.sample_every", "must be >= 0 (0: no sample grids)")
    c.need(t.eval_every >= 0, "train.eval_every", "must be >= 0 (0: no evaluation while training)")
    c.need(t.eval_images >= 2, "train.eval_images", "must be >= 2 (a covariance needs two images)")
    # The sampling settings as generate.py's flags take them (--steps, --guidance, --seed).
    c.need(1 <= t.sample_steps <= 1000, "train.sample_steps", "must be from 1 to 1000")
    c.need(0 <= t.sample_guidance <= 100, "train.sample_guidance",
         "must be from 0 to 100 (classifier-free guidance; 7.5 is usual)")
    c.need(all(0 <= s < SEED_END for s in t.sample_seeds), "train.sample_seeds",
         "must each be " + SEED_RULE)
    c.need(bool(t.sample_seeds) or not t.sample_every, "train.sample_seeds",
         "must list at least one seed for the sample grids (or set train.sample_every: 0)")
    c.need(all(p.strip() for p in t.sample_prompts), "train.sample_prompts",
         "must not contain empty prompts")


def _check_eval(c: _Checks, cfg: Config) -> None:
    """The eval and output sections, and integer ranges over the whole config."""
    c.need(cfg.eval.num_images is None or cfg.eval.num_images >= 2, "eval.num_images",
         "must be >= 2 (a distance compares sets) or null")
    for key in ("steps", "batch_size", "kid_subsets", "kid_subset_size"):
        c.need(getattr(cfg.eval, key) >= 1, f"eval.{key}", "must be >= 1")
    c.need(cfg.eval.steps <= 1000, "eval.steps", "must be from 1 to 1000 (50 is the paper's)")
    c.need(0 <= cfg.eval.guidance <= 100, "eval.guidance",
         "must be from 0 to 100 (classifier-free guidance; 7.5 is usual)")
    c.errs.extend((key, f"'{key}' must be below 2**31 (2147483648), got {value}")
                for key, value in _integers(cfg)
                if key not in ("seed", "train.sample_seeds") and abs(value) >= 2**31)
    c.need(cfg.eval.clip in ("auto", "pretrained", "random", "none")
         or (cfg.eval.clip.startswith(("local:", "hf:")) and len(cfg.eval.clip.split(":", 1)[1]) > 0),
         "eval.clip", "must be auto, pretrained, random, none, local:DIR (a keras-hub CLIP preset "
         "folder) or hf:DIR (a transformers CLIP folder)")

    c.need(cfg.eval.clip_preset in ARCHITECTURES or cfg.eval.clip.startswith(("local:", "hf:")),
         "eval.clip_preset", f"must be one of {', '.join(ARCHITECTURES)}")
    c.need(cfg.eval.select in ("kid", "fid", "fd_dinov2", "coverage", "density")
         or cfg.eval.clip != "none",
         "eval.select", f"{cfg.eval.select} needs CLIP: set eval.clip to auto, pretrained, "
         "local:DIR or hf:DIR, or eval.select: kid")
    c.need(cfg.eval.select not in ("fd_dinov2", "coverage", "density") or cfg.eval.dinov2 != "none",
         "eval.select", f"{cfg.eval.select} needs DINOv2: set eval.dinov2 to auto or hf:DIR, or "
         "eval.select: kid")
    c.need(cfg.eval.dinov2 in ("auto", "none")
         or (cfg.eval.dinov2.startswith("hf:") and len(cfg.eval.dinov2) > 3),
         "eval.dinov2", "must be auto, none, hf:DIR (a transformers Dinov2Model folder) or "
         "hf:OWNER/NAME")
    c.need(cfg.eval.bootstrap == 0 or 2 <= cfg.eval.bootstrap <= 10_000, "eval.bootstrap",
         "must be 0 (none) or from 2 to 10000 resamples")
    c.need(bool(cfg.output.dir), "output.dir", "must not be empty")
    c.need(len(set(cfg.output.export)) == len(cfg.output.export), "output.export",
         "must not repeat a format")


def _integers(obj: Any, prefix: str = ""):
    """(key, value) of every integer setting, in lists too."""
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), prefix + f.name
        if dataclasses.is_dataclass(value):
            yield from _integers(value, key + ".")
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, int) and not isinstance(v, bool):
                yield key, v


def _get(cfg: Config, key: str) -> Any:
    obj: Any = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


# --------------------------------------------------------------------------------------------
# The same two options on every script.


def add_config_arguments(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    parser.add_argument("--config", default=default, help="YAML config (see configs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE",
                        help="override one key, e.g. --set lora.rank=8 (repeatable)")


def config_from_args(args: argparse.Namespace) -> Config:
    return load_config(args.config, args.overrides)
