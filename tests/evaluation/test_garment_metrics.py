"""Weight-free garment metrics (issues 16 and 22): CIELAB against published values, the colour
and cut-off judges on drawn images and on real catalogue photos, their abstention when no garment
is found, and both calibrated on the 48 bundled catalogue photos with their real baseColour
labels (the larger calibration sample: docs/evaluation.md, benchmarks/garment_calibration.py)."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import DEMO
from PIL import Image

from fashion_sd.evaluation import garment as g

PHOTOS = Path(__file__).parents[1] / "data" / "catalogue"  # three real photos; SOURCE.md says whence


@pytest.mark.parametrize(("rgb", "lab"), [
    ((255, 255, 255), (100.0, 0.0, 0.0)), ((0, 0, 0), (0.0, 0.0, 0.0)),
    ((255, 0, 0), (53.2408, 80.0925, 67.2032)), ((0, 255, 0), (87.7347, -86.1827, 83.1793)),
    ((0, 0, 255), (32.2970, 79.1875, -107.8602)), ((128, 128, 128), (53.5850, 0.0, 0.0)),
])
def test_cielab_matches_published_values(rgb, lab):
    np.testing.assert_allclose(g.srgb_to_lab(rgb), lab, atol=2e-3)


def drawn(colour, box, size=(80, 60), background=(250, 250, 250), image=None):
    img = np.full((*size, 3), background, np.uint8) if image is None else image.copy()
    (t, b), (left, r) = box
    img[t:b, left:r] = colour
    return img


def photo(name):
    return np.asarray(Image.open(PHOTOS / f"{name}.jpg").convert("RGB"))


def edges(mask):
    return {"top": mask[0].mean(), "bottom": mask[-1].mean(), "left": mask[:, 0].mean(),
            "right": mask[:, -1].mean()}


def test_colour_and_cut_off_on_drawn_garments():
    red = drawn((200, 30, 40), ((20, 60), (15, 45)))
    assert g.dominant_colour(red) == "Red" and g.cut_off(red) is False
    assert g.colour_correct("Red", "Red") and g.colour_correct("Maroon", "Red") is False
    assert g.colour_correct("Navy Blue", "Multi") is None
    through = drawn((25, 35, 90), ((0, 80), (10, 50)))  # runs off the top and the bottom
    assert g.dominant_colour(through) == "Navy Blue" and g.cut_off(through) is True
    assert g.cut_off(drawn((25, 35, 90), ((20, 60), (0, 30)))) is True  # runs off the left side
    assert g.colour_neighbours("White") == ["White", "Off White", "Cream"]


def test_the_person_may_run_off_the_frame_the_garment_may_not():
    # a drawn model: a red shirt, dark trousers running off the bottom, a head off the top
    shirt = drawn((200, 30, 40), ((25, 50), (15, 45)))
    head = drawn((235, 190, 160), ((0, 25), (24, 36)), image=shirt)
    model = drawn((30, 30, 30), ((50, 80), (20, 40)), image=head)
    assert edges(g.foreground_mask(model))["bottom"] > 0.3  # the person runs off the frame
    assert g.dominant_colour(model) == "Red" and g.cut_off(model) is False
    # the same shirt running off the bottom itself is cut off
    assert g.cut_off(drawn((200, 30, 40), ((25, 80), (15, 45)), image=shirt)) is True


@pytest.mark.parametrize(("name", "end"), [("17248", "bottom"), ("15631", "top")])
def test_real_photos_of_a_model_judge_the_garment(name, end):
    """A T-shirt over jeans that run off the bottom, track pants under a shirt that runs off the
    top: the person covers over 40% of that edge (the old rule's cut), the garment is whole; the
    same photo cropped through the garment is cut off."""
    image = photo(name)
    assert edges(g.foreground_mask(image))[end] > 0.4
    assert g.cut_off(image) is False and g.colour_correct(g.dominant_colour(image), "Navy Blue")
    assert g.cut_off(g.crop_through(image)) is True


def test_no_garment_found_is_undetermined_not_wrong():
    white = drawn((245, 245, 245), ((20, 60), (15, 45)))  # white on white
    bra = photo("10716")  # a real white bra on the catalogue's white background
    striped = np.repeat(np.array([(25, 35, 90), (200, 30, 40), (250, 250, 250)], np.uint8)[
        np.arange(80) // 4 % 3][:, None], 60, axis=1)  # a printed garment filling the frame
    plain = np.full((80, 60, 3), (25, 35, 90), np.uint8)  # a plain one filling the frame
    worn = g.crop_through(photo("17248"), keep=0.4)  # the middle of a worn shirt fills the frame
    for image in (white, bra, striped, plain, worn):
        found = g.analyse(image)
        assert not found.found and found.why
        assert g.dominant_colour(image) is None and g.cut_off(image) is None
    assert "no plain background" in g.analyse(striped).why
    assert g.plain_border_share(g.srgb_to_lab(photo("17248"))) > 0.8  # a real border is plain
    assert g.colour_correct(None, "White") is None  # undetermined, not wrong

    table = g.score_images([drawn((200, 30, 40), ((20, 60), (15, 45))), bra, striped],
                           ["Red", "White", "Multi"])
    assert table.colour_correct.tolist() == [True, None, None]
    assert table.cut_off.tolist() == [False, None, None]
    s = g.summarise(table)
    assert (s["colour_accuracy"], s["colour_scored"], s["colour_judged_share"]) == (1.0, 1, 0.5)
    assert (s["cut_off_rate"], s["cut_off_scored"], s["images"]) == (0.0, 1, 3)
    assert s["cut_off_judged_share"] == pytest.approx(1 / 3)
    # the rate's bounds over all three: the two undetermined counted as whole, then as cut
    assert (s["cut_off_low"], s["cut_off_high"]) == (0.0, pytest.approx(2 / 3))
    half = g.summarise(table.assign(cut_off=[True, False, None]))
    assert half["cut_off_rate"] == 0.5
    assert (half["cut_off_low"], half["cut_off_high"]) == (pytest.approx(1 / 3), pytest.approx(2 / 3))


def _catalogue():
    styles = pd.read_csv(DEMO / "styles.csv", dtype=str, usecols=range(9))
    for r in styles.itertuples():
        path = DEMO / "images" / f"{r.id}.jpg"
        if path.is_file():
            yield r.baseColour, np.asarray(Image.open(path).convert("RGB"))


def _rate(values):
    judged = [v for v in values if v is not None]
    return np.mean(judged), len(judged) / len(values)


def test_calibrated_on_the_real_catalogue_photos():
    photos = list(_catalogue())
    assert len(photos) == 48
    accuracy, judged = _rate([g.colour_correct(g.dominant_colour(im), label) for label, im in photos])
    # the best constant guess: the one name that, said of every photo, scores best
    constant = max(np.mean([g.colour_correct(name, label) for label, _ in photos]) for name in g.PALETTE)
    print(f"colour accuracy {accuracy:.3f} (judged {judged:.3f}; best constant guess {constant:.3f})")
    assert judged >= 0.95 and accuracy >= constant + 0.15  # measured 0.604 of 1.0; 0.354

    real, real_judged = _rate([g.cut_off(im) for _, im in photos])
    cropped, cropped_judged = _rate([g.cut_off(g.crop_through(im)) for _, im in photos])
    print(f"cut-off rate: real {real:.3f} (judged {real_judged:.3f}), "
          f"cropped {cropped:.3f} (judged {cropped_judged:.3f})")
    # measured 0.062 (1.0) and 0.879 (0.688): a crop often fills the frame, and is undetermined
    assert real_judged >= 0.95 and cropped_judged >= 0.5
    assert real <= 0.15 and cropped - real >= 0.5


def test_a_folder_table_and_its_summary(tmp_path):
    paths = []
    for i, (colour, box) in enumerate([((200, 30, 40), ((20, 60), (15, 45))),
                                       ((25, 35, 90), ((0, 80), (10, 50)))]):
        Image.fromarray(drawn(colour, box)).save(tmp_path / f"{i}.png")
        paths.append(tmp_path / f"{i}.png")
    table = g.score_images(paths, ["Red", "Multi"])
    assert table.colour_judged.tolist() == ["Red", "Navy Blue"]
    assert table.colour_correct.tolist() == [True, None] and table.cut_off.tolist() == [False, True]
    s = g.summarise(table)
    assert (s["colour_accuracy"], s["colour_scored"], s["cut_off_rate"], s["images"]) == (1.0, 1, 0.5, 2)
    assert (s["colour_judged_share"], s["cut_off_scored"], s["cut_off_judged_share"]) == (1.0, 2, 1.0)


def test_evaluate_judges_a_folder_of_images(tmp_path, demo_captions, capsys):
    from fashion_sd import cli

    out = tmp_path / "judged"
    rc = cli.main(["evaluate", "--images", str(DEMO / "images"), "--captions", str(demo_captions),
                   "--out", str(out), "--set", "eval.clip=none"])
    assert rc == 0, capsys.readouterr().err
    table = pd.read_csv(out / "garment.csv")
    captions = pd.read_csv(demo_captions)
    assert len(table) == len(captions)
    direct = g.score_images([DEMO / "images" / f"{i}.jpg" for i in captions.id], captions.baseColour)
    assert table.colour_judged.tolist() == direct.colour_judged.tolist()
    md = (out / "garment.md").read_text()
    assert "colour accuracy" in md and "CLIP metrics off: eval.clip: none" in md
    assert cli.main(["evaluate", "--images", str(DEMO / "images"), "--out", str(out)]) == 2
