"""The FID protocols against their references (clean-fid's resizers, TensorFlow 1's op and its
closed form), and the KID subset size on small sets."""

import numpy as np
import pytest
import tensorflow as tf
from conftest import ROOT
from PIL import Image

from fashion_sd.config import ConfigError, load_config
from fashion_sd.evaluation import inception
from fashion_sd.evaluation.fid import kid_subset_size
from fashion_sd.images import load_image

cleanfid_resize = pytest.importorskip("cleanfid.resize")  # the test extra installs it

ALL_PHOTOS = sorted((ROOT / "data/demo/images").glob("*.jpg"))
PHOTOS = ALL_PHOTOS[:6]


@pytest.mark.parametrize("resolution", [None, 64, [48, 64]])
def test_clean_protocol_is_clean_fids_resize(resolution):
    """Real catalogue photos, at their own size and through the training loader."""
    ours_all, theirs_all = [], []
    resizer = cleanfid_resize.build_resizer("clean")
    for path in PHOTOS:
        image = load_image(path, resolution)
        ours_all.append(inception.resize(image[None], "clean")[0])
        theirs_all.append(resizer(image))
    ours, theirs = np.stack(ours_all), np.stack(theirs_all)
    assert ours.shape == theirs.shape == (len(PHOTOS), 299, 299, 3)
    np.testing.assert_allclose(ours, theirs, atol=1e-4)  # the same PIL filter, float32 both ways


@pytest.mark.parametrize("resolution", [None, 64])
def test_tensorflow2_protocol_is_clean_fids_tensorflow_resize(resolution):
    resizer = cleanfid_resize.make_resizer("TensorFlow", False, "bilinear", (299, 299))
    for path in PHOTOS:
        image = load_image(path, resolution)
        np.testing.assert_allclose(inception.resize(image[None], "tensorflow2")[0],
                                   resizer(image), atol=1e-3)


def test_tensorflow2_samples_as_pytorch_fid():
    """pytorch-fid resizes with F.interpolate(bilinear, align_corners=False), unquantised:
    clean-fid's legacy_pytorch resizer is that call. The same half-pixel sampling as
    tf.image.resize, equal to float32 rounding (pytorch-fid then maps to 2x - 1, not ours)."""
    resizer = cleanfid_resize.build_resizer("legacy_pytorch")
    for path in PHOTOS:
        for resolution in (None, 256):
            image = load_image(path, resolution)
            np.testing.assert_allclose(inception.resize(image[None], "tensorflow2")[0],
                                       resizer(image), atol=5e-3)


def tf1_closed_form(image: np.ndarray, out: int = 299) -> np.ndarray:
    """TensorFlow 1's ResizeBilinear (align_corners=False, half_pixel_centers=False) written out:
    output pixel i samples input position i * in/out, no half-pixel offset, linearly between
    its two neighbours, the upper one clamped to the last row / column. Positions in float32, as
    TensorFlow computes them (in float64 they move by up to 1e-4 px on a 600 px side)."""
    x = image.astype(np.float64)

    def weights(n_in):
        src = np.arange(out, dtype=np.float32) * np.float32(n_in / out)
        lo = np.floor(src).astype(int)
        return lo, np.minimum(lo + 1, n_in - 1), (src - lo).astype(np.float64)

    y0, y1, fy = weights(x.shape[0])
    x0, x1, fx = weights(x.shape[1])
    rows = x[y0] * (1 - fy)[:, None, None] + x[y1] * fy[:, None, None]
    return rows[:, x0] * (1 - fx)[None, :, None] + rows[:, x1] * fx[None, :, None]


@pytest.mark.parametrize("shape", [(5, 7), (13, 4), (600, 450)])
def test_tensorflow1_protocol_is_tf1_resize_bilinear(shape):
    """Small arrays (and one that shrinks): TensorFlow's own TF1 function and the closed form."""
    image = np.random.default_rng(sum(shape)).integers(0, 256, (*shape, 3), dtype=np.uint8)
    ours = inception.resize(image[None], "tensorflow1")[0]
    v1 = tf.compat.v1.image.resize_bilinear(tf.constant(image[None], tf.float32), [299, 299])
    np.testing.assert_allclose(ours, v1.numpy()[0], atol=1e-4)
    np.testing.assert_allclose(ours, tf1_closed_form(image), atol=1e-3)
    # the closed form tells the two TensorFlows apart: TF2's half-pixel sampling is not it
    assert np.abs(tf1_closed_form(image) - inception.resize(image[None], "tensorflow2")[0]).max() > 1


