"""Singular nouns for the catalogue's article types, decided once.

The catalogue names article types in the plural (``Tshirts``, ``Dresses``) while each image shows
one item, so captions use a singular noun. Garments that only exist as a pair or in the plural
(``Jeans``, ``Trousers``, ``Socks``, ``Sunglasses``) keep their form, as in the paper's captions;
footwear is named per shoe (``Casual Shoe``), which is how catalogues and the paper speak of it.

``SINGULAR`` covers all 143 article types of the real ``styles.csv`` (44,446 rows). A type outside
it gets a rule-based singular from :func:`singular` and a warning, so a newer catalogue still works.
"""

from __future__ import annotations

import re
import warnings

SINGULAR: dict[str, str] = {
    # Topwear
    "Tshirts": "T-Shirt",
    "Shirts": "Shirt",
    "Tops": "Top",
    "Kurtas": "Kurta",
    "Kurtis": "Kurti",
    "Tunics": "Tunic",
    "Sweatshirts": "Sweatshirt",
    "Sweaters": "Sweater",
    "Jackets": "Jacket",
    "Blazers": "Blazer",
    "Waistcoat": "Waistcoat",
    "Nehru Jackets": "Nehru Jacket",
    "Rain Jacket": "Rain Jacket",
    "Shrug": "Shrug",
    "Suits": "Suit",
    "Dupatta": "Dupatta",
    "Lehenga Choli": "Lehenga Choli",
    "Kurta Sets": "Kurta Set",
    "Clothing Set": "Clothing Set",
    # Bottomwear
    "Jeans": "Jeans",
    "Trousers": "Trousers",
    "Shorts": "Shorts",
    "Track Pants": "Track Pants",
    "Capris": "Capris",
    "Leggings": "Leggings",
    "Jeggings": "Jeggings",
    "Tights": "Tights",
    "Skirts": "Skirt",
    "Patiala": "Patiala",
    "Salwar": "Salwar",
    "Salwar and Dupatta": "Salwar and Dupatta",
    "Churidar": "Churidar",
    "Rain Trousers": "Rain Trousers",
    "Tracksuits": "Tracksuit",
    "Swimwear": "Swimwear",
    "Stockings": "Stockings",
    # Dresses and one-pieces
    "Dresses": "Dress",
    "Sarees": "Saree",
    "Jumpsuit": "Jumpsuit",
    "Rompers": "Romper",
    # Innerwear, loungewear and nightwear
    "Briefs": "Briefs",
    "Boxers": "Boxers",
    "Trunk": "Trunk",
    "Bra": "Bra",
    "Innerwear Vests": "Innerwear Vest",
    "Camisoles": "Camisole",
    "Shapewear": "Shapewear",
    "Nightdress": "Nightdress",
    "Night suits": "Night Suit",
    "Baby Dolls": "Baby Doll",
    "Robe": "Robe",
    "Bath Robe": "Bath Robe",
    "Lounge Pants": "Lounge Pants",
    "Lounge Shorts": "Lounge Shorts",
    "Lounge Tshirts": "Lounge T-Shirt",
    "Socks": "Socks",
    "Suspenders": "Suspenders",
    # Footwear
    "Casual Shoes": "Casual Shoe",
    "Sports Shoes": "Sports Shoe",
    "Formal Shoes": "Formal Shoe",
    "Heels": "Heel",
    "Flats": "Flat",
    "Sandals": "Sandal",
    "Sports Sandals": "Sports Sandal",
    "Flip Flops": "Flip Flop",
    "Booties": "Bootie",
    "Shoe Laces": "Shoe Laces",
    "Shoe Accessories": "Shoe Accessory",
    # Bags and small leather goods
    "Handbags": "Handbag",
    "Clutches": "Clutch",
    "Backpacks": "Backpack",
    "Rucksacks": "Rucksack",
    "Wallets": "Wallet",
    "Duffel Bag": "Duffel Bag",
    "Laptop Bag": "Laptop Bag",
    "Messenger Bag": "Messenger Bag",
    "Trolley Bag": "Trolley Bag",
    "Mobile Pouch": "Mobile Pouch",
    "Waist Pouch": "Waist Pouch",
    "Tablet Sleeve": "Tablet Sleeve",
    # Accessories
    "Watches": "Watch",
    "Sunglasses": "Sunglasses",
    "Belts": "Belt",
    "Ties": "Tie",
    "Cufflinks": "Cufflinks",
    "Ties and Cufflinks": "Tie and Cufflinks",
    "Caps": "Cap",
    "Hat": "Hat",
    "Headband": "Headband",
    "Scarves": "Scarf",
    "Stoles": "Stole",
    "Mufflers": "Muffler",
    "Gloves": "Gloves",
    "Wristbands": "Wristband",
    "Umbrellas": "Umbrella",
    "Hair Accessory": "Hair Accessory",
    "Travel Accessory": "Travel Accessory",
    "Accessory Gift Set": "Accessory Gift Set",
    "Key chain": "Key Chain",
    "Water Bottle": "Water Bottle",
    # Jewellery
    "Earrings": "Earrings",
    "Ring": "Ring",
    "Pendant": "Pendant",
    "Necklace and Chains": "Necklace",
    "Bangle": "Bangle",
    "Bracelet": "Bracelet",
    "Jewellery Set": "Jewellery Set",
    # Personal care
    "Perfume and Body Mist": "Perfume and Body Mist",
    "Deodorant": "Deodorant",
    "Fragrance Gift Set": "Fragrance Gift Set",
    "Nail Polish": "Nail Polish",
    "Nail Essentials": "Nail Essentials",
    "Lipstick": "Lipstick",
    "Lip Gloss": "Lip Gloss",
    "Lip Liner": "Lip Liner",
    "Lip Care": "Lip Care",
    "Lip Plumper": "Lip Plumper",
    "Kajal and Eyeliner": "Kajal and Eyeliner",
    "Eyeshadow": "Eyeshadow",
    "Mascara": "Mascara",
    "Foundation and Primer": "Foundation and Primer",
    "Highlighter and Blush": "Highlighter and Blush",
    "Compact": "Compact",
    "Concealer": "Concealer",
    "Face Moisturisers": "Face Moisturiser",
    "Face Wash and Cleanser": "Face Wash and Cleanser",
    "Face Scrub and Exfoliator": "Face Scrub and Exfoliator",
    "Face Serum and Gel": "Face Serum and Gel",
    "Mask and Peel": "Mask and Peel",
    "Eye Cream": "Eye Cream",
    "Sunscreen": "Sunscreen",
    "Toner": "Toner",
    "Makeup Remover": "Makeup Remover",
    "Hair Colour": "Hair Colour",
    "Body Lotion": "Body Lotion",
    "Body Wash and Scrub": "Body Wash and Scrub",
    "Beauty Accessory": "Beauty Accessory",
    "Mens Grooming Kit": "Men's Grooming Kit",
    # Free items, home, sporting goods
    "Free Gifts": "Free Gift",
    "Ipad": "iPad",
    "Cushion Covers": "Cushion Cover",
    "Footballs": "Football",
    "Basketballs": "Basketball",
}

# English plurals the catalogue uses, most specific first.
_PLURAL_RULES = (
    (re.compile(r"ies$"), "y"),  # Accessories -> Accessory
    (re.compile(r"(ch|sh|ss|x|z)es$"), r"\1"),  # Clutches -> Clutch, Dresses -> Dress
    (re.compile(r"(?<![su])s$"), ""),  # Bags -> Bag; keeps Dress and Bus
)


def rule_singular(word: str) -> str:
    """Singular of a plural noun phrase by English suffix rules on its last word."""
    head, _, last = word.rpartition(" ")
    for pattern, repl in _PLURAL_RULES:
        if pattern.search(last):
            last = pattern.sub(repl, last)
            break
    return f"{head} {last}" if head else last


def singular(article_type: str) -> str:
    """The caption noun for an article type: the table first, else a rule, with a warning."""
    try:
        return SINGULAR[article_type]
    except KeyError:
        guess = rule_singular(article_type)
        warnings.warn(
            f"article type {article_type!r} is not in fashion_sd.catalogue.article_types.SINGULAR; "
            f"using the rule-based singular {guess!r} (add it to the table to decide it for good)",
            stacklevel=2,
        )
        return guess
