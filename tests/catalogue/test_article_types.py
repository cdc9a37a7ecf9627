import pytest

from fashion_sd.catalogue.article_types import SINGULAR, rule_singular, singular

# The 143 article types of the real styles.csv (44,446 rows), as the catalogue spells them.
REAL_TYPES = """Tshirts|Shirts|Casual Shoes|Watches|Sports Shoes|Kurtas|Tops|Handbags|Heels|Sunglasses|
Wallets|Flip Flops|Sandals|Briefs|Belts|Backpacks|Socks|Formal Shoes|Perfume and Body Mist|Jeans|
Shorts|Trousers|Flats|Bra|Dresses|Sarees|Earrings|Deodorant|Nail Polish|Lipstick|Track Pants|
Clutches|Sweatshirts|Caps|Sweaters|Ties|Jackets|Innerwear Vests|Kurtis|Tunics|Nightdress|Leggings|
Pendant|Capris|Necklace and Chains|Lip Gloss|Night suits|Trunk|Skirts|Scarves|Ring|Dupatta|
Accessory Gift Set|Cufflinks|Kajal and Eyeliner|Boxers|Blazers|Jumpsuit|Rompers|Baby Dolls|
Bath Robe|Lehenga Choli|Waistcoat|Nehru Jackets|Patiala|Salwar and Dupatta|Shapewear|Stockings|
Churidar|Jeggings|Tights|Tracksuits|Rain Jacket|Rain Trousers|Suspenders|Robe|Lounge Pants|
Lounge Shorts|Lounge Tshirts|Kurta Sets|Clothing Set|Salwar|Shrug|Swimwear|Camisoles|Booties|
Sports Sandals|Shoe Laces|Shoe Accessories|Headband|Hat|Gloves|Mufflers|Stoles|Umbrellas|
Wristbands|Duffel Bag|Laptop Bag|Messenger Bag|Mobile Pouch|Rucksacks|Tablet Sleeve|Trolley Bag|
Waist Pouch|Travel Accessory|Water Bottle|Key chain|Bangle|Bracelet|Jewellery Set|Free Gifts|Ipad|
Cushion Covers|Footballs|Basketballs|Hair Accessory|Foundation and Primer|Highlighter and Blush|
Lip Liner|Face Moisturisers|Eyeshadow|Fragrance Gift Set|Compact|Face Wash and Cleanser|Mascara|
Concealer|Beauty Accessory|Sunscreen|Lip Care|Nail Essentials|Face Scrub and Exfoliator|Eye Cream|
Hair Colour|Toner|Makeup Remover|Face Serum and Gel|Mask and Peel|Lip Plumper|Body Lotion|
Body Wash and Scrub|Mens Grooming Kit|Ties and Cufflinks|Suits"""
REAL = [t.strip() for t in REAL_TYPES.replace("\n", "").split("|")]


def test_table_covers_every_real_type_without_warning(recwarn):
    assert len(REAL) == len(set(REAL)) == 143
    assert set(REAL) <= set(SINGULAR)
    for t in REAL:
        noun = singular(t)
        assert noun and noun.strip() == noun
    assert not [w for w in recwarn if "not in fashion_sd.catalogue.article_types" in str(w.message)]


@pytest.mark.parametrize("plural, noun", [
    ("Tshirts", "T-Shirt"), ("Dresses", "Dress"), ("Jeans", "Jeans"), ("Sweaters", "Sweater"),
    ("Casual Shoes", "Casual Shoe"), ("Watches", "Watch"), ("Scarves", "Scarf"),
    ("Clutches", "Clutch"), ("Lounge Tshirts", "Lounge T-Shirt"), ("Sunglasses", "Sunglasses"),
])
def test_paper_style_singulars(plural, noun):
    assert singular(plural) == noun


@pytest.mark.parametrize("plural, noun", [
    ("Accessories", "Accessory"), ("Boxes", "Box"), ("Brushes", "Brush"), ("Coats", "Coat"),
    ("Dress", "Dress"), ("Ponchos", "Poncho"), ("Rain Coats", "Rain Coat"),
])
def test_rule_singular(plural, noun):
    assert rule_singular(plural) == noun


def test_unknown_type_gets_rule_and_warning():
    with pytest.warns(UserWarning, match="Ponchos"):
        assert singular("Ponchos") == "Poncho"