def test_tensorflow1_is_the_grid_sample_resize_of_the_torchscript_fid_inception():
    """clean-fid's legacy_tensorflow resizes inside inception-2015-12-05.pt (StyleGAN2-ADA's
    TorchScript FID Inception), which cannot be downloaded here, so this is NOT a test of clean-fid's
    legacy path. Third-party transcriptions of that file's code resize with affine_grid +
    grid_sample (bilinear, border padding, align_corners=False) after shifting the grid by
    1/in - 1/299; written out here, it samples as TensorFlow 1 does, and so does ours."""
    torch = pytest.importorskip("torch")
    for path in PHOTOS[:3]:
        image = load_image(path, 256)
        x = torch.tensor(image, dtype=torch.float32).permute(2, 0, 1)[None]
        theta = torch.eye(2, 3)
        theta[0, 2] += 1 / x.shape[3] - 1 / 299
        theta[1, 2] += 1 / x.shape[2] - 1 / 299
        grid = torch.nn.functional.affine_grid(theta[None], [1, 3, 299, 299], align_corners=False)
        theirs = torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border",
                                                 align_corners=False)
        np.testing.assert_allclose(inception.resize(image[None], "tensorflow1")[0],
                                   theirs[0].permute(1, 2, 0).numpy(), atol=1e-2)


def test_the_protocols_differ_on_real_photos():
    """Why the protocol is named: the same photo gives other Inception inputs under each."""
    image = np.asarray(Image.open(PHOTOS[0]).convert("RGB"))
    clean = inception.resize(image[None], "clean")
    tf2 = inception.resize(image[None], "tensorflow2")
    assert np.abs(clean - tf2).mean() > 0.5 and np.abs(clean - tf2).max() > 20


@pytest.mark.parametrize("resolution", [256, 512])
def test_the_tensorflow_resizes_differ_on_real_photos(resolution):
    """TF1's and TF2's bilinear resizes of every bundled photo through the training loader, in
    grey levels (docs/evaluation.md quotes these figures)."""
    diffs = []
    for path in ALL_PHOTOS:
        image = load_image(path, resolution)[None]
        diffs.append(np.abs(inception.resize(image, "tensorflow1")
                            - inception.resize(image, "tensorflow2")).ravel())
    d = np.concatenate(diffs)
    print(f"{len(ALL_PHOTOS)} photos at {resolution} px: tensorflow1 - tensorflow2 "
          f"mean {d.mean():.3f}, max {d.max():.2f} grey levels")
    assert d.mean() > 0.1 and d.max() > 5


@pytest.mark.parametrize("where", ["file", "override"])
def test_the_old_protocol_name_is_a_clear_config_error(tmp_path, where):
    p, ok = tmp_path / "c.yaml", tmp_path / "ok.yaml"
    p.write_text("eval: {protocol: legacy_tensorflow}\n" if where == "file" else "seed: 1\n")
    ok.write_text("seed: 1\n")
    overrides = ["eval.protocol=legacy_tensorflow"] if where == "override" else []
    with pytest.raises(ConfigError) as info:
        load_config(p, overrides)
    lines = str(info.value).splitlines()[1:]
    assert len(lines) == 1, info.value
    assert "'eval.protocol'" in lines[0] and "renamed 'tensorflow2'" in lines[0]
    assert "tensorflow1" in lines[0] and "TensorFlow 1" in lines[0]
    with pytest.raises(ValueError, match="renamed 'tensorflow2'"):
        inception.resize(np.zeros((1, 8, 8, 3), np.uint8), "legacy_tensorflow")
    for protocol in inception.PROTOCOLS:
        assert load_config(ok, [f"eval.protocol={protocol}"]).eval.protocol == protocol


def test_preprocessing_version_changed_with_the_names():
    """Real-image stats cached under v2 (when tensorflow2 was legacy_tensorflow) are not reused."""
    assert inception.PREPROCESSING.startswith("v3:")


def test_kid_subset_size_adapts_to_small_sets():
    assert kid_subset_size(50_000, 10_000) == 1000  # clean-fid's and torch-fidelity's size
    assert kid_subset_size(1001, 5000) == 1000
    assert kid_subset_size(1000, 5000) == 500  # the whole set would make every subset the same
    assert kid_subset_size(4, 40) == 2 and kid_subset_size(3, 3) == 2 and kid_subset_size(2, 9) == 2
    assert kid_subset_size(300, 400, requested=100) == 100
