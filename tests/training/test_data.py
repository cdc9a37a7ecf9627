"""Images, tokens, caches and batch streams."""

import os

import numpy as np
import pytest
from PIL import Image

from fashion_sd import images
from fashion_sd.sd import tokenizer
from fashion_sd import cache
from fashion_sd.training import data


def portrait(path, fmt="JPEG", mode="RGB", bg=(255, 255, 255)):
    """A 60x80 catalogue-like image: a dark garment on a plain backdrop."""
    img = Image.new("RGB", (60, 80), bg)
    img.paste((20, 40, 160), (10, 5, 50, 75))
    img.convert(mode).save(path, format=fmt, quality=95)
    return path


def test_pads_on_own_background_without_cropping(tmp_path):
    p = portrait(tmp_path / "a.jpg", fmt="PNG")
    out = images.load_image(p, 64)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    # padding is added left and right, in the backdrop's colour
    assert np.all(out[:, :4] > 245) and np.all(out[:, -4:] > 245)
    # the garment spans the whole height still: nothing was cut off
    dark = (out.mean(-1) < 128).any(axis=1)
    assert dark[4] and dark[-5]
    grey = images.load_image(portrait(tmp_path / "g.png", fmt="PNG", bg=(128, 128, 128)), 64)
    assert np.abs(grey[:, :4].astype(int) - 128).max() <= 2


@pytest.mark.parametrize("mode, fmt", [("L", "JPEG"), ("RGBA", "PNG"), ("CMYK", "JPEG"),
                                       ("P", "PNG"), ("RGB", "PNG")])
def test_any_mode_becomes_rgb(tmp_path, mode, fmt):
    p = portrait(tmp_path / "x.jpg", fmt=fmt, mode=mode)  # PNG inside .jpg included
    out = images.load_image(p, 64)
    assert out.shape == (64, 64, 3)
    assert np.all(out[:, 0] > 200)  # white padding, also for transparent or CMYK sources


def test_transparent_png_goes_on_white(tmp_path):
    img = Image.new("RGBA", (40, 40), (0, 0, 0, 0))
    img.paste((200, 0, 0, 255), (10, 10, 30, 30))
    img.save(tmp_path / "t.png")
    out = images.load_image(tmp_path / "t.png", 64)
    assert tuple(out[2, 2]) == (255, 255, 255)
    assert out[32, 32, 0] > 150 and out[32, 32, 1] < 60


def test_image_dataset_gives_image_and_mirror(tmp_path):
    paths = [str(portrait(tmp_path / f"{i}.jpg")) for i in range(3)]
    batch = next(iter(data.image_dataset(paths, 64, 2)))
    assert batch.shape == (2, 2, 64, 64, 3)
    x = np.asarray(batch)
    assert x.dtype == np.float32 and -1.0 <= x.min() and x.max() <= 1.0
    np.testing.assert_array_equal(x[:, 1], x[:, 0, :, ::-1])


class FakeTokenizer:
    def encode(self, text):
        return [49406] + [len(w) for w in text.split()] + [49407]


def test_tokenize_pads_with_end_token_and_truncates():
    tokens, truncated = tokenizer.tokenize(["a bb ccc", " ".join(["w"] * 100)], FakeTokenizer())
    assert tokens.shape == (2, 77) and tokens.dtype == np.int32
    assert tokens[0, :5].tolist() == [49406, 1, 2, 3, 49407]
    assert (tokens[0, 5:] == 49407).all()
    assert tokens[1, -1] == 49407 and truncated == [" ".join(["w"] * 100)]


def test_real_tokenizer_matches_kerascv_padding():
    from fashion_sd.sd.tokenizer import clip_tokenizer

    tokens, _ = tokenizer.tokenize(["an image of a 2011 Casual Fall White Men's Sweater"], clip_tokenizer())
    n = int((tokens[0] != 49407).sum()) + 1  # the end token, then padding with it
    assert tokens[0, 0] == 49406 and n == 16


def test_cache_is_keyed_and_never_reused_for_other_inputs(tmp_path):
    img = portrait(tmp_path / "a.jpg")
    calls = []

    def compute(v):
        def f():
            calls.append(v)
            return np.full((2,), v, np.float32)
        return f

    key = cache.cache_key("images", "w1", [cache.file_id(str(img))], 64)
    assert cache.cached(tmp_path / "c", key, compute(1.0)).tolist() == [1.0, 1.0]
    assert cache.cached(tmp_path / "c", key, compute(2.0)).tolist() == [1.0, 1.0]  # hit
    assert calls == [1.0]
    for other in (cache.cache_key("images", "w2", key["items"], 64),
                  cache.cache_key("images", "w1", key["items"], 128),
                  # bf16 encoders' outputs are another cache than float32 ones
                  cache.cache_key("images", "w1", key["items"], 64, dtype="bfloat16")):
        assert cache.cached(tmp_path / "c", other, compute(3.0)).tolist() == [3.0, 3.0]
    # the same image file, changed on disk: a new key, a rebuild
    os.utime(img, ns=(1, 1))
    changed = cache.cache_key("images", "w1", [cache.file_id(str(img))], 64)
    assert changed != key
    assert cache.cached(tmp_path / "c", changed, compute(4.0)).tolist() == [4.0, 4.0]
    # a file whose stored key differs (collision, tampering) is rebuilt, not trusted
    path = cache.key_path(tmp_path / "c", key)
    np.savez(open(path, "wb"), data=np.zeros(2), key=np.array('{"other": 1}'))
    assert cache.cached(tmp_path / "c", key, compute(5.0)).tolist() == [5.0, 5.0]
    path.write_bytes(b"garbage")
    assert cache.cached(tmp_path / "c", key, compute(6.0)).tolist() == [6.0, 6.0]
    assert calls == [1.0, 3.0, 3.0, 3.0, 4.0, 5.0, 6.0]


