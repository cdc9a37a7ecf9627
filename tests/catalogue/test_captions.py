import hashlib

import numpy as np
import pandas as pd
import pytest
from conftest import write_image, write_styles
from PIL import Image, ImageOps

from fashion_sd import images
from fashion_sd.catalogue import captions
from fashion_sd.catalogue.caption_text import fix_articles
from fashion_sd.catalogue.captions import build_captions
from fashion_sd.catalogue.splits import allocate
from fashion_sd.catalogue.styles import read_styles
from fashion_sd.caption_template import CaptionError
from fashion_sd.config import load_config

FORBIDDEN = ("None", "nan", "NaN", " NA", "NA ")


def cap_cfg(*overrides):
    return load_config(None, list(overrides)).captions


def build(path, *overrides, images_dir=None, seed=0):
    return build_captions(path, cap_cfg(*overrides), seed, images_dir)


# -- the bundled sample ---------------------------------------------------------------------


def test_bundled_sample(demo_dir):
    result = build(demo_dir / "styles.csv", images_dir=demo_dir / "images")
    t = result.table
    assert result.summary["rows_read"] == 48
    assert result.summary["dropped_by_stage_reason"] == {
        "filter": {"excluded masterCategory Sporting Goods": 4}}
    assert len(t) == 44 and t.id.is_unique
    assert t.loc[t.id == 1163, "caption"].item() == \
        "an image of a 2011 Sports Summer Blue Men's T-Shirt"
    assert t.loc[t.id == 1525, "caption"].item() == \
        "an image of a 2010 Casual Fall Navy Blue Unisex Backpack"
    assert all(p.is_file() for p in t.image_path)
    assert set(t.split) == {"train", "val", "test"}
    assert not t.caption.str.contains("|".join(FORBIDDEN)).any()


def test_paper_example_row(tmp_path):
    p = write_styles(tmp_path / "s.csv", [
        "15970,Men,Apparel,Topwear,Shirts,Navy Blue,Fall,2011,Casual,Turtle Check Men Navy Blue Shirt",
        "39386,Men,Apparel,Bottomwear,Jeans,Blue,Summer,2012,Casual,Peter England Men Party Blue Jeans",
        "59263,Women,Accessories,Watches,Watches,Silver,Winter,2016,Casual,Titan Women Silver Watch",
        "21379,Boys,Apparel,Topwear,Tshirts,White,Fall,2011,Sports,Boys White Tee",
        "53759,Girls,Apparel,Dress,Dresses,Grey,Summer,2012,Casual,Girls Grey Dress",
    ])
    t = build(p).table.set_index("id").caption
    assert t[15970] == "an image of a 2011 Casual Fall Navy Blue Men's Shirt"
    assert t[39386] == "an image of a 2012 Casual Summer Blue Men's Jeans"
    assert t[59263] == "an image of a 2016 Casual Winter Silver Women's Watch"
    assert t[21379] == "an image of a 2011 Sports Fall White Boys' T-Shirt"
    assert t[53759] == "an image of a 2012 Casual Summer Grey Girls' Dress"


# -- the real file's quirks -----------------------------------------------------------------


def test_commas_in_display_name_are_recovered_not_shifted(tmp_path):
    p = write_styles(tmp_path / "s.csv", [
        "1,Men,Apparel,Topwear,Tshirts,White,Fall,2011,Sports,Plain Tee",
        "2,Women,Apparel,Dress,Dresses,Grey,Summer,2012,Casual,Dress, Grey, Sleeveless",
        "3,Men,Footwear,Shoes,Casual Shoes,Black,Winter,2013,Casual,Shoe,Black",
    ])
    # what plain pandas does with the real file
    with pytest.raises(pd.errors.ParserError, match="Expected 10 fields in line 3, saw 12"):
        pd.read_csv(p)
    df, bad, recovered = read_styles(p)
    assert recovered == [3, 4] and bad.empty
    assert df.set_index("id").loc["2", "productDisplayName"] == "Dress, Grey, Sleeveless"
    assert df.set_index("id").loc["3", "usage"] == "Casual"
    result = build(p)
    assert result.summary["recovered_lines"] == [3, 4]
    assert result.table.set_index("id").caption[2] == \
        "an image of a 2012 Casual Summer Grey Women's Dress"


