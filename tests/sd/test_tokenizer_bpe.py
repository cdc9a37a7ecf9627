"""Our CLIP BPE tokenizer against the two it replaces: KerasCV's ``SimpleTokenizer`` (OpenAI's code,
``regex`` pre-tokenizer) and transformers' ``CLIPTokenizer`` (the Rust ``tokenizers`` BPE), both
on the vocabulary the package ships; ids must be equal on the demo catalogue's captions and
product names and on awkward strings. The references are imported only here."""

import gzip
import subprocess
import sys

import pandas as pd
import pytest
from conftest import DEMO, ROOT

from fashion_sd.sd import tokenizer as T

# Strings a prompt box or a catalogue can hold. All three tokenizers must agree on these.
AWKWARD = [
    "", "   ", "Men's", "Women's", "MEN'S WATCH", "women's  shoes", "Boys' & Girls'",
    "2011", "an image of a 2011 Casual Fall White Men's Sweater", "size 32/34, 100% cotton",
    "Tshirts, Jeans & Shorts!", "&", "black & white", "t-shirt", "slim-fit navy-blue", "--",
    "a  double  space", "  leading and trailing  ", "tab\tand\nnewline\r\n", "UPPER CASE",
    "Café crème, naïve façade, Ångström, Müller, señor, œuvre, Straße", "ÀÉÎÕÜ ç Ø Ł ğ",
    "don't can't I'M we'll they're you've I'd", "rock'n'roll", "'quoted'", "\"double quotes\"",
    "$19.99 @ #1 *new* (sale) [xl] {m} ~ ^ | \\ / < > = + ?", "snake_case __init__",
    "en – dash — em dash … ‘curly’ “quotes”", "½ price, size² Ⅻ", "3rd 21st 1990s",
    " ".join(map(chr, range(0x20, 0x180))),  # ASCII, Latin-1 and Latin Extended-A
    "a <|endoftext|> b", "<|startoftext|>", "👗 dress 👠", "连衣裙 2011", "İstanbul", "ǅemal ﬁne",
    "\u00a0nbsp\u2003em space\u3000",
]
# Where transformers differs by design: it does not unescape HTML, it composes accents (NFC)
# and it does not strip \x1c-\x1f. Ours must still equal OpenAI's code, which KerasCV runs.
OPENAI_ONLY = [
    "black &amp; white", "&lt;b&gt;bold&lt;/b&gt;", "&amp;amp;", "&nbsp;x", "cafe\u0301",
    "\x1c\x1dsep a\x1cb\x1e\x1f",
]


@pytest.fixture(scope="module")
def catalogue_texts(demo_captions):
    """Every caption of the demo catalogue and every product name in its styles.csv, and one
    caption of 100 words."""
    captions = pd.read_csv(demo_captions).caption.tolist()
    names = pd.read_csv(DEMO / "styles.csv").productDisplayName.tolist()
    long = " ".join(" ".join(captions).split()[:100])
    assert len(captions) >= 40 and len(names) >= 40 and len(long.split()) == 100
    return captions + names + [long]


@pytest.fixture(scope="module")
def kerascv():
    pytest.importorskip("keras_cv")
    from keras_cv.models.stable_diffusion import SimpleTokenizer

    return SimpleTokenizer(bpe_path=str(T.BPE_PATH))


@pytest.fixture(scope="module")
def hf():
    """transformers' CLIPTokenizer from the shipped merges, with OpenAI's vocabulary order built
    by transformers' own copy of OpenAI's ``bytes_to_unicode``."""
    transformers = pytest.importorskip("transformers")
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    text = gzip.decompress(T.BPE_PATH.read_bytes()).decode("utf-8")
    lines = text.split("\n")[1: 49152 - 256 - 2 + 1]
    merges = [tuple(line.split()) for line in lines]
    singles = list(bytes_to_unicode().values())
    vocab = singles + [s + "</w>" for s in singles] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return transformers.CLIPTokenizer(vocab={v: i for i, v in enumerate(vocab)}, merges=merges)


def test_ids_equal_kerascv_on_the_catalogue_and_awkward_strings(kerascv, catalogue_texts):
    ours = T.clip_tokenizer()
    for text in catalogue_texts + AWKWARD + OPENAI_ONLY:
        assert ours.encode(text) == kerascv.encode(text), text


def test_ids_equal_transformers_on_the_catalogue_and_awkward_strings(hf, catalogue_texts):
    ours = T.clip_tokenizer()
    texts = catalogue_texts + AWKWARD
    for text, theirs in zip(texts, hf(texts).input_ids):
        assert ours.encode(text) == theirs, text


def test_start_and_end_tokens_and_a_known_caption():
    tok = T.clip_tokenizer()
    assert tok.encode("") == [T.START_TOKEN, T.END_TOKEN] == [tok.start_of_text, tok.end_of_text]
    # CLIP's ids for this caption, as KerasCV's and transformers' tokenizers give them
    assert tok.encode("a Men's Sweater") == [49406, 320, 1656, 568, 11455, 49407]
    assert len(tok.encoder) == 49408 and tok.encoder["!"] == 0 and tok.encoder["a</w>"] == 320
    assert tok.decode(tok.encode("An image of a 2011 Men's Sweater")[1:-1]) \
        == "an image of a 2 0 1 1 men 's sweater "


def test_decode_equals_kerascv(kerascv, catalogue_texts):
    ours = T.clip_tokenizer()
    for text in catalogue_texts[:10] + AWKWARD + OPENAI_ONLY:
        ids = ours.encode(text)
        assert ours.decode(ids) == kerascv.decode(ids), text


def test_pretokenizer_equals_clips_regex_on_every_code_point():
    """Each assigned code point between letters, digits and punctuation, lowercased as encode()
    does: CLIP's pattern (``regex`` package) and ours (stdlib ``re``) must split alike, so both
    class it alike. Code points Python's Unicode database leaves unassigned are left out
    (``regex`` may know newer ones)."""
    regex = pytest.importorskip("regex")
    import unicodedata

    clip = regex.compile(r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+"
                         r"|[\p{N}]|[^\s\p{L}\p{N}]+", regex.IGNORECASE)
    chars = [chr(c) for c in range(sys.maxunicode + 1)
             if unicodedata.category(chr(c)) not in ("Cn", "Cs")]
    text = " ".join(f"x{c}x 1{c}1 #{c}# '{c}" for c in chars).lower()
    assert T.pretokenizer().findall(text) == clip.findall(text)
    spaces = "".join(chars)
    assert regex.sub(r"\s+", " ", spaces) == T._WHITESPACE.sub(" ", spaces)


def test_token_upper_bound_bounds_the_count():
    tok = T.clip_tokenizer()
    for text in AWKWARD + OPENAI_ONLY + ["&nGt;" * 3, "é" * 10, "👗" * 5]:
        assert T.token_upper_bound(text) >= len(tok.encode(text)), text
    long = " ".join(["red"] * 80)
    assert T.over_limit([long, "a shoe"]) == {long: 82}


def test_tokenizing_imports_neither_tensorflow_nor_keras():
    code = ("import sys\n"
            "from fashion_sd.sd.tokenizer import clip_tokenizer\n"
            "assert clip_tokenizer().encode(\"an image of a 2011 Men's Sweater\")[-1] == 49407\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'tensorflow', 'keras',"
            " 'keras_cv', 'transformers', 'regex', 'jax', 'torch'}))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
