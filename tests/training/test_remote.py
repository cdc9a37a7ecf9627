"""Remote run folders, caches and captions (gs://... through tf.io.gfile), tested with ``file://``
URLs: the same gfile code path as a bucket, on the local disk."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from safetensors.numpy import load_file
from test_run import build, config, train  # noqa: F401 - build is a fixture

from fashion_sd import images, remote
from fashion_sd.catalogue import captions
from fashion_sd.training import data


def url(path) -> str:
    return f"file://{path}"


def test_a_mirror_copies_in_and_out_file_by_file(tmp_path, monkeypatch):
    monkeypatch.setenv("FASHION_SD_MIRROR", str(tmp_path / "mirrors"))
    far = tmp_path / "bucket" / "run"
    (far / "checkpoints").mkdir(parents=True)
    (far / "checkpoints" / "last.lora.safetensors").write_bytes(b"x" * 10)
    (far / ".history.csv.123.tmp").write_text("half")  # an upload in progress elsewhere
    m = remote.Mirror(url(far))
    assert m.local.parent == tmp_path / "mirrors" and m.local.name.startswith("run-")
    assert m.pull() == 1
    assert (m.local / "checkpoints/last.lora.safetensors").read_bytes() == b"x" * 10
    assert not list(m.local.glob(".*tmp"))
    assert m.pull() == 0 and m.push() == 0  # nothing new either way
    (m.local / "history.csv").write_text("epoch\n1\n")
    (m.local / "samples").mkdir()
    (m.local / "samples" / "epoch_001.png").write_bytes(b"png")
    assert m.push() == 2 and m.push() == 0
    assert (far / "history.csv").read_text() == "epoch\n1\n"
    assert (far / "samples/epoch_001.png").read_bytes() == b"png"
    assert not [p for p in far.rglob("*") if p.name.endswith(".push.tmp")]
    (m.local / "checkpoints" / "last.lora.safetensors").unlink()  # pruned or --fresh
    m.push()
    assert not (far / "checkpoints/last.lora.safetensors").exists()
    # a new runtime: an empty mirror elsewhere gets everything back
    monkeypatch.setenv("FASHION_SD_MIRROR", str(tmp_path / "other"))
    again = remote.Mirror(url(far))
    assert again.pull() == 2 and (again.local / "samples/epoch_001.png").read_bytes() == b"png"


def test_an_unwritable_remote_folder_is_named(tmp_path):
    (tmp_path / "afile").write_text("")
    with pytest.raises(remote.RemoteError, match=r"output.dir: cannot write to file://.*afile/run"):
        remote.Mirror(url(tmp_path / "afile" / "run")).check("output.dir")


def test_captions_from_a_url_resolve_images_beside_them(tmp_path, demo_captions):
    df = pd.read_csv(demo_captions).head(3)
    df["image_path"] = ["images/a.jpg", "", "gs://bucket/b.jpg"]
    df.to_csv(tmp_path / "captions.csv", index=False)
    got = captions.read_captions(url(tmp_path / "captions.csv"))
    assert got.image_path.tolist() == [url(tmp_path / "images/a.jpg"), "", "gs://bucket/b.jpg"]
    with pytest.raises(captions.CaptionError, match="missing.csv: captions file not found"):
        captions.read_captions(url(tmp_path / "missing.csv"))


def test_images_read_through_a_url_decode_as_local_ones(demo_captions):
    path = captions.read_captions(demo_captions).image_path[0]  # absolute
    np.testing.assert_array_equal(images.load_image(url(path), 64), images.load_image(path, 64))


def test_a_run_on_remote_folders_resumes_on_a_new_runtime_with_nothing_lost(
        tmp_path, demo_captions, encoder_cache, build, monkeypatch):  # noqa: F811
    train(config(tmp_path, demo_captions, encoder_cache, name="local"), build)
    bucket = tmp_path / "bucket"
    bucket.mkdir()
    # the captions and their images in the "bucket", images named relative to the CSV
    table = captions.read_captions(demo_captions)
    (bucket / "images").mkdir()
    for p in table.image_path:
        (bucket / "images" / Path(p).name).write_bytes(Path(p).read_bytes())
    raw = pd.read_csv(demo_captions)
    raw["image_path"] = ["images/" + Path(p).name for p in table.image_path]
    raw.to_csv(bucket / "captions.csv", index=False)
    remote_sets = [f"data.captions={url(bucket / 'captions.csv')}",
                   f"data.cache_dir={url(bucket / 'cache')}", f"output.dir={url(bucket / 'run')}"]
    monkeypatch.setenv("FASHION_SD_MIRROR", str(tmp_path / "runtime1"))
    first = train(config(tmp_path, demo_captions, encoder_cache, "train.max_steps=5",
                         *remote_sets), build)
    assert first["step"] == 5 and first["status"] == "stopped"
    # what the disconnect leaves: the remote folders, complete up to the train state
    assert (bucket / "run/checkpoints/train_state.safetensors").is_file()
    assert (bucket / "run/config.yaml").is_file() and (bucket / "run/run.json").is_file()
    assert len(list((bucket / "cache").rglob("index.json"))) == 2  # text and images, finished

    # A new runtime: an empty local disk. Nothing is encoded again, no step is lost.
    monkeypatch.setenv("FASHION_SD_MIRROR", str(tmp_path / "runtime2"))

    def no_encoding(*args, **kwargs):
        raise AssertionError("encoded again: the remote cache was not used")

    monkeypatch.setattr(data, "encode_images", no_encoding)
    monkeypatch.setattr(data, "encode_text", no_encoding)
    second = train(config(tmp_path, demo_captions, encoder_cache, *remote_sets), build,
                   resume=True)
    assert second["status"] == "finished" and second["step"] == 16
    a = load_file(str(tmp_path / "local/checkpoints/last.lora.safetensors"))
    b = load_file(str(bucket / "run/checkpoints/last.lora.safetensors"))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert pd.read_csv(bucket / "run/history.csv").step.tolist() == [5, 8, 16]
