"""Masked loss: the weighted loss in closed form and equal to kohya's formula (mask resized to
the latent grid by area, loss times mask, mean) with background weight 0; masks from the
catalogue's own plain backgrounds, a user's mask file or alpha channel, none for a photo with no
plain background; a flipped image's mask is the flipped mask."""

import numpy as np
import pytest
from conftest import ROOT
from PIL import Image

from fashion_sd.images import load_image
from fashion_sd.sd import diffusion
from fashion_sd.training import masks

DEMO = ROOT / "data" / "demo" / "images"


def batch(rng, b=3, h=4, w=4):
    pred, noise = rng.standard_normal((2, b, h, w, 4)).astype("float32")
    mask = (rng.random((b, h, w, 1)) > 0.5).astype("float32")
    return pred, noise, mask


@pytest.mark.parametrize("background", [0.0, 0.25, 1.0])
def test_the_masked_loss_in_closed_form(background):
    pred, noise, mask = batch(np.random.default_rng(1))
    err = (pred - noise) ** 2
    w = background + (1 - background) * mask
    per_sample = (err * w).reshape(3, -1).mean(axis=1)
    snr = np.array([0.5, 1.0, 2.0], "float32")
    got = float(diffusion.epsilon_loss(pred, noise, snr, mask, background))
    assert got == pytest.approx((per_sample * snr).mean(), rel=1e-6)
    normalised = per_sample / w.reshape(3, -1).mean(axis=1)
    got = float(diffusion.epsilon_loss(pred, noise, None, mask, background, normalize=True))
    assert got == pytest.approx(normalised.mean(), rel=1e-6)
    if background == 1.0:  # every weight 1: the plain loss
        assert float(diffusion.epsilon_loss(pred, noise, None, mask, 1.0)) == pytest.approx(
            float(diffusion.epsilon_loss(pred, noise)), rel=1e-6)


def test_with_background_weight_zero_it_is_kohyas_masked_loss():
    """kohya's apply_masked_loss: the mask resized to the latents with F.interpolate(mode="area"),
    the per-element MSE times it, the mean over channels and pixels, then the batch mean."""
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    rng = np.random.default_rng(2)
    pixel_mask = (rng.random((3, 32, 40)) > 0.4).astype("float32")
    pred, noise = rng.standard_normal((2, 3, 4, 5, 4)).astype("float32")
    latent = np.stack([masks.to_latent_grid(m) for m in pixel_mask])[..., None]
    ours = float(diffusion.epsilon_loss(pred, noise, None, latent, 0.0))
    t = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2)  # noqa: E731 - NHWC -> NCHW
    resized = F.interpolate(torch.from_numpy(pixel_mask)[:, None], size=(4, 5), mode="area")
    loss = F.mse_loss(t(pred), t(noise), reduction="none") * resized
    assert ours == pytest.approx(float(loss.mean([1, 2, 3]).mean()), rel=1e-6)


def test_the_catalogues_photos_are_masked_on_their_plain_backgrounds():
    photos = sorted(DEMO.glob("*.jpg"))
    made, sources = masks.latent_masks([str(p) for p in photos], 64)
    assert made.shape == (48, 2, 8, 8, ) and sources["auto"] >= 40
    summary = masks.describe(made)
    assert summary["masked"] == sources["auto"] and summary["unmasked"] == sources["none"]
    assert 0.1 < summary["garment_share"] < 0.9  # a garment, not the frame, not nothing
    np.testing.assert_array_equal(made[:, 1], made[:, 0, :, ::-1])  # the mirror's mask


def test_a_photo_with_no_plain_background_gets_weight_one(tmp_path):
    noisy = np.random.default_rng(3).integers(0, 255, (64, 64, 3), np.uint8)
    Image.fromarray(noisy).save(tmp_path / "street.png")
    mask, source = masks.photo_mask(str(tmp_path / "street.png"), 64)
    assert source == "none" and (mask == 1).all()


def test_a_users_mask_file_and_alpha_channel_win(tmp_path):
    photo = next(DEMO.glob("*.jpg"))
    left = np.zeros((80, 60), np.uint8)
    left[:, :30] = 255  # the left half is the garment
    Image.fromarray(left).save(tmp_path / "m.png")
    mask, source = masks.photo_mask(str(photo), 64, str(tmp_path / "m.png"))
    assert source == "file"
    # laid out as the photo is: padded to a square with 0 (60x80 -> centred in 80x80)
    assert mask[:, :8].max() == 0 and mask[32, 12:30].min() > 0.9 and mask[32, 36:].max() < 0.1
    rgba = np.dstack([load_image(photo, None)[:80, :80], np.full((80, 80), 0, np.uint8)])
    rgba[20:60, 20:60, 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    mask, source = masks.photo_mask(str(tmp_path / "a.png"), 64)
    assert source == "alpha" and mask[32, 32] == 1.0 and mask[2, 2] == 0.0


def test_the_latent_grid_averages_each_cell():
    m = np.zeros((16, 16), np.float32)
    m[:8, :4] = 1
    np.testing.assert_array_equal(masks.to_latent_grid(m), [[0.5, 0], [0, 0]])


def test_an_opaque_alpha_channel_is_no_mask(tmp_path):
    photo = next(DEMO.glob("*.jpg"))
    rgb = load_image(photo, None)
    Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)]), "RGBA").save(
        tmp_path / "opaque.png")
    _, source = masks.photo_mask(str(tmp_path / "opaque.png"), 64)
    assert source == "auto"  # the plain background, not an all-garment alpha


def test_a_mask_column_with_empty_cells_masks_the_rest_automatically(tmp_path):
    import pandas as pd

    from fashion_sd.config import DataConfig
    from fashion_sd.training import data

    photos = [str(p) for p in sorted(DEMO.glob("*.jpg"))[:2]]
    Image.fromarray(np.full((80, 60), 255, np.uint8)).save(tmp_path / "all.png")
    table = pd.DataFrame({"image_path": photos, "mask": [str(tmp_path / "all.png"), ""]})
    made = data._masks(table, DataConfig(cache_dir=str(tmp_path / "cache"), resolution=64),
                       None, None)
    first, second = np.asarray(made[np.array([0, 1]), np.array([0, 0])])
    assert first.min() > 0.99 or first[:, 1:-1].min() > 0.99  # the file's (padding at the sides)
    np.testing.assert_array_equal(second, masks.latent_masks(photos[1:], 64)[0][0, 0])
