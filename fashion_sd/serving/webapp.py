"""The assistant's web page (Gradio Blocks) over :class:`fashion_sd.serving.assistant.Assistant`.

Only layout and wiring live here; what a click does is in ``assistant.py``. Every generation goes
through Gradio's queue with one worker on the model (``concurrency_id="model"``), so requests
wait their turn in a bounded queue and a full queue answers "busy, try again".
"""

from __future__ import annotations

import logging
import random

import gradio as gr

from fashion_sd.catalogue import article_types
from fashion_sd.caption_template import CaptionError
from fashion_sd.serving.assistant import (
    ATTRIBUTES,
    BASE,
    LIMITS,
    Assistant,
    Request,
    RequestError,
    build_prompt,
    caption_of,
    check_settings,
    prompt_warnings,
    vocabulary,
)

log = logging.getLogger(__name__)

UNTRAINED_NOTE = ("**Untrained demo weights.** This app runs on randomly initialised weights, "
                  "not a trained Stable Diffusion: the pictures are coloured noise. They show that "
                  "the app works, not what the model can draw. Start it with `model.weights: "
                  "pretrained` (or `local:DIR`) for real images.")
LABELS = {"year": "Year", "usage": "Usage", "season": "Season", "colour": "Colour",
          "gender": "Gender", "article": "Article type"}
# The order of the generate endpoint's inputs: its keyword names for gradio_client.
API_INPUTS = ("prompt", "seed", "num_images", "steps", "negative_prompt", "guidance",
              "checkpoint", "strength")


def _choices(assistant: Assistant) -> dict[str, list[tuple[str, str]]]:
    try:
        vocab = vocabulary(assistant.cfg.data.captions)
    except CaptionError as exc:  # no captions yet: every article type the catalogue knows
        log.warning("%s; the pickers offer article types only", exc)
        vocab = {a: [] for a in ATTRIBUTES}
        vocab["article"] = [(a, 0) for a in sorted(article_types.SINGULAR)]
    return {a: [("any", "")] + [(f"{v} ({n})" if n else v, v) for v, n in values]
            for a, values in vocab.items()}


def _checkpoint_choices(assistant: Assistant):
    rows = assistant.checkpoints()
    best = next((c.name for c in rows if c.best), BASE)
    return [(c.label, c.name) for c in rows], best


def _gallery_items(results) -> list[tuple[str, str]]:
    return [(str(path), caption_of(s)) for r in results for path, s in zip(r.paths, r.settings)]


def _thumbnails(columns: int, height: int) -> dict:
    """A gallery of small squares with their captions; one image does not fill the width."""
    return {"columns": columns, "height": height, "object_fit": "contain", "preview": False,
            "fit_columns": False, "buttons": ["download", "download_all", "fullscreen"]}


def _header(random_init: bool) -> None:
    gr.Markdown("# fashion-sd · fashion synthesis assistant\n"
                "Pick a garment, or type a prompt, and get images to take ideas from.")
    if random_init:
        gr.Markdown(f"⚠️ {UNTRAINED_NOTE}", elem_id="untrained-note")


def _pickers(choices: dict) -> list[gr.Dropdown]:
    # Side by side across the page: stacked, the six menus alone took a laptop's first screen.
    with gr.Row():
        pickers = [gr.Dropdown(choices=choices[a], value="", label=LABELS[a],
                               elem_id=f"pick-{a}", min_width=140) for a in ATTRIBUTES]
    return pickers


def _prompt_fields():
    # One row, the columns as wide as those below: the prompt reads on one line.
    with gr.Row():
        with gr.Column(scale=2):
            with gr.Group():
                free_text = gr.Textbox(label="Your words",
                                       placeholder="added to the prompt, e.g. with a floral print")
                replace = gr.Checkbox(label="Use only my words as the prompt")
        with gr.Column(scale=3):
            prompt = gr.Textbox(label="Prompt the model sees", interactive=False,
                                elem_id="prompt")
            prompt_note = gr.Markdown(elem_id="prompt-note")
    return free_text, replace, prompt, prompt_note


def _variations():
    with gr.Row():
        num_images = gr.Slider(*LIMITS["num_images"], value=4, step=1, label="Variations",
                               elem_id="variations", min_width=160)
        seed = gr.Number(value=0, precision=0, label="Seed (variations use seed, seed+1, …)",
                         elem_id="seed", min_width=160)
    return num_images, seed


def _buttons():
    # Gradio's default min_width (160 px) puts "New seeds" on a second line in this column.
    with gr.Row():
        go = gr.Button("Generate", variant="primary", elem_id="generate", min_width=100)
        same = gr.Button("Same seed", elem_id="same-seed", min_width=100)
        new = gr.Button("New seeds", elem_id="new-seeds", min_width=100)
    return go, same, new