def test_short_lines_are_dropped_with_their_line(tmp_path):
    p = write_styles(tmp_path / "s.csv", [
        "1,Men,Apparel,Topwear,Tshirts,White,Fall,2011,Sports,Plain Tee",
        "2,Women,Apparel,Dress",
        "",
        "3,Men,Apparel,Topwear,Shirts,Blue,Fall,2011,Casual,Shirt",
    ])
    result = build(p)
    assert result.table.id.tolist() == [1, 3]
    d = result.dropped
    assert d.to_dict("records") == [
        {"line": 3, "id": "2", "stage": "parse", "reason": "malformed: 4 fields, expected 10"}]
    assert result.summary["rows_read"] == 3


def test_float_years_na_and_missing_fields(tmp_path):
    p = write_styles(tmp_path / "s.csv", [
        "1,Men,Apparel,Topwear,Tshirts,White,Fall,2011.0,Sports,a",
        "2,Women,Apparel,Dress,Dresses,Grey,Summer,2012.0,NA,b",
        "3,Women,Apparel,Topwear,Kurtas,Off White,Summer,,Ethnic,c",
        "4,Men,Apparel,Topwear,Tshirts,,,,,d",
        "5,,Apparel,Topwear,Tops,Olive,Fall,2012,,e",
        "6,Unisex,Accessories,Eyewear,Sunglasses,Black,Winter,2016,Casual,",
        "7,Women,Apparel,Topwear,Tshirts,NA,NA,NA,NA,NA",
    ])
    t = build(p).table.set_index("id")
    assert t.caption[1] == "an image of a 2011 Sports Fall White Men's T-Shirt"
    assert t.caption[2] == "an image of a 2012 Summer Grey Women's Dress"
    assert t.caption[3] == "an image of an Ethnic Summer Off White Women's Kurta"
    assert t.caption[4] == "an image of a Men's T-Shirt"
    assert t.caption[5] == "an image of a 2012 Fall Olive Top"
    assert t.caption[6] == "an image of a 2016 Casual Winter Black Unisex Sunglasses"
    assert t.caption[7] == "an image of a Women's T-Shirt"
    assert t.year[1] == "2011" and pd.isna(t.usage[2])
    for c in t.caption:
        assert not any(word in f" {c} " for word in (" None ", " nan ", " NA ", "  "))


def test_article_choice():
    assert fix_articles("an image of a Ethnic Kurta") == "an image of an Ethnic Kurta"
    assert fix_articles("an image of a 2011 Casual Shirt") == "an image of a 2011 Casual Shirt"
    assert fix_articles("an image of an Unisex Cap") == "an image of a Unisex Cap"
    assert fix_articles("A Olive Top") == "An Olive Top"


def test_missing_columns_are_listed(tmp_path):
    p = write_styles(tmp_path / "s.csv", ["1,Men,Tshirts"], header="id,gender,articleType")
    with pytest.raises(CaptionError) as info:
        read_styles(p)
    msg = str(info.value)
    assert str(p) in msg
    for col in ("masterCategory", "subCategory", "baseColour", "season", "year", "usage"):
        assert col in msg
    assert "gender," not in msg.split("found")[0]


def test_missing_file():
    with pytest.raises(CaptionError, match="not found"):
        read_styles("/nonexistent/styles.csv")


def test_ids_invalid_or_duplicated(tmp_path):
    p = write_styles(tmp_path / "s.csv", [
        "1,Men,Apparel,Topwear,Tshirts,White,Fall,2011,Sports,a",
        "x1,Men,Apparel,Topwear,Tshirts,White,Fall,2011,Sports,b",
        "1,Men,Apparel,Topwear,Shirts,White,Fall,2011,Sports,c",
    ])
    r = build(p)
    assert r.table.caption.tolist() == ["an image of a 2011 Sports Fall White Men's T-Shirt"]
    assert r.dropped.reason.tolist() == ["invalid id", "duplicate id"]


