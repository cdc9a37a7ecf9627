"""Our CLIP judge against transformers' and torchmetrics' own code: a small random-init
transformers ``CLIPModel`` is saved as a folder, read through ``eval.clip: hf:DIR`` (our converter,
no torch), and must give transformers' image features, text features and logits, and
torchmetrics' CLIP score, on real catalogue captions and the bundled photos."""

import gzip

import numpy as np
import pandas as pd
import pytest
from conftest import DEMO
from PIL import Image

from fashion_sd.evaluation import adherence
from fashion_sd.evaluation import clip as C
from fashion_sd.sd import hub_clip
from fashion_sd.sd.tokenizer import BPE_PATH, END_TOKEN, clip_tokenizer, tokenize

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SIZE = 32
PHOTOS = sorted((DEMO / "images").glob("*.jpg"))[:6]


def _openai_tokenizer_files(folder):
    """vocab.json and merges.txt as OpenAI's SimpleTokenizer builds its vocabulary from the BPE
    file the package ships (the files transformers' CLIPTokenizer reads)."""
    import json

    from keras_cv.src.models.stable_diffusion.clip_tokenizer import bytes_to_unicode

    merges = gzip.open(BPE_PATH).read().decode("utf-8").split("\n")[1: 49152 - 256 - 2 + 1]
    merges = [tuple(m.split()) for m in merges]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({v: i for i, v in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(folder, transformers model, processor): a small CLIP saved as save_pretrained writes it."""
    folder = tmp_path_factory.mktemp("hf-clip") / "tiny-clip"
    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        text_config=dict(hidden_size=64, intermediate_size=256, num_attention_heads=2,
                         num_hidden_layers=2),
        vision_config=dict(hidden_size=128, intermediate_size=512, num_attention_heads=2,
                           num_hidden_layers=2, image_size=SIZE, patch_size=8),
        projection_dim=32)
    model = transformers.CLIPModel(config).eval()
    with torch.no_grad():  # larger than init, so that the features differ visibly per input
        for p in model.parameters():
            if p.ndim > 1:
                p.mul_(4.0)
        model.logit_scale.fill_(2.0)
    model.save_pretrained(folder)
    _openai_tokenizer_files(folder)
    # OpenAI's _transform resizes the PIL image with PIL's bicubic, as transformers' PIL backend
    # does; transformers 5 made CLIPImageProcessor its torchvision backend, whose antialiased
    # tensor resize lands one grey level away on some pixels, so the PIL one is the reference.
    pil = getattr(transformers, "CLIPImageProcessorPil", transformers.CLIPImageProcessor)
    processor = transformers.CLIPProcessor(
        image_processor=pil(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE}),
        tokenizer=transformers.CLIPTokenizer.from_pretrained(folder))
    return folder, model, processor


@pytest.fixture(scope="module")
def ours(reference):
    folder, _, _ = reference
    model, why = C.load_clip(f"hf:{folder}", "clip-vit-large-patch14")
    assert why == "" and not model.random and model.resolution == SIZE
    return model


@pytest.fixture(scope="module")
def captions(demo_captions):
    """Real catalogue captions of different lengths, shortest to longest, and a short text."""
    texts = sorted(set(pd.read_csv(demo_captions).caption), key=len)
    return ["a shoe", texts[0], texts[len(texts) // 2], texts[-1]]


def _photos():
    return [np.asarray(Image.open(p).convert("RGB")) for p in PHOTOS]


def test_the_conversion_is_cached_beside_the_folder(reference, ours):
    folder, _, _ = reference
    cache = folder / "keras-hub-clip"
    assert (cache / "config.json").is_file() and (cache / "source.json").is_file()
    stamp = (cache / "source.json").stat().st_mtime_ns
    again, _ = C.load_clip(f"hf:{folder}", "clip-vit-large-patch14")  # from the cache
    assert (cache / "source.json").stat().st_mtime_ns == stamp
    np.testing.assert_array_equal(again.embed_texts(["a shoe"]), ours.embed_texts(["a shoe"]))


def test_tokens_are_transformers_clip_tokenizers(reference, captions):
    _, _, processor = reference
    ids, _ = tokenize(captions, clip_tokenizer())
    theirs = processor.tokenizer(captions, padding="max_length", max_length=77).input_ids
    np.testing.assert_array_equal(ids, np.asarray(theirs))  # both pad with the end token


def test_image_features_and_preprocessing_equal_transformers(reference, ours):
    _, model, processor = reference
    photos = _photos()
    pixels = processor(images=photos, return_tensors="pt").pixel_values
    np.testing.assert_allclose(C.preprocess(photos, SIZE), pixels.permute(0, 2, 3, 1).numpy(),
                               atol=1e-5)
    with torch.no_grad():
        theirs = model.get_image_features(pixel_values=pixels).pooler_output.numpy()
    np.testing.assert_allclose(ours.embed_images(photos), theirs, rtol=1e-5, atol=1e-5)


def test_text_features_and_logits_equal_transformers(reference, ours, captions):
    _, model, processor = reference
    photos = _photos()
    inputs = processor(text=captions, images=photos, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**inputs)
    text = ours.embed_texts(captions)
    with torch.no_grad():
        theirs = model.get_text_features(input_ids=inputs.input_ids,
                                         attention_mask=inputs.attention_mask).pooler_output
    np.testing.assert_allclose(text, theirs.numpy(), rtol=1e-5, atol=1e-5)
    image = ours.embed_images(photos)
    np.testing.assert_allclose(ours.logits(image, text), out.logits_per_image.numpy(),
                               rtol=1e-5, atol=1e-5)
    # The captions differ in length, so a text encoder that read the padding would differ here.
    assert np.abs(text[1] - text[2]).max() > 1e-3


def test_text_feature_is_the_first_end_tokens_whatever_the_padding(ours, captions):
    """keras-hub pools at argmax(ids); our ids hold the end token at every padded position, a tie
    that openai_padding removes (0 after the first end token, OpenAI's padding). The causal mask
    keeps whatever follows that token from reaching it: noise there changes nothing."""
    ids, _ = tokenize(captions[:2], clip_tokenizer())
    assert (ids == END_TOKEN).sum(axis=1).min() > 1  # the tie
    model = ours.model
    embedded = ours.embed_texts(captions[:2])
    zeros = hub_clip.openai_padding(ids)
    assert ((zeros == END_TOKEN).sum(axis=1) == 1).all()
    np.testing.assert_allclose(np.asarray(model.get_text_embeddings(zeros)), embedded,
                               rtol=1e-6, atol=1e-6)
    noise = np.where(np.cumsum(ids == END_TOKEN, axis=1) > 1, 1234, ids)
    np.testing.assert_allclose(np.asarray(model.get_text_embeddings(noise)), embedded,
                               rtol=1e-6, atol=1e-6)


def _tiny_transformers_clip(folder, **config):
    """A small random transformers CLIPModel saved in ``folder``, weights scaled as above."""
    torch.manual_seed(1)
    model = transformers.CLIPModel(transformers.CLIPConfig(**config)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1:
                p.mul_(4.0)
    model.save_pretrained(folder)
    return model


def test_widths_heads_and_gelu_keras_hub_takes_equal_transformers(tmp_path, captions):
    """What KerasCV's CLIP fixed and keras-hub's takes as arguments: exact GELU (LAION's CLIPs),
    MLPs not 4x wide, vision heads not of 64 channels."""
    layers = dict(hidden_act="gelu", num_hidden_layers=2)
    model = _tiny_transformers_clip(
        tmp_path / "gelu-clip", projection_dim=24,
        text_config=dict(hidden_size=48, intermediate_size=100, num_attention_heads=3, **layers),
        vision_config=dict(hidden_size=96, intermediate_size=200, num_attention_heads=4,
                           image_size=SIZE, patch_size=16, **layers))
    ours, _ = C.load_clip(f"hf:{tmp_path / 'gelu-clip'}", "clip-vit-large-patch14")
    photos = _photos()[:3]
    pixels = torch.from_numpy(C.preprocess(photos, SIZE)).permute(0, 3, 1, 2)
    ids, _ = tokenize(captions, clip_tokenizer())
    with torch.no_grad():
        image = model.get_image_features(pixel_values=pixels).pooler_output.numpy()
        text = model.get_text_features(input_ids=torch.from_numpy(ids).long()).pooler_output.numpy()
    np.testing.assert_allclose(ours.embed_images(photos), image, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ours.embed_texts(captions), text, rtol=1e-5, atol=1e-5)


def test_a_kerascv_cache_is_never_read_and_goes(reference, ours, tmp_path):
    """Before keras-hub the conversion was cached as a KerasCV preset in DIR/kerascv-clip; such a
    folder is neither loaded nor kept once the keras-hub cache replaces it."""
    source, _, _ = reference
    folder = tmp_path / "copied-clip"
    folder.mkdir()
    for f in source.iterdir():
        if f.is_file():
            (folder / f.name).write_bytes(f.read_bytes())
    old = folder / "kerascv-clip"
    old.mkdir()
    (old / "config.json").write_text('{"registered_name": "keras_cv>CLIP"}')
    (old / "source.json").write_text('{"converter": 1}')
    again, _ = C.load_clip(f"hf:{folder}", "clip-vit-large-patch14")
    assert not old.exists() and (folder / "keras-hub-clip" / "source.json").is_file()
    np.testing.assert_array_equal(again.embed_texts(["a shoe"]), ours.embed_texts(["a shoe"]))


class _Features(torch.nn.Module):
    """transformers 5 returns a ModelOutput from get_*_features; torchmetrics 1.9 expects the
    tensor, so this passes on the projected features, nothing else."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def get_image_features(self, *args, **kwargs):
        return self.model.get_image_features(*args, **kwargs).pooler_output

    def get_text_features(self, *args, **kwargs):
        return self.model.get_text_features(*args, **kwargs).pooler_output


def test_clip_score_is_torchmetrics(reference, ours, captions):
    """docs/evaluation.md: the set's CLIP score is torchmetrics' ``max(100 mean(cos), 0)``; each
    image's own is ``100 cos`` unclamped. Checked on a batch with negative cosines."""
    from torchmetrics.functional.multimodal import clip_score

    _, model, processor = reference
    photos = _photos()[:4]
    texts = captions[:4]
    cos_scores = adherence.clip_scores(ours.embed_images(photos), ours.embed_texts(texts))
    assert (cos_scores < 0).any() and (cos_scores > 0).any()  # the case where definitions differ
    tensors = [torch.from_numpy(p.copy()).permute(2, 0, 1) for p in photos]
    pair = lambda: (_Features(model), processor)  # noqa: E731
    for image, text, score in zip(tensors, texts, cos_scores):
        theirs = clip_score(image, text, pair).item()
        assert theirs == pytest.approx(max(score, 0.0), abs=1e-3)
    theirs = clip_score(tensors, texts, pair).item()
    assert adherence.set_clip_score(cos_scores) == pytest.approx(theirs, abs=1e-3)
    assert theirs != pytest.approx(float(np.maximum(cos_scores, 0).mean()), abs=1e-2)


def test_folder_command_judges_with_a_transformers_clip(reference, ours, tmp_path, demo_captions,
                                                        capsys):
    """evaluate --images DIR --captions CSV --out DIR --set eval.clip=hf:DIR: per-image CLIP
    scores from the converted model, and the summary names the CLIP that judged."""
    from fashion_sd import cli

    folder, _, _ = reference
    out = tmp_path / "judged"
    rc = cli.main(["evaluate", "--images", str(DEMO / "images"), "--captions", str(demo_captions),
                   "--out", str(out), "--set", f"eval.clip=hf:{folder}"])
    assert rc == 0, capsys.readouterr().err
    table = pd.read_csv(out / "garment.csv")
    rows = pd.read_csv(demo_captions).set_index("id").loc[[int(p.split("/")[-1].split(".")[0])
                                                            for p in table.image]]
    photos = [np.asarray(Image.open(p).convert("RGB")) for p in table.image[:5]]
    expected = adherence.clip_scores(ours.embed_images(photos),
                                     ours.embed_texts(rows.caption.tolist()[:5]))
    np.testing.assert_allclose(table.clip_score[:5], expected, rtol=1e-6, atol=1e-6)
    assert "CLIP: hf:tiny-clip" in (out / "garment.md").read_text()