def _model(ckpt_choices, ckpt_default):
    """The model picker, with the comparison of its checkpoint against the base model."""
    with gr.Row():
        # Custom values pass Gradio so that checkpoints written after start can be asked
        # for; Assistant.find_checkpoint accepts only names of listed files.
        checkpoint = gr.Dropdown(choices=ckpt_choices, value=ckpt_default, label="Model",
                                 elem_id="checkpoint", scale=4, allow_custom_value=True)
        rescan_button = gr.Button("↻", scale=0, min_width=40)
    compare_button = gr.Button("Compare with the base model", elem_id="compare")
    return checkpoint, rescan_button, compare_button


def _advanced(cfg):
    """The settings a designer rarely changes, folded."""
    with gr.Accordion("Advanced: negative prompt, LoRA strength, steps, guidance", open=False):
        negative = gr.Textbox(label="Negative prompt", placeholder="what to avoid")
        strength = gr.Slider(*LIMITS["strength"], value=1.0, step=0.05,
                             label="LoRA strength (no effect on the base model)")
        steps = gr.Slider(*LIMITS["steps"], value=cfg.train.sample_steps, step=1,
                          label="Sampling steps")
        guidance = gr.Slider(*LIMITS["guidance"], value=cfg.train.sample_guidance, step=0.5,
                             label="Guidance scale")
    return negative, strength, steps, guidance


def _image_area():
    status = gr.Markdown(elem_id="status")
    results = gr.Gallery(label="Images", elem_id="results", **_thumbnails(4, 420))
    comparison = gr.Gallery(label="Base model | chosen checkpoint", elem_id="comparison",
                            **_thumbnails(2, 260))
    return status, results, comparison


