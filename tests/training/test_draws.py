"""Batches as a pure function of (seed, step), drawn alike on every backend (issue 28): NumPy's
Philox draws (fashion_sd/training/draws.py), the numpy batch source equal to the TensorFlow
pipeline and to what Keras on JAX draws, and runs begun before the draws were recorded resuming
with TensorFlow's draws, bit for bit."""

import json

import numpy as np
import pytest
from backends import run_on_jax
from conftest import ROOT
from safetensors import safe_open
from safetensors.numpy import load_file, save_file
from test_data import encoded
from test_run import build, config, train  # noqa: F401 - build is a fixture

from fashion_sd.sd import diffusion
from fashion_sd.training import callbacks, data, draws, run, shards
from fashion_sd.training.draws import DRAWS, LEGACY
from fashion_sd.training.run import TrainingError

LATENT = (8, 8, 4)


# --------------------------------------------------------------------------------------------
# The draws


def test_a_step_is_drawn_alike_alone_and_in_a_sequence():
    seq = [draws.train_draws(7, step, 3, LATENT, 0.1) for step in range(6)]
    alone = draws.train_draws(7, 4, 3, LATENT, 0.1)
    for a, b in zip(seq[4], alone):
        np.testing.assert_array_equal(a, b)
    enc = encoded()
    plan = data.Batches(2, seed=5, noise_offset=0.1, caption_dropout=0.3)
    whole = data.TrainBatches(enc, plan, 0, 12)
    for step in (0, 3, 4, 11):  # step 4 starts the second epoch of 4 batches
        one = data.TrainBatches(enc, plan, step, step + 1)[0]
        assert one.keys() == whole[step].keys()
        for k in one:
            np.testing.assert_array_equal(one[k], whole[step][k])


def test_different_seeds_steps_and_streams_draw_differently():
    base = draws.train_draws(7, 4, 3, LATENT)
    for other in (draws.train_draws(8, 4, 3, LATENT), draws.train_draws(7, 5, 3, LATENT)):
        for a, b in zip(base, other):
            assert not np.array_equal(a, b)
    vae_eps, noise, _ = base
    assert not np.array_equal(vae_eps, noise)  # streams 0 and 1
    val_eps, val_noise = draws.val_draws(7, [4], LATENT)
    assert not np.array_equal(val_eps[0], vae_eps[0]) and not np.array_equal(val_noise[0], noise[0])


def test_the_key_layout_is_one_to_one_and_splits_train_from_val():
    key = draws.philox_key
    assert key(2**32 - 1, 3, 2**63 - 1).tolist() == [2**32 - 1 + (3 << 32), 2**63 - 1]
    corners = [(s, k, w) for s in (0, 1, 2**32 - 1) for k in range(4)
               for w in (0, 1, 2**63 - 1, draws.VAL, draws.VAL + 1, 2**64 - 1)]
    assert len({key(*c).tobytes() for c in corners}) == len(corners)
    assert key(5, 0, draws.VAL).view(np.int64)[1] < 0  # val keys: "negative", as before
    for bad in ((2**32, 0, 0), (-1, 0, 0), (0, 2**32, 0), (0, 0, 2**64)):
        with pytest.raises(ValueError, match="out of"):
            key(*bad)
    with pytest.raises(ValueError, match="step .* out of"):
        draws.train_draws(0, 2**63, 1, LATENT)
    # Philox takes the key as given, its counter at 0
    state = draws.generator(5, 2, 9).bit_generator.state["state"]
    assert state["key"].tolist() == [5 + (2 << 32), 9] and not state["counter"].any()


def test_pinned_values_catch_a_numpy_that_draws_otherwise():
    """NumPy's Generator may change its algorithms (NEP 19); a run's resume would then not be
    bit-exact. These are the first values of two keys, drawn with NumPy 2.4."""
    vae_eps, noise, t = draws.train_draws(42, 1000, 2, (1, 1, 2))
    np.testing.assert_array_equal(vae_eps.ravel(), PINNED["vae_eps"])
    np.testing.assert_array_equal(noise.ravel(), PINNED["noise"])
    np.testing.assert_array_equal(t, PINNED["timesteps"])


PINNED = {
    "vae_eps": np.array([1.0567201, 0.9683876, 1.0169102, 2.1921582], np.float32),
    "noise": np.array([0.56723225, 0.50163823, -1.8200573, -0.42443117], np.float32),
    "timesteps": np.array([870, 902], np.int32),
}


