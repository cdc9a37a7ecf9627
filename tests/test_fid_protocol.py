"""The FID protocols against clean-fid's own resizers, and the KID subset size on small sets."""

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT
from fashion_sd.images import load_image
from fashion_sd.metrics import inception, kid_subset_size

cleanfid_resize = pytest.importorskip("cleanfid.resize")  # the test extra installs it

PHOTOS = sorted((ROOT / "data/demo/images").glob("*.jpg"))[:6]


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
def test_legacy_protocol_is_clean_fids_tensorflow_resize(resolution):
    resizer = cleanfid_resize.make_resizer("TensorFlow", False, "bilinear", (299, 299))
    for path in PHOTOS:
        image = load_image(path, resolution)
        np.testing.assert_allclose(inception.resize(image[None], "legacy_tensorflow")[0],
                                   resizer(image), atol=1e-3)


def test_the_protocols_differ_on_real_photos():
    """Why the protocol is named: the same photo gives other Inception inputs under each."""
    image = np.asarray(Image.open(PHOTOS[0]).convert("RGB"))
    clean = inception.resize(image[None], "clean")
    legacy = inception.resize(image[None], "legacy_tensorflow")
    assert np.abs(clean - legacy).mean() > 0.5 and np.abs(clean - legacy).max() > 20


def test_kid_subset_size_adapts_to_small_sets():
    assert kid_subset_size(50_000, 10_000) == 1000  # clean-fid's and torch-fidelity's size
    assert kid_subset_size(1001, 5000) == 1000
    assert kid_subset_size(1000, 5000) == 500  # the whole set would make every subset the same
    assert kid_subset_size(4, 40) == 2 and kid_subset_size(3, 3) == 2 and kid_subset_size(2, 9) == 2
    assert kid_subset_size(300, 400, requested=100) == 100