def build_app(assistant: Assistant, queue_size: int = 16) -> gr.Blocks:
    cfg = assistant.cfg
    template = cfg.captions.template
    choices = _choices(assistant)
    ckpt_choices, ckpt_default = _checkpoint_choices(assistant)
    tokenizer = assistant.comps.tokenizer

    def preview(*values):
        *picked, free_text, replace = values
        try:
            prompt = build_prompt(template, dict(zip(ATTRIBUTES, picked)), free_text, replace)
        except (RequestError, CaptionError) as exc:
            return "", f"⚠️ {exc}"
        notes = prompt_warnings(prompt, tokenizer)
        return prompt, " ".join(f"⚠️ {n}" for n in notes)

    def validate(prompt, seed, num_images, steps, negative_prompt, guidance, checkpoint, strength):
        verdict = {name: gr.validate(True, "") for name in API_INPUTS}
        try:
            prompt_warnings(prompt, tokenizer)
            check_settings(num_images, steps, guidance, strength, seed)
            assistant.find_checkpoint(checkpoint or BASE)
        except RequestError as exc:
            verdict[exc.field] = gr.validate(False, str(exc))
        return [verdict[name] for name in API_INPUTS]

    def _request(prompt, seed, num_images, steps, negative_prompt, guidance, checkpoint, strength):
        # The API endpoint hands its inputs over unprocessed (preprocess=False): a script's
        # "abc" for a number reaches check_settings, which names the field, instead of failing
        # inside Gradio's Slider with a TypeError and a server traceback. Text fields likewise.
        for name, value in (("prompt", prompt), ("negative_prompt", negative_prompt),
                            ("checkpoint", checkpoint)):
            if value is not None and not isinstance(value, str):
                raise gr.Error(f"{name.replace('_', ' ')} must be text, not {value!r:.40}")
        if prompt is None:  # a call without one once answered {"error": null}; a blank one
            # is the assistant's to refuse ("the prompt is empty"), as the page's is
            raise gr.Error("prompt is required: give the text to generate from, e.g. "
                           "\"an image of a 2011 Casual Fall White Men's Sweater\"")
        return Request(prompt=prompt, seed=seed, num_images=num_images, steps=steps,
                       negative_prompt=negative_prompt or "", guidance=guidance,
                       checkpoint=checkpoint or BASE, strength=strength)

    def _run(work, progress):
        try:
            return work(lambda done, total: progress((done, total), desc="sampling"))
        except RequestError as exc:
            raise gr.Error(str(exc)) from None
        except Exception as exc:  # out of memory, a broken checkpoint: say so, keep serving
            log.exception("generation failed")
            raise gr.Error(f"Generation failed: {type(exc).__name__}: {exc}") from None

    def generate(prompt: str, seed: int = 0, num_images: int = 4, steps: int = 25,
                 negative_prompt: str | None = None, guidance: float = 7.5, checkpoint: str = BASE,
                 strength: float = 1.0, progress=gr.Progress()):
        """Images for a prompt, seeds seed, seed+1, ...; each saved with its settings."""
        req = _request(prompt, seed, num_images, steps, negative_prompt, guidance, checkpoint,
                       strength)
        result = _run(lambda cb: assistant.generate(req, on_step=cb), progress)
        for note in result.warnings:
            gr.Warning(note)
        seeds = (f"seed {result.seeds[0]}" if len(result.seeds) == 1
                 else f"seeds {result.seeds[0]}–{result.seeds[-1]}")
        return _gallery_items([result]), (
            f"{len(result.paths)} image(s), {seeds}, saved in `{assistant.gallery.folder}`")

    def compare(prompt, seed, num_images, steps, negative_prompt, guidance, checkpoint, strength,
                progress=gr.Progress()):
        req = _request(prompt, seed, 1, steps, negative_prompt, guidance, checkpoint, strength)
        if req.checkpoint == BASE:
            raise gr.Error("Choose a checkpoint to compare with the base model.")
        base, tuned = _run(lambda cb: assistant.compare(req, on_step=cb), progress)
        return _gallery_items([base, tuned]), f"seed {req.seed}: base model (left), {checkpoint} (right)"

    def history():
        return [(str(p), caption_of(s)) for p, s in assistant.gallery.items()]

    def rescan():
        rows, best = _checkpoint_choices(assistant)
        return gr.Dropdown(choices=rows, value=best)

    with gr.Blocks(title="fashion-sd assistant") as app:
        _header(assistant.random_init)
        pickers = _pickers(choices)
        free_text, replace, prompt, prompt_note = _prompt_fields()
        # Controls left, images right, the model picker and the folded settings under Generate:
        # at 1366x768 Generate and the image area are in the first screen (issue 31; the
        # browser test checks it).
        with gr.Row():
            with gr.Column(scale=2):
                num_images, seed = _variations()
                go, same, new = _buttons()
                checkpoint, rescan_button, compare_button = _model(ckpt_choices,
                                                                   ckpt_default)
                negative, strength, steps, guidance = _advanced(cfg)
            with gr.Column(scale=3):
                status, results, comparison = _image_area()
        with gr.Accordion("Gallery: every image made here (kept across restarts)", open=True):
            past = gr.Gallery(elem_id="history", **_thumbnails(8, 240))

        inputs = [prompt, seed, num_images, steps, negative, guidance, checkpoint, strength]
        model = {"concurrency_limit": 1, "concurrency_id": "model", "validator": validate}
        private = {"api_visibility": "private"}
        for control in [*pickers, free_text, replace]:
            control.change(preview, [*pickers, free_text, replace], [prompt, prompt_note],
                           queue=False, **private)
        # The page validates beside each field first; scripts get the same checks as errors
        # from the function itself (a failed validator only reaches them as a bare HTTP 400).
        go.click(generate, inputs, [results, status], api_name="page_generate", **model,
                 **private) \
            .then(history, None, past, **private)
        api_only = gr.Button(visible="hidden")
        api_only.click(generate, inputs, [results, status], api_name="generate",
                       concurrency_limit=1, concurrency_id="model", preprocess=False)
        same.click(generate, inputs, [results, status], api_name="page_same_seed", **model,
                   **private) \
            .then(history, None, past, **private)
        new.click(lambda: random.randrange(2**31), None, seed, queue=False, **private) \
            .then(generate, inputs, [results, status], api_name="page_new_seeds", **model,
                  **private) \
            .then(history, None, past, **private)
        compare_button.click(compare, inputs, [comparison, status], **model, **private) \
            .then(history, None, past, **private)
        rescan_button.click(rescan, None, checkpoint, **private)
        app.load(preview, [*pickers, free_text, replace], [prompt, prompt_note], **private)
        app.load(history, None, past, **private)
        app.load(rescan, None, checkpoint, **private)
    app.queue(max_size=queue_size, default_concurrency_limit=1)
    return app


def launch(app: gr.Blocks, assistant: Assistant, host: str = "127.0.0.1", port: int | None = None,
           **gradio_options):
    """Serve ``app``; only the gallery folder is served from disk besides Gradio's own files.

    ``port`` None takes the first free one from 7860 (a notebook cell can run twice);
    ``gradio_options`` go to Gradio's ``launch`` (``share``, ``auth``, ``prevent_thread_lock``).
    """
    return app.launch(server_name=host, server_port=port,
                      allowed_paths=[str(assistant.gallery.folder.resolve())], **gradio_options)