def test_the_draws_are_standard_normal_and_timesteps_uniform():
    vae_eps, noise, t = draws.train_draws(3, 17, 100_000, (1, 1, 1))
    for x in (vae_eps.ravel(), noise.ravel()):
        assert x.dtype == np.float32
        assert abs(x.mean()) < 4 / np.sqrt(x.size)  # 4 sigma
        assert abs(x.std() - 1) < 4 / np.sqrt(2 * x.size)
    assert t.dtype == np.int32 and t.min() == 0 and t.max() == draws.TRAIN_TIMESTEPS - 1
    assert len(np.unique(t)) == draws.TRAIN_TIMESTEPS == diffusion.TRAIN_TIMESTEPS
    counts = np.bincount(t, minlength=1000)
    assert abs(counts.mean() - 100) < 1e-9 and counts.std() < 4 * np.sqrt(100)


def test_the_noise_offset_is_its_own_draw_added_as_diffusion_adds_it():
    """tests/training/test_training_options.py checks its distribution; here, its key and sum."""
    base = draws.train_draws(3, 7, 16, LATENT)
    off = draws.train_draws(3, 7, 16, LATENT, offset=0.1)
    extra = draws.generator(3, draws.OFFSET, 7).standard_normal((16, 1, 1, 4), dtype=np.float32)
    np.testing.assert_array_equal(off[1], np.asarray(diffusion.offset_noise(base[1], 0.1, extra)))


def test_a_val_samples_noise_is_its_own_whatever_the_batch():
    enc = encoded()
    by = {bs: data.ValBatches(enc, bs, seed=1, repeats=3) for bs in (2, 4, 9)}
    noise = {bs: np.concatenate([v[i]["noise"] for i in range(len(v))]) for bs, v in by.items()}
    np.testing.assert_array_equal(noise[2], noise[4])
    np.testing.assert_array_equal(noise[2], noise[9])
    assert len({n.tobytes() for n in noise[2]}) == 9


# --------------------------------------------------------------------------------------------
# One batch source, every backend


def cached(tmp_path, tokens: bool = False) -> data.EncodedData:
    """test_data's fixture as a run reads it: moments (float16) and contexts in memory-mapped
    shard folders of 5 rows, so batches gather across shards; or token ids (lora.text_encoder)."""
    enc = encoded(n=14, val=4)
    enc.uncond_index = 3

    def folder(kind, array, dtype):
        return shards.sharded(tmp_path / "cache", {"kind": kind}, len(array),
                              lambda a, b: array[a:b], dtype, rows_per_shard=5)

    enc.moments = folder("images", enc.moments, "float16")
    if tokens:
        enc.tokens = np.random.default_rng(1).integers(0, 49408, (4, 77)).astype(np.int32)
        enc.contexts = None
    else:
        enc.contexts = folder("text", enc.contexts, "float32")
    return enc


PLAN = data.Batches(2, seed=5, flip=True, noise_offset=0.1, caption_dropout=0.3)
STEPS = (3, 13)  # into the third epoch of 5 batches
VAL = (3, 9, 2)  # batch size, seed, repeats: 8 samples, the last batch short


def assert_same(numpy_batches, tf_batches):
    tf_batches = list(tf_batches)
    assert len(numpy_batches) == len(tf_batches)
    for i, b in enumerate(tf_batches):
        mine = numpy_batches[i]
        assert list(mine) == list(b)
        for k in b:
            assert mine[k].dtype == b[k].dtype.as_numpy_dtype, k
            np.testing.assert_array_equal(mine[k], b[k].numpy(), err_msg=f"batch {i} {k}")


@pytest.mark.parametrize("tokens", [False, True])
def test_the_numpy_source_is_the_tensorflow_pipeline_bit_for_bit(tmp_path, tokens):
    enc = cached(tmp_path, tokens)
    assert_same(data.TrainBatches(enc, PLAN, *STEPS), data.train_dataset(enc, PLAN, *STEPS))
    assert_same(data.ValBatches(enc, *VAL), data.val_dataset(enc, *VAL))
    batch = data.TrainBatches(enc, PLAN, *STEPS)[0]
    assert set(batch) == {"moments", "tokens" if tokens else "context", "vae_eps", "noise",
                          "timesteps"}
    assert batch["moments"].shape == (2, 8, 8, 8) and batch["noise"].shape == (2, 8, 8, 4)


