"""CLIP score, zero-shot garment type and on-model rate from injected embeddings (closed forms)."""

import numpy as np
import pandas as pd
import pytest
from tiny import FakeClip

from fashion_sd.evaluation import adherence, judge


def test_clip_score_is_100_times_the_cosine_and_the_set_clamps_its_mean():
    img = np.array([[1.0, 0.0], [3.0, 4.0], [1.0, 1.0], [0.0, 2.0]])
    txt = np.array([[2.0, 0.0], [4.0, 3.0], [-1.0, -1.0], [1.0, 0.0]])
    # cos: 1, 24/25, -1, 0
    np.testing.assert_allclose(adherence.clip_scores(img, txt), [100.0, 96.0, -100.0, 0.0])
    # scale-free, as a cosine is
    np.testing.assert_allclose(adherence.clip_scores(7 * img, 0.1 * txt),
                               adherence.clip_scores(img, txt))
    # the mean is clamped, not each image: (100 + 96 - 100 + 0) / 4, not (100 + 96) / 4
    assert adherence.set_clip_score(adherence.clip_scores(img, txt)) == pytest.approx(24.0)
    assert adherence.set_clip_score([-5.0, 3.0]) == 0.0


def test_zero_shot_top_k_against_argsort():
    rng = np.random.default_rng(0)
    img, classes = rng.normal(size=(50, 8)), rng.normal(size=(6, 8))
    labels = rng.integers(0, 6, 50)
    sims = adherence.similarity(img, classes)
    expected = (img / np.linalg.norm(img, axis=1, keepdims=True)) @ (
        classes / np.linalg.norm(classes, axis=1, keepdims=True)).T
    np.testing.assert_allclose(sims, expected, atol=1e-12)
    order = np.argsort(-sims, axis=1)
    for k in (1, 3, 6):
        want = [labels[i] in order[i, :k] for i in range(50)]
        np.testing.assert_array_equal(adherence.top_k_correct(sims, labels, k), want)
    assert adherence.top_k_correct(sims, labels, 6).all()


def test_ties_count_against_the_image():
    sims = np.array([[0.5, 0.5, 0.1], [0.9, 0.5, 0.5]])
    np.testing.assert_array_equal(adherence.top_k_correct(sims, [0, 1], 1), [False, False])
    np.testing.assert_array_equal(adherence.top_k_correct(sims, [0, 1], 2), [True, False])
    np.testing.assert_array_equal(adherence.top_k_correct(sims, [0, 1], 3), [True, True])


def test_on_model_compares_the_two_texts():
    img = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.1]])
    product, worn = np.array([[1.0, 0.0]] * 3), np.array([[0.0, 1.0]] * 3)
    np.testing.assert_array_equal(adherence.on_model(img, product, worn), [False, True, True])


def test_judge_puts_the_metrics_together():
    vocab = ["shirt", "shoe", "watch"]
    red = np.zeros((16, 16, 3), np.uint8)
    red[..., 0] = 200
    green = np.zeros((16, 16, 3), np.uint8)
    green[..., 1] = 200
    j = judge.Judge(FakeClip(), vocab)
    table = j([red, green, red], ["a shirt", "a shoe", "a watch"], ["shirt", "shoe", "watch"],
              [None, None, None])
    assert table.type_judged.tolist() == ["shirt", "shoe", "shirt"]
    assert table.type_top1.tolist() == [True, True, False]
    assert table.type_top3.tolist() == [True, True, True]
    assert not table.on_model.any()
    # CLIP score closed form: image (200, 0, 0, 0, e) against "a shirt" (1, 0, 0, 0, e)
    e = 1e-3
    cos = (200 + e * e) / (np.hypot(200, e) * np.hypot(1, e))
    assert table.clip_score.iloc[0] == pytest.approx(100 * cos)
    assert table.clip_score.iloc[2] == pytest.approx(100 * e * e / (np.hypot(200, e) * np.hypot(1, e)))
    s = judge.summarise(table)
    assert s["type_top1"] == pytest.approx(2 / 3) and s["type_top3"] == 1.0
    assert s["on_model_rate"] == 0.0
    # an unknown type is not scored for type or on-model, and texts are embedded once
    calls = []
    inner = j.clip.embed_texts
    j.clip.embed_texts = lambda t: calls.append(list(t)) or inner(t)
    table = j([red], ["a shirt"], ["cape"], [None])
    assert pd.isna(table.type_top1.iloc[0]) and pd.isna(table.on_model.iloc[0])
    assert calls == []  # every text was embedded by the first call


def test_without_clip_only_the_weight_free_columns():
    white = np.full((16, 16, 3), 250, np.uint8)
    white[4:12, 4:12] = (200, 30, 40)
    table = judge.Judge(None, ["shirt"])([white], ["x"], ["shirt"], ["Red"])
    assert "clip_score" not in table and bool(table.colour_correct.iloc[0])
    s = judge.summarise(table)
    assert np.isnan(s["clip_score"]) and s["colour_accuracy"] == 1.0 and s["cut_off_rate"] == 0.0


class PickClip:
    """Texts embed one-hot over the texts it was told of; an image embeds as the text whose
    index its first pixel's red value holds: what the judge picks is set by the test."""

    label, random = "pick", False

    def __init__(self, texts):
        self.known = list(texts)

    def embed_texts(self, texts):
        return np.array([[float(t == k) for k in self.known] + [1e-3] for t in texts])

    def embed_images(self, images):
        return np.array([[float(i == int(np.asarray(im)[0, 0, 0])) for i in range(len(self.known))]
                         + [1e-3] for im in images])


def test_zero_shot_colour_counts_named_neighbours_and_unisex_counts_either_gender():
    colours = ["Burgundy", "Maroon", "Navy Blue", "Red"]
    genders = list(adherence.GENDERS)
    texts = adherence.colour_texts(colours) + adherence.gender_texts(genders)
    clip = PickClip(texts)

    def seeing(text):
        im = np.zeros((8, 8, 3), np.uint8)
        im[0, 0, 0] = texts.index(text)
        return im

    j = judge.Judge(clip, (), colours)
    # colour: Burgundy seen as Maroon (a named neighbour: right); Red seen as Navy Blue (wrong)
    images = [seeing(adherence.colour_texts(["Maroon"])[0]),
              seeing(adherence.colour_texts(["Navy Blue"])[0])]
    table = j(images, ["a", "b"], [None, None], ["Burgundy", "Red"])
    assert table.colour_clip.tolist() == ["Maroon", "Navy Blue"]
    assert table.colour_top1.tolist() == [True, False]
    # gender: a Unisex garment seen on a woman is right; a Men's one seen so is not
    women = seeing(adherence.gender_texts(["Women"])[0])
    table = judge.Judge(clip, (), ())([women, women], ["a", "b"], [None, None], [None, None],
                                      ["Unisex", "Men"])
    assert table.gender_judged.tolist() == ["Women", "Women"]
    assert table.gender_top1.tolist() == [True, False]
    # chance: the share of classes a random pick gets right, per label
    chances = j.chances(["Burgundy", "Red"], ["Unisex", "Men"])
    assert chances["colour_chance"] == pytest.approx((2 / 4 + 1 / 4) / 2)  # Maroon is Burgundy's
    assert chances["gender_chance"] == pytest.approx((3 / 5 + 1 / 5) / 2)
    assert np.isnan(chances["type_chance"])  # no garment vocabulary: no type column