# -- filters ----------------------------------------------------------------------------------


CATS = [
    "1,Men,Apparel,Topwear,Tshirts,White,Fall,2011,Sports,a",
    "2,Women,Personal Care,Lips,Lipstick,Red,Fall,2011,Casual,b",
    "3,Unisex,Free Items,Free Gifts,Free Gifts,Red,Fall,2011,Casual,c",
    "4,Men,Footwear,Shoes,Casual Shoes,Black,Fall,2011,Casual,d",
    "5,Women,Accessories,Bags,Handbags,Black,Fall,2011,Casual,e",
    "6,Men,Apparel,Topwear,,Black,Fall,2011,Casual,f",
    "7,Unisex,Sporting Goods,Sports Equipment,Footballs,White,Fall,2011,Sports,g",
    "8,Unisex,Home,Home Furnishing,Cushion Covers,White,Fall,2011,Casual,h",
]


def test_default_filters_keep_clothing_footwear_accessories(tmp_path):
    r = build(write_styles(tmp_path / "s.csv", CATS))
    assert r.table.id.tolist() == [1, 4, 5]
    assert r.summary["dropped_by_stage_reason"]["filter"] == {
        "excluded masterCategory Personal Care": 1, "excluded masterCategory Free Items": 1,
        "missing articleType": 1, "excluded masterCategory Sporting Goods": 1,
        "excluded masterCategory Home": 1}


def test_filters_are_configuration(tmp_path):
    p = write_styles(tmp_path / "s.csv", CATS)
    r = build(p, "captions.include.masterCategory=[Apparel, Footwear]",
              "captions.exclude.articleType=[Casual Shoes]")
    assert r.table.id.tolist() == [1]
    r = build(p, "captions.exclude.masterCategory=[]")
    assert r.table.id.tolist() == [1, 2, 3, 4, 5, 7, 8]


def test_nothing_left_is_an_error(tmp_path):
    p = write_styles(tmp_path / "s.csv", CATS[1:3])
    with pytest.raises(CaptionError, match="no rows left.*Personal Care 1"):
        build(p)


# -- images -----------------------------------------------------------------------------------