def test_keras_on_jax_draws_the_same_batches(tmp_path):
    """Keras on JAX, no TensorFlow: data.train_dataset and val_dataset are the numpy source,
    and every batch equals the TensorFlow pipeline's, bit for bit."""
    enc = cached(tmp_path, tokens=False)
    job = {"moments": str(enc.moments.folder), "contexts": str(enc.contexts.folder),
           "tokens": False, "caption_index": enc.caption_index.tolist(),
           "splits": {k: v.tolist() for k, v in enc.splits.items()},
           "uncond_index": enc.uncond_index,
           "batches": {"batch_size": PLAN.batch_size, "seed": PLAN.seed, "flip": PLAN.flip,
                       "noise_offset": PLAN.noise_offset,
                       "caption_dropout": PLAN.caption_dropout},
           "steps": list(STEPS), "val": list(VAL)}
    (tmp_path / "job.json").write_text(json.dumps(job))
    run_on_jax(ROOT / "tests" / "batches_on_backend.py", tmp_path, timeout=600)
    modules = json.loads((tmp_path / "modules.json").read_text())
    assert modules == {"backend": "jax", "tensorflow": False, "train": "TrainBatches",
                       "val": "ValBatches"}
    got = np.load(tmp_path / "batches.npz")
    for split, batches in (("train", data.train_dataset(enc, PLAN, *STEPS)),
                           ("val", data.val_dataset(enc, *VAL))):
        n = 0
        for i, b in enumerate(batches):
            for k in b:
                np.testing.assert_array_equal(got[f"{split}/{i}/{k}"], b[k].numpy(),
                                              err_msg=f"{split} batch {i} {k}")
            n += 1
        assert n == len({name.split("/")[1] for name in got.files if name.startswith(split)})


# --------------------------------------------------------------------------------------------
# Runs begun before: their train states record no draws


def forget_draws(path):
    """Rewrite a train state as fashion-sd wrote them before draws were recorded."""
    with safe_open(str(path), "numpy") as fh:
        info = json.loads(fh.metadata()["info"])
    info.pop("draws")
    save_file(load_file(str(path)), str(path), metadata={"info": json.dumps(info)})


def test_resume_reads_the_draws_a_train_state_records(tmp_path):
    path = tmp_path / "train_state.safetensors"

    def state(**info):
        save_file({"x": np.zeros(1, np.float32)}, str(path),
                  metadata={"info": json.dumps({"step": 3, **info})})
        return path

    assert run.resume_draws(state(draws=DRAWS), "jax") == DRAWS
    assert run.resume_draws(state(draws=DRAWS), "tensorflow") == DRAWS
    assert run.resume_draws(state(), "tensorflow") == LEGACY  # written before the record
    with pytest.raises(TrainingError, match=r"stateless ops, which Keras' jax backend cannot.*"
                                            r"KERAS_BACKEND=tensorflow.*--fresh"):
        run.resume_draws(state(), "jax")
    with pytest.raises(TrainingError, match="'philox-9', which this fashion-sd does not know"):
        run.resume_draws(state(draws="philox-9"), "tensorflow")
    assert callbacks.RunState(tmp_path, 8, 1, 16, 16).info()["draws"] == DRAWS
    with pytest.raises(ValueError, match="'philox-9'"):
        data.train_dataset(encoded(), data.Batches(2, 0, draws="philox-9"), 0, 1)


def test_a_run_begun_before_the_record_resumes_with_its_tensorflow_draws(
        tmp_path, demo_captions, encoder_cache, build, monkeypatch):
    """Runs that began before draws.py drew with TensorFlow's stateless ops and their train
    states record no draws: resumed on TensorFlow they continue with those draws and end with
    the weights of an uninterrupted run of that time; on another backend they are refused
    before any model is built."""
    monkeypatch.setattr(run, "DRAWS", LEGACY)  # a fresh run draws as runs did before
    train(config(tmp_path, demo_captions, encoder_cache, name="straight"), build)
    cfg = config(tmp_path, demo_captions, encoder_cache, name="old")
    train(config(tmp_path, demo_captions, encoder_cache, "train.max_steps=5", name="old"), build)
    state = tmp_path / "old/checkpoints/train_state.safetensors"
    forget_draws(state)
    monkeypatch.undo()

    def never(*a):
        pytest.fail("a model was built")

    # this environment has no jax: the machine stays TensorFlow's, the draws are judged for jax
    machine = run.resolve_machine(cfg)
    monkeypatch.setattr(run, "resolve_machine", lambda cfg: machine)
    monkeypatch.setattr(run.keras.config, "backend", lambda: "jax")
    with pytest.raises(TrainingError, match="start it over on jax with --fresh"):
        run.train(cfg, resume=True, progress=None, verbose=0, build=never)
    monkeypatch.undo()
    resumed = train(cfg, build, resume=True)
    assert resumed["step"] == 16 and resumed["draws"] == LEGACY
    with safe_open(str(state), "numpy") as fh:
        assert json.loads(fh.metadata()["info"])["draws"] == LEGACY  # recorded from now on
    assert json.loads((tmp_path / "old/run.json").read_text())["draws"] == LEGACY
    a = load_file(str(tmp_path / "straight/checkpoints/last.lora.safetensors"))
    b = load_file(str(tmp_path / "old/checkpoints/last.lora.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
