"""KerasCV's sampler on our components: seeded, per-image reproducible."""

import numpy as np
import pytest
from tiny import tiny_unet

from fashion_sd import models
from fashion_sd.generate import Sampler


@pytest.fixture(scope="module")
def sampler(small_parts):
    import keras

    keras.utils.set_random_seed(0)
    source = models.WeightsSource("random", "random", id="random-init(seed=0)")
    return Sampler(models.Components(source, 64, diffusion_model=tiny_unet(8), **small_parts))


def test_same_seed_same_pixels(sampler):
    prompt = "an image of a 2011 Casual Fall White Men's Sweater"
    a = sampler.generate(prompt, [0, 1], steps=3)
    assert a.shape == (2, 64, 64, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(sampler.generate(prompt, [0, 1], steps=3), a)
    assert not np.array_equal(a[0], a[1])
    # An image depends on its own seed, not on its batch (up to float rounding of a level).
    b = sampler.generate(prompt, [1], steps=3)
    assert np.abs(a[1].astype(int) - b[0].astype(int)).max() <= 1


def test_prompt_matters_and_empty_prompt_is_refused(sampler):
    a = sampler.generate("an image of a 2011 Casual Fall White Men's Sweater", [0], steps=2)
    b = sampler.generate("an image of a 2012 Casual Summer Grey Women's Dress", [0], steps=2)
    assert not np.array_equal(a, b)
    with pytest.raises(ValueError, match="empty prompt"):
        sampler.generate("  ", [0])


def test_long_prompt_is_truncated_with_a_warning(sampler, caplog):
    long = " ".join(["extraordinarily"] * 60)
    sampler.generate(long, [0], steps=1)
    assert "prompt over 77 tokens truncated" in caplog.text