def test_image_checks(tmp_path):
    d = tmp_path / "images"
    d.mkdir()
    kinds = {
        1: "ok", 2: "missing", 3: "corrupt", 4: "truncated", 5: "empty", 6: "gray",
        7: "rgba", 8: "cmyk", 9: "png_named_jpg", 10: "gif", 11: "png_file",
    }
    write_image(d / "1.jpg")
    (d / "3.jpg").write_bytes(b"definitely not a jpeg" * 20)
    data = write_image(d / "4.jpg", size=(120, 160)).read_bytes()
    (d / "4.jpg").write_bytes(data[: len(data) // 2])
    (d / "5.jpg").write_bytes(b"")
    write_image(d / "6.jpg", mode="L")
    write_image(d / "7.jpg", mode="RGBA", fmt="PNG")
    write_image(d / "8.jpg", mode="CMYK")
    write_image(d / "9.jpg", fmt="PNG")
    write_image(d / "10.jpg", fmt="GIF")
    write_image(d / "11.png", fmt="PNG")
    lines = [f"{i},Men,Apparel,Topwear,Tshirts,White,Fall,2011,Sports,{k}" for i, k in kinds.items()]
    p = write_styles(tmp_path / "s.csv", lines)
    r = build(p, images_dir=d)
    assert r.table.id.tolist() == [1, 6, 7, 8, 9, 11]
    reasons = r.dropped.set_index("id").reason
    assert reasons["2"] == "missing file"
    assert reasons["3"].startswith("unreadable")
    assert reasons["4"].startswith("truncated")
    assert reasons["5"] == "empty file (0 bytes)"
    assert reasons["10"].startswith("unsupported format GIF")
    assert r.summary["dropped_by_stage_reason"]["image"] == {
        "missing file": 1, "unreadable": 1, "truncated": 1, "empty file (0 bytes)": 1,
        "unsupported format GIF (JPEG or PNG expected)": 1}
    out, rejected = captions.write_outputs(r, tmp_path / "out" / "captions.csv")
    rej = pd.read_csv(rejected)
    assert sorted(rej.id.astype(str)) == sorted(["2", "3", "4", "5", "10"])
    assert set(rej.stage) == {"image"}
    back = captions.read_captions(out)
    assert back.image_path.map(lambda s: s.endswith((".jpg", ".png"))).all()
    assert all(pd.Series(back.image_path).map(lambda s: __import__("os").path.isfile(s)))


def test_without_images_no_file_is_touched(tmp_path, monkeypatch, demo_dir):
    def boom(*a, **k):
        raise AssertionError("an image was opened")

    monkeypatch.setattr(images, "check_image", boom)
    monkeypatch.setattr(images, "index_folder", boom)
    r = build(demo_dir / "styles.csv")
    assert len(r.table) == 44 and r.table.image_path.isna().all()
    out, _ = captions.write_outputs(r, tmp_path / "c.csv")
    assert (pd.read_csv(out, keep_default_na=False).image_path == "").all()


# -- sampling, splitting, determinism ---------------------------------------------------------


def many_rows(n_big=60, n_mid=30, n_rare=4):
    lines, i = [], 0
    for article, n in (("Tshirts", n_big), ("Shirts", n_mid), ("Ties", n_rare), ("Belts", n_rare)):
        for _ in range(n):
            i += 1
            lines.append(f"{i},Men,Apparel,Topwear,{article},White,Fall,{2010 + i % 5},Casual,x")
    return lines


def test_split_is_stratified_with_exact_counts(tmp_path):
    p = write_styles(tmp_path / "s.csv", many_rows())
    t = build(p).table
    counts = t.groupby(["articleType", "split"]).size().unstack(fill_value=0)
    assert counts.loc["Tshirts"].to_dict() == {"train": 48, "val": 6, "test": 6}
    assert counts.loc["Shirts"].to_dict() == {"train": 24, "val": 3, "test": 3}
    # the 8 rows of rare types are split together: 8 * (0.8, 0.1, 0.1) -> 6.4, 0.8, 0.8 -> 6, 1, 1
    assert counts.loc[["Ties", "Belts"]].sum().to_dict() == {"train": 6, "val": 1, "test": 1}


def test_allocate_largest_remainder():
    assert allocate(12, (0.8, 0.1, 0.1)) == [10, 1, 1]
    assert allocate(3, (0.8, 0.1, 0.1)) == [3, 0, 0]
    assert allocate(7, (0.5, 0.5, 0.0)) == [4, 3, 0]
    for n in range(50):
        assert sum(allocate(n, (0.7, 0.2, 0.1))) == n


def test_max_images_sample_is_seeded_and_skips_bad_images(tmp_path):
    d = tmp_path / "images"
    d.mkdir()
    lines = many_rows()
    for line in lines:
        i = int(line.split(",")[0])
        if i % 3:  # every third image is missing
            write_image(d / f"{i}.jpg", size=(8, 8))
    p = write_styles(tmp_path / "s.csv", lines)
    a = build(p, "captions.max_images=20", images_dir=d, seed=1).table
    b = build(p, "captions.max_images=20", images_dir=d, seed=1).table
    c = build(p, "captions.max_images=20", images_dir=d, seed=2).table
    assert len(a) == 20 and (a.id % 3 != 0).all()
    assert a.id.tolist() == b.id.tolist() and a.split.tolist() == b.split.tolist()
    assert a.id.tolist() != c.id.tolist()


def test_same_seed_same_bytes(tmp_path, demo_dir):
    def run(seed, name):
        r = build(demo_dir / "styles.csv", images_dir=demo_dir / "images", seed=seed)
        out, rej = captions.write_outputs(r, tmp_path / name / "captions.csv")
        return hashlib.sha256(out.read_bytes()).hexdigest(), rej.read_bytes()

    assert run(3, "a") == run(3, "b")
    assert run(3, "a")[0] != run(4, "c")[0]


# -- long captions ----------------------------------------------------------------------------


def test_captions_over_77_tokens_are_reported(tmp_path):
    long_name = " ".join(["extraordinarily"] * 40)
    p = write_styles(tmp_path / "s.csv", [
        "1,Men,Apparel,Topwear,Tshirts,White,Fall,2011,Sports,short",
        f"2,Men,Apparel,Topwear,Tshirts,White,Fall,2011,Sports,{long_name}",
    ])
    r = build(p, "captions.template={article} {productDisplayName}")
    long = r.summary["over_token_limit"]
    assert list(long) == [f"T-Shirt {long_name}"] and long[f"T-Shirt {long_name}"] > 77
    assert "captions over CLIP's 77 tokens (would be truncated): 1" in \
        captions.format_summary(r.summary)


def test_caption_from_attributes_matches_training_captions():
    from fashion_sd.catalogue.caption_text import caption_from_attributes

    assert caption_from_attributes(year="2011", usage="Casual", season="Fall", colour="White",
                                   gender="Men", article="Sweaters") == \
        "an image of a 2011 Casual Fall White Men's Sweater"
    assert caption_from_attributes(year="2012.0", usage="NA", colour="Grey", gender="Women",
                                   article="Dresses") == "an image of a 2012 Grey Women's Dress"
    assert caption_from_attributes(usage="Ethnic", article="Kurtas") == "an image of an Ethnic Kurta"
    with pytest.raises(CaptionError, match="article type is needed"):
        caption_from_attributes(year="2011")
    with pytest.raises(CaptionError, match="unknown attribute 'brand'"):
        caption_from_attributes(brand="Nike", article="Tshirts")


def test_ids_beyond_an_integer_are_rejected_with_the_reason(tmp_path):
    """1e30 once wrapped to -9223372036854775808, and a second such id was called a duplicate."""
    row = ",Men,Apparel,Topwear,Tshirts,White,Fall,2011,Sports,a"
    p = write_styles(tmp_path / "s.csv", [f"{i}{row}" for i in (
        "1", "1e30", "2e30", "-1e30", "9223372036854775808", "9223372036854775807", "inf", "2e3")])
    r = build(p)
    assert r.table.id.tolist() == [1, 9223372036854775807, 2000]  # exact, not through a float
    assert r.dropped.id.tolist() == ["1e30", "2e30", "-1e30", "9223372036854775808", "inf"]
    assert r.dropped.reason.tolist() == ["invalid id: does not fit a 64-bit integer"] * 4 + [
        "invalid id: not a finite number"]
    assert "duplicate id" not in r.dropped.reason.tolist()


def _png_claiming(path, width, height):
    import struct
    import zlib

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2,
                                                                     0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    return path


def test_bomb_sized_images_and_link_loops_are_rejected_with_the_reason(tmp_path):
    """A PNG that claims 81 MP (above images.MAX_PIXELS, below Pillow's warning), one that claims
    400 MP (Pillow's DecompressionBombError) and a symbolic link to itself: each a rejected row
    with its reason, no traceback, nothing decoded."""
    row = ",Men,Apparel,Topwear,Tshirts,White,Fall,2011,Sports,a"
    p = write_styles(tmp_path / "s.csv", [f"{i}{row}" for i in range(1, 5)])
    imgs = tmp_path / "images"
    imgs.mkdir()
    write_image(imgs / "1.jpg")
    _png_claiming(imgs / "2.png", 9000, 9000)
    _png_claiming(imgs / "3.png", 20000, 20000)
    (imgs / "4.jpg").symlink_to("4.jpg")
    r = build(p, images_dir=imgs)
    assert r.table.id.tolist() == [1]
    reasons = dict(zip(r.dropped.id, r.dropped.reason))
    assert reasons["2"].startswith("too large: 9000x9000 is 81 megapixels, above the 64 MP limit")
    assert reasons["3"].startswith("too large:") and "decompression bomb" in reasons["3"]
    assert reasons["4"].startswith("unreadable: a symbolic-link loop")
    assert images.header_problem(imgs / "2.png") == reasons["2"]
    assert images.header_problem(imgs / "4.jpg") == reasons["4"]
    assert images.header_problem(imgs / "1.jpg") is None
    with pytest.raises(ValueError, match="2.png: too large"):
        images.load_image(imgs / "2.png", 64)


def test_photos_are_read_as_the_fields_loaders_read_them(tmp_path):
    """A strip too narrow to keep a side at the training size is a rejected row naming the file
    (it once failed inside training, no file named); a 16-bit greyscale PNG keeps its greys
    (Pillow's convert made it white); an EXIF-rotated photo is trained upright, as
    ImageOps.exif_transpose (torchvision's and diffusers' loaders) shows it."""
    row = ",Men,Apparel,Topwear,Tshirts,White,Fall,2011,Sports,a"
    p = write_styles(tmp_path / "s.csv", [f"{i}{row}" for i in range(1, 5)])
    imgs = tmp_path / "images"
    imgs.mkdir()
    write_image(imgs / "1.jpg", size=(2000, 40))
    ramp = np.linspace(0, 65535, 60 * 80).reshape(80, 60).astype(np.uint16)
    Image.fromarray(ramp).save(imgs / "2.png")
    upright = np.zeros((80, 60, 3), np.uint8)
    upright[:40] = (200, 30, 30)  # red top half, seen upright
    sideways = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)  # stored turned
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to show"
    sideways.save(imgs / "3.jpg", exif=exif, quality=95)
    write_image(imgs / "4.jpg")
    r = build(p, images_dir=imgs)
    assert r.table.id.tolist() == [2, 3, 4]
    reason = dict(zip(r.dropped.id, r.dropped.reason))["1"]
    assert reason.startswith("too narrow: 2000x40 is more than 20 times longer than it is wide")
    assert images.header_problem(imgs / "1.jpg") == reason
    grey = images.load_image(imgs / "2.png", None)
    assert grey.shape == (80, 80, 3)
    want = np.round(ramp.astype(np.float64) * 255 / 65535)
    np.testing.assert_array_equal(grey[:, 10:70, 0], want)  # padded left and right
    shown = images.load_image(imgs / "3.jpg", None)
    seen = np.asarray(ImageOps.exif_transpose(Image.open(imgs / "3.jpg")).convert("RGB"))
    np.testing.assert_array_equal(shown[:, 10:70], seen)
    assert shown[5, 40, 0] > 150 and shown[75, 40, 0] < 50  # red on top, as photographed


def test_the_same_photo_under_two_ids_is_kept_once(tmp_path):
    """Byte-identical photos under two ids could land in train and test alike, and the model
    be scored on a photo it trained on: the second is a rejected row naming the first."""
    row = ",Men,Apparel,Topwear,Tshirts,White,Fall,2011,Sports,a"
    p = write_styles(tmp_path / "s.csv", [f"{i}{row}" for i in range(1, 5)])
    imgs = tmp_path / "images"
    imgs.mkdir()
    for i in (1, 2, 4):
        write_image(imgs / f"{i}.jpg")
    (imgs / "3.jpg").write_bytes((imgs / "1.jpg").read_bytes())
    r = build(p, images_dir=imgs)
    assert r.table.id.tolist() == [1, 2, 4]
    assert dict(zip(r.dropped.id, r.dropped.reason)) == {
        "3": "duplicate image: the same file as id 1 (1.jpg)"}
    assert r.summary["dropped_by_stage_reason"]["image"] == {"duplicate image": 1}