def test_batch_plan_is_a_function_of_seed_and_step():
    rows, flips = data.batch_plan(10, 3, seed=0, start_step=0, end_step=9, flip=True)
    assert rows.shape == (9, 3)
    for e in range(3):  # each epoch: 3 batches, 9 distinct rows out of 10
        assert len(set(rows[3 * e: 3 * e + 3].ravel())) == 9
    assert not np.array_equal(rows[:3], rows[3:6])  # reshuffled per epoch
    tail_rows, tail_flips = data.batch_plan(10, 3, 0, 4, 7, True)
    np.testing.assert_array_equal(tail_rows, rows[4:7])
    np.testing.assert_array_equal(tail_flips, flips[4:7])
    assert set(np.unique(flips)) == {0, 1}
    assert not data.batch_plan(10, 3, 0, 0, 9, False)[1].any()
    with pytest.raises(ValueError, match="cannot fill one batch"):
        data.batch_plan(2, 3, 0, 0, 1, True)


def encoded(n=12, val=3):
    rng = np.random.default_rng(0)
    return data.EncodedData(
        moments=rng.standard_normal((n, 2, 8, 8, 8)).astype("float32"),
        contexts=rng.standard_normal((4, 77, 768)).astype("float32"),
        caption_index=np.arange(n) % 4,
        splits={"train": np.arange(n - val), "val": np.arange(n - val, n), "test": np.array([], int)})


def test_train_stream_resumes_exactly():
    enc = encoded()
    full = list(data.train_dataset(enc, data.Batches(2, seed=5, flip=True), 0, 8))
    tail = list(data.train_dataset(enc, data.Batches(2, seed=5, flip=True), 5, 8))
    for a, b in zip(full[5:], tail):
        for k in a:
            np.testing.assert_array_equal(a[k].numpy(), b[k].numpy())
    b0 = full[0]
    assert b0["moments"].shape == (2, 8, 8, 8) and b0["context"].shape == (2, 77, 768)
    assert b0["timesteps"].dtype.name == "int32"
    assert 0 <= int(np.min(b0["timesteps"])) and int(np.max(b0["timesteps"])) < 1000
    assert not np.array_equal(full[0]["noise"].numpy(), full[1]["noise"].numpy())


def test_val_set_is_the_same_every_time():
    enc = encoded()
    a = [b["noise"].numpy() for b in data.val_dataset(enc, 4, seed=1, repeats=4)]
    b = [b["noise"].numpy() for b in data.val_dataset(enc, 4, seed=1, repeats=4)]
    np.testing.assert_array_equal(np.concatenate(a), np.concatenate(b))
    t = np.concatenate([b["timesteps"].numpy() for b in data.val_dataset(enc, 100, 1, 4)])
    assert len(t) == 12 and sorted(t[:4] // 250) == [0, 1, 2, 3]  # stratified over [0, 1000)
    enc.splits["val"] = np.array([], int)
    assert data.val_dataset(enc, 4, 1) is None


def test_val_batches_gather_each_rows_own_encodings():
    enc = encoded()
    batches = list(data.val_dataset(enc, 5, seed=1, repeats=3))
    rows = np.repeat(enc.splits["val"], 3)
    m = np.concatenate([b["moments"].numpy() for b in batches])
    c = np.concatenate([b["context"].numpy() for b in batches])
    np.testing.assert_array_equal(m, enc.moments[rows, 0])
    np.testing.assert_array_equal(c, enc.contexts[enc.caption_index[rows]])
    noise = np.concatenate([b["noise"].numpy() for b in batches])
    assert noise.shape == (9, 8, 8, 4) and abs(noise.std() - 1) < 0.1
    assert len({noise[i].tobytes() for i in range(9)}) == 9  # every sample its own draw
    # the batch size changes the batching, not any sample's noise
    again = np.concatenate([b["noise"].numpy() for b in data.val_dataset(enc, 2, 1, 3)])
    np.testing.assert_array_equal(again, noise)
