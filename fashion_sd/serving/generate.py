"""Text -> image: our components (maybe LoRA-tuned) in the DDIM loop of :mod:`fashion_sd.sd.ddim`.

The loop, guidance and decoding are KerasCV's ``generate_image``, step for step, without its
``StableDiffusion`` object (which needs TensorFlow and rounds sizes to multiples of 128): the
same models and noise give the same pixels. Each image's starting noise is drawn from its own
seed, so an image depends on (prompt, seed, steps, guidance) only, not on what was batched with it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from fashion_sd import plots
from fashion_sd.errors import BackendError
from fashion_sd.files import atomic_write_text
from fashion_sd.images import image_size, valid_size
from fashion_sd.sd import ddim, lora, lora_file, models
from fashion_sd.sd.models import Components
from fashion_sd.sd.tokenizer import MAX_LENGTH, tokenize
from fashion_sd.serving.image_settings import ImageSettings

log = logging.getLogger(__name__)


class Sampler:
    """Generates images with the text encoder, U-Net and decoder of ``comps``.

    ``local``: run the models on this process alone, whatever strategy built them (the chief of
    a multi-worker run samples while the other workers wait; see :class:`_Local`).
    ``noise``: how a seed becomes the starting latent (:data:`fashion_sd.sd.ddim.NOISES`):
    ``philox`` (NumPy's, the same on every backend) or ``keras`` (``keras.random.normal``, which
    images made before December 2026 used; it differs between backends).
    ``rounding``: how decoded floats become uint8 pixels (:data:`fashion_sd.sd.ddim.ROUNDINGS`):
    ``round`` as diffusers does, or ``truncate`` as KerasCV did (images made before 2026-12-07).

    Example::

        source = resolve_inference_weights("random")
        sampler = Sampler(models.build_components(source, 64, INFERENCE))
        images = sampler.generate("an image of a Men's T-Shirt", seeds=[0, 1], steps=25)
    """

    def __init__(self, comps: Components, local: bool = False, noise: str = "philox",
                 rounding: str = "round"):
        if noise not in ddim.NOISES:
            raise ValueError(f"noise {noise!r}: use one of {', '.join(ddim.NOISES)}")
        self.noise, self.rounding = noise, ddim.check_rounding(rounding)

        missing = [n for n in INFERENCE if getattr(comps, n) is None]
        if missing:
            raise ValueError(f"the sampler needs {', '.join(missing)}")
        wrap = _Local if local else (lambda m: m)
        self.text_encoder = wrap(comps.text_encoder)
        self.diffusion_model = wrap(comps.diffusion_model)
        self.decoder = wrap(comps.decoder)
        self.comps = comps

    def encode(self, prompt: str):
        """(1, 77, 768) context; prompts over 77 tokens are truncated with a warning."""
        if not prompt.strip():
            raise ValueError("empty prompt")
        tokens, truncated = tokenize([prompt], self.comps.tokenizer)
        if truncated:
            log.warning("prompt over %d tokens truncated: %r", MAX_LENGTH, prompt)
        return self._context(tokens)

    def unconditional_context(self, negative_prompt: str | None = None):
        """(1, 77, 768) context guidance steers away from: the negative prompt's, else the empty
        prompt's (its tokens are KerasCV's ``_UNCONDITIONAL_TOKENS``: start, then end 76 times).
        A negative prompt over 77 tokens is refused, as KerasCV refused it."""
        tokens, truncated = tokenize(["" if negative_prompt is None else negative_prompt],
                                     self.comps.tokenizer)
        if truncated:
            n = len(self.comps.tokenizer.encode(negative_prompt))
            raise ValueError(f"negative prompt too long: {n} tokens, CLIP reads {MAX_LENGTH}; "
                             "shorten it")
        return self._context(tokens)

    def initial_noise(self, seeds: list[int]):
        w, h = image_size(self.comps.resolution)
        if self.noise == "philox":
            return ddim.starting_noise(seeds, (h // 8, w // 8, 4))
        return keras.ops.concatenate(
            [keras.random.normal((1, h // 8, w // 8, 4), seed=int(s)) for s in seeds], axis=0)

    def generate(self, prompt: str, seeds: list[int], steps: int = 50, guidance: float = 7.5,
                 negative_prompt: str | None = None, on_step=None) -> np.ndarray:
        """uint8 images (len(seeds), H, W, 3) for one prompt.

        ``on_step(done, total)`` is called after each sampling step (the app's progress bar).
        """
        contexts = (self.encode(prompt), self.unconditional_context(negative_prompt))
        latents = ddim.denoise(self._unet, self.initial_noise(seeds), contexts, steps, guidance,
                               on_step)
        return ddim.decode(self.decoder.predict_on_batch, latents, self.rounding)

    def _context(self, tokens):
        positions = np.arange(MAX_LENGTH, dtype=np.int32)[None]
        return self.text_encoder.predict_on_batch({"tokens": tokens, "positions": positions})

    def _unet(self, latent, timestep_embedding, context):
        return self.diffusion_model.predict_on_batch(
            {"latent": latent, "timestep_embedding": timestep_embedding, "context": context})


class _Local:
    """A model's ``predict_on_batch`` on this process alone.

    Under ``MultiWorkerMirroredStrategy`` Keras' ``predict_on_batch`` gathers every worker's
    outputs (an all-gather that waits for all of them), but a multi-worker run samples its
    preview grids on the chief only. Calling the model in a ``tf.function`` outside the
    strategy's replicas reads this worker's copy of the (mirrored) weights and talks to no one.
    """

    def __init__(self, model):
        # Only TensorFlow's multi-worker runs get here: other backends never import it.
        import tensorflow as tf

        self.model = model
        self._call = tf.function(lambda x: model(x, training=False))

    def predict_on_batch(self, inputs):
        return keras.ops.convert_to_numpy(self._call(inputs))


# --------------------------------------------------------------------------------------------
# A generation job: base model + optional LoRA -> PNGs, a contact sheet and a JSON sidecar.


INFERENCE = ("text_encoder", "diffusion_model", "decoder")  # what a sampler needs


def resolve_inference_weights(weights: str, cache_dir=None, seed: int = 0):
    """Where the inference components' weights come from (fails fast, builds nothing)."""

    return models.resolve_weights(weights, INFERENCE, cache_dir, seed)


def _build_sampler(source, resolution, seed: int = 0, build=None) -> Sampler:
    """:class:`Inference`'s first step: seed, build the text encoder, U-Net and decoder from
    ``source`` at ``resolution``, make the sampler. ``build(source, resolution)`` replaces the
    component builder (tests pass small models)."""

    if not valid_size(resolution):
        raise ValueError(f"resolution {resolution} is not a multiple of 64 (the U-Net needs it)")
    keras.utils.set_random_seed(seed)  # random-init weights, when asked for, are reproducible
    build = build or (lambda src, res: models.build_components(src, res, INFERENCE))
    return Sampler(build(source, resolution))


class Inference:
    """The one inference recipe (generate.py, evaluation, the app; :func:`load_sampler` is it for
    one job): the weights resolved and the text encoder, U-Net and decoder built once from
    ``model`` (the config's ``model`` section) at the base weights' dtype (float32 variables),
    then any number of LoRAs folded into the kernels one way (:func:`fashion_sd.sd.lora.folded`,
    as ``convert merge`` folds them), swapped in at a strength and undone exactly
    (:class:`fashion_sd.sd.lora.LoraSwap`), so changing checkpoint or strength never rebuilds.
    Images are sampled in float32 (:mod:`fashion_sd.sd.ddim`) and rounded to uint8.

    The one other sampler is training's: its preview grids and ``train.eval_every`` sample the
    model being trained, with its LoRA as the separate branch it trains (in the run's precision):
    folding it would change the frozen kernels the run trains against, and a second U-Net for
    the previews would double the memory.

    ``build(source, resolution)`` replaces the component builder (tests pass small models).
    """

    def __init__(self, model, resolution, seed: int = 0, build=None):
        if not valid_size(resolution):  # before the weights are resolved (maybe downloaded)
            raise ValueError(f"resolution {resolution} is not a multiple of 64 (the U-Net needs it)")
        self.source = resolve_inference_weights(model.weights, model.cache_dir, seed)
        self.sampler = _build_sampler(self.source, resolution, seed, build)
        self.comps = self.sampler.comps
        self.active: tuple[str | None, float] = (None, 0.0)
        self._swap = lora.LoraSwap()
        self._deltas: dict[str, list] = {}

    def use(self, lora_path=None, strength: float = 1.0) -> dict:
        """The base model (``lora_path`` None) or it with a LoRA at ``strength``; returns the
        LoRA's metadata. Its weight changes are computed once per file (one file's kept, so
        memory stays flat); a file that fails leaves the base model, never half a LoRA."""
        key = (None if lora_path is None else str(lora_path), float(strength))
        if lora_path is None:
            self._swap.reset()
            self.active = key
            return {}
        try:
            if key[0] not in self._deltas:
                # text_encoder: LoRAs imported from kohya/diffusers may change it too
                deltas, meta = lora.lora_deltas(lora_path, self.comps.diffusion_model,
                                                text_encoder=self.comps.text_encoder)
                self._deltas = {key[0]: (deltas, meta)}
            deltas, meta = self._deltas[key[0]]
            if key != self.active:
                self._swap.apply(deltas, strength)
        except Exception:
            self._swap.reset()
            self.active = (None, 0.0)
            raise
        self.active = key
        return meta


def load_sampler(model, resolution, seed: int = 0, lora_path=None,
                 strength: float = 1.0, noise: str = "philox",
                 rounding: str = "round") -> tuple[Sampler, dict]:
    """:class:`Inference` for one generation job: the base model with ``lora_path`` at
    ``strength``, starting latents drawn as ``noise`` says, pixels cut to uint8 as ``rounding``
    says. Returns the sampler and a record of what was used (weights source, LoRA, noise,
    rounding)."""
    ddim.check_rounding(rounding)  # before any weights are resolved or built
    meta = lora_file.check(lora_path, fits_model=False) if lora_path else None  # before any build
    if noise == "keras" and keras.config.backend() != "tensorflow":
        raise BackendError(
            "this image's starting noise was drawn by keras.random on TensorFlow (images made "
            "before the noise was recorded), which another backend draws differently: remake it "
            f"with KERAS_BACKEND=tensorflow (this is {keras.config.backend()})")
    inference = Inference(model, resolution, seed)
    source = inference.source
    if meta is not None and meta.get("base_weights") not in (None, source.id):
        log.warning("%s was trained on base weights %s; generating with %s", lora_path,
                    meta.get("base_weights"), source.id)
    inference.use(lora_path, strength)
    inference.sampler.noise, inference.sampler.rounding = noise, rounding
    record = {"noise": noise, "rounding": rounding, "weights": source.to_dict(), "random_init": source.is_random, "label": source.label,
              "lora": str(lora_path) if lora_path else None, "lora_metadata": meta,
              "lora_strength": strength if lora_path else None, "resolution": resolution,
              "model_seed": seed}
    return inference.sampler, record


def image_name(prompt_index: int, seed: int) -> str:
    return f"p{prompt_index:03d}_s{seed}.png"


def read_png_settings(path) -> dict:
    """The settings a generated PNG stores (:meth:`ImageSettings.save_png`), to reproduce it."""
    return ImageSettings.read_png(path).to_dict()


@dataclass
class Job:
    """What one generation makes: every prompt with every seed, at these settings."""

    prompts: list[str]
    seeds: list[int]
    steps: int = 50
    guidance: float = 7.5
    negative_prompt: str | None = None
    batch_size: int = 4  # seeds per sampler call (float rounding depends on the batch)
    keep: list[int] | None = None  # the seeds whose images are saved (--from-png: one)


def generate_to_folder(sampler: Sampler, job: Job, out, record: dict, progress=None) -> dict:
    """Every prompt with every seed into ``out``: PNGs, ``contact_sheet.png``, ``generate.json``.

    Each PNG records its settings and the seeds batched with it (float rounding depends on the
    batch), so ``--from-png`` regenerates that batch and keeps the one image, pixel for pixel.
    """
    prompts, seeds, steps, guidance = job.prompts, job.seeds, job.steps, job.guidance
    negative_prompt, batch_size, keep = job.negative_prompt, job.batch_size, job.keep

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if any(not p.strip() for p in prompts) or not prompts:
        raise ValueError("empty prompt: give --prompt TEXT, --prompts-file or garment attributes")
    rows, files = [], []
    jobs = [(i, p) for i, p in enumerate(prompts)]
    for i, prompt in (progress(jobs, "prompts") if progress else jobs):
        batches = [seeds[s: s + batch_size] for s in range(0, len(seeds), batch_size)]
        images = np.concatenate([sampler.generate(prompt, b, steps, guidance, negative_prompt)
                                 for b in batches])
        batch_of = {seed: b for b in batches for seed in b}
        kept = [(seed, img) for seed, img in zip(seeds, images) if keep is None or seed in keep]
        images = np.stack([img for _, img in kept])
        for seed, img in kept:
            path = out / image_name(i, seed)
            ImageSettings.from_record(
                record, prompt=prompt, negative_prompt=negative_prompt, seed=seed, steps=steps,
                guidance=guidance, batch_seeds=batch_of[seed]).save_png(path, img)
            files.append({"prompt_index": i, "prompt": prompt, "seed": seed, "file": path.name})
        rows.append((prompt, images))
    shown = [s for s in seeds if keep is None or s in keep]
    plots.sample_grid(rows, out / "contact_sheet.png", record["label"],
                      f"{steps} steps, guidance {guidance}", [f"seed {s}" for s in shown])
    sidecar = {**record, "prompts": prompts, "seeds": shown, "steps": steps, "guidance": guidance,
               "negative_prompt": negative_prompt, "images": files}
    atomic_write_text(out / "generate.json", json.dumps(sidecar, indent=2, default=str) + "\n")
    return sidecar
