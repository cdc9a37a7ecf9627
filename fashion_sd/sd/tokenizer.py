"""CLIP's BPE tokenizer, our own, on the vocabulary shipped in the package: pure Python, no network.

``assets/bpe_simple_vocab_16e6.txt.gz`` is OpenAI CLIP's BPE vocabulary (MIT licence, see
``assets/LICENSE-CLIP``), byte for byte the file inside the ``open-clip-torch`` 3.3.0 wheel.

Why our own: KerasCV's ``SimpleTokenizer`` cannot be imported without TensorFlow (and downloads
this file from GitHub unless given a path); transformers' ``CLIPTokenizer`` needs transformers.
The package runs on Keras' JAX backend with neither, so :class:`ClipTokenizer` is OpenAI's
``simple_tokenizer.py`` written again with the standard library: HTML unescaping, whitespace
collapsed, lowercase, CLIP's pre-tokenizer, UTF-8 bytes as printable characters, then the file's
48,894 merges applied by rank, with ``</w>`` ending each word. Its ids equal
KerasCV's ``SimpleTokenizer(bpe_path=BPE_PATH).encode`` and transformers' ``CLIPTokenizer`` on the
same vocabulary (``tests/sd/test_tokenizer_bpe.py``: the demo captions and awkward strings), and
its pre-tokenizer equals CLIP's ``regex`` pattern on every code point Python's Unicode database
assigns. Like OpenAI's, it skips ftfy's text repair (KerasCV and transformers without ftfy do too).
"""

from __future__ import annotations

import functools
import gzip
import html
import re
import sys
import unicodedata
from pathlib import Path

import numpy as np

BPE_PATH = Path(__file__).parents[1] / "assets" / "bpe_simple_vocab_16e6.txt.gz"
BPE_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
MAX_LENGTH = 77  # CLIP's context: start token + 75 tokens + end token
START_TOKEN = 49406  # CLIP's <|startoftext|>
END_TOKEN = 49407  # CLIP's <|endoftext|>, which KerasCV also pads with
N_MERGES = 49152 - 256 - 2  # the file's lines 1..48894; vocabulary: 2 x 256 bytes, merges, 2
SPECIAL = ("<|startoftext|>", "<|endoftext|>")
END_OF_WORD = "</w>"
_CACHE_SIZE = 100_000  # pieces (words) whose ids are kept

# CLIP's whitespace is Unicode's White_Space, which Python's \s widens by \x1c-\x1f.
_WHITESPACE = re.compile(r"[^\S\x1c-\x1f]+")


@functools.lru_cache(maxsize=1)
def _other_numbers() -> str:
    r"""Unicode's numbers that are not decimal digits (categories Nl, No: '½', '²', 'Ⅻ'), as the
    inside of a character class.

    Python's ``\w`` counts them as word characters, CLIP's ``\p{N}`` as numbers, one per token.
    Written as 80 ranges, not 1,131 characters, which ``re`` would test one by one (8x slower).
    """
    numeric = filter(str.isnumeric, map(chr, range(sys.maxunicode + 1)))
    ranges: list[list[int]] = []
    for c in (ord(c) for c in numeric if unicodedata.category(c) in ("Nl", "No")):
        if ranges and ranges[-1][1] == c - 1:
            ranges[-1][1] = c
        else:
            ranges.append([c, c])
    return "".join(re.escape(chr(a)) + (f"-{re.escape(chr(b))}" if b > a else "")
                   for a, b in ranges)


@functools.lru_cache(maxsize=1)
def pretokenizer() -> re.Pattern:
    r"""CLIP's pre-tokenizer for lowercase text, with the standard library's ``re``; each match is
    BPE'd on its own.

    CLIP's pattern (``regex`` syntax) is ``<|startoftext|>|<|endoftext|>|'s|'t|'re|'ve|'m|'ll|'d|
    [\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+``, case-insensitive. ``re`` has no ``\p{..}``: letters are
    word characters that are neither digits, '_' nor other numbers, numbers are digits or other
    numbers, and the rest is what is neither space nor a word character, or is '_' or \x1c-\x1f.
    Text is lowercased first, so case is not ignored here (``re`` would then take U+0345, which
    folds to iota, for a letter and drop iota); what ignoring case changes in CLIP's on lowercase
    text is spelled out: "'s" also takes "'ſ" (long s) and U+0345 is in no class, so dropped.
    """
    n = _other_numbers()
    special = "|".join(re.escape(s) for s in SPECIAL)
    return re.compile(
        rf"{special}|'[sſ]|'t|'re|'ve|'m|'ll|'d|[^\W\d_{n}]+|\d|[{n}]"
        r"|(?:[^\s\w\u0345]|[_\x1c-\x1f])+"
    )


def clean(text: str) -> str:
    """CLIP's text cleaning: HTML entities unescaped (twice, as CLIP does), whitespace collapsed
    to one space and stripped, lowercase."""
    text = html.unescape(html.unescape(text)).strip()
    return _WHITESPACE.sub(" ", text).strip().lower()


@functools.lru_cache(maxsize=1)
def byte_symbols() -> tuple[str, ...]:
    """The printable character standing for each byte 0..255, as in OpenAI's ``bytes_to_unicode``.

    Printable Latin-1 bytes ('!'..'~', '¡'..'¬', '®'..'ÿ') stand for themselves; the other 68 take
    the characters from U+0100 on, in byte order, so no BPE symbol is whitespace or a control.
    """
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    moved = (b for b in range(256) if b not in kept)
    symbols = {b: chr(b) for b in kept} | {b: chr(256 + i) for i, b in enumerate(moved)}
    return tuple(symbols[b] for b in range(256))


def read_merges(path: Path = BPE_PATH) -> list[tuple[str, str]]:
    """The BPE merges in rank order: lines 1..48894 of the gzipped file (line 0 is a header)."""
    lines = gzip.decompress(path.read_bytes()).decode("utf-8").split("\n")[1: N_MERGES + 1]
    merges = [tuple(line.split()) for line in lines]
    bad = [i + 1 for i, m in enumerate(merges) if len(m) != 2]
    if len(merges) != N_MERGES or bad:
        raise ValueError(f"{path}: expected {N_MERGES} merges of two symbols after the header "
                         f"line, got {len(merges)} lines (malformed lines: {bad[:5]}); use the "
                         f"file shipped in fashion_sd/assets (sha256 {BPE_SHA256})")
    return merges


def _merge(word: tuple[str, ...], first: str, second: str) -> tuple[str, ...]:
    """``word`` with every adjacent (first, second) joined, left to right."""
    out, i = [], 0
    while i < len(word):
        if word[i] == first and i + 1 < len(word) and word[i + 1] == second:
            out.append(first + second)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


class ClipTokenizer:
    """CLIP's BPE tokenizer: text to the ids of CLIP's 49,408-token vocabulary.

    Args:
        bpe_path: the gzipped merges file; the one shipped in the package by default.

    Example:
        >>> tok = ClipTokenizer()
        >>> tok.encode("a Men's Sweater")
        [49406, 320, 1656, 568, 11455, 49407]
        >>> tok.decode(tok.encode("a Men's Sweater")[1:-1])
        "a men 's sweater "
    """

    def __init__(self, bpe_path: Path | str = BPE_PATH):
        merges = read_merges(Path(bpe_path))
        symbols = byte_symbols()
        # OpenAI lists the byte symbols as its table holds them, printable bytes first: that is
        # code point order, not byte order ('!' is id 0).
        singles = sorted(symbols)
        vocab = [*singles, *(s + END_OF_WORD for s in singles), *("".join(m) for m in merges),
                 *SPECIAL]
        self.encoder = {token: i for i, token in enumerate(vocab)}
        self.decoder = vocab
        self.bpe_ranks = {m: rank for rank, m in enumerate(merges)}
        self.byte_encoder = symbols
        self.byte_decoder = {s: b for b, s in enumerate(symbols)}
        self.pattern = pretokenizer()
        self._ids = {s: [self.encoder[s]] for s in SPECIAL}  # piece -> ids, filled as words come

    @property
    def start_of_text(self) -> int:
        return self.encoder[SPECIAL[0]]

    @property
    def end_of_text(self) -> int:
        return self.encoder[SPECIAL[1]]

    def bpe(self, piece: str) -> tuple[str, ...]:
        """The BPE tokens of one pre-token (already as byte symbols), the last ending in ``</w>``.

        The lowest-ranked adjacent pair is merged everywhere until no adjacent pair is a merge.
        """
        word = (*piece[:-1], piece[-1] + END_OF_WORD)
        while len(word) > 1:
            pair = min(zip(word, word[1:]), key=lambda p: self.bpe_ranks.get(p, N_MERGES))
            if pair not in self.bpe_ranks:
                break
            word = _merge(word, *pair)
        return word

    def _piece_ids(self, piece: str) -> list[int]:
        ids = self._ids.get(piece)
        if ids is None:
            symbols = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids = [self.encoder[t] for t in self.bpe(symbols)]
            if len(self._ids) < _CACHE_SIZE:  # a server's prompts must not grow it without end
                self._ids[piece] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """CLIP's token ids of ``text``, with the start and end tokens, not padded or truncated."""
        ids = [self.start_of_text]
        for piece in self.pattern.findall(clean(text)):
            ids += self._piece_ids(piece)
        ids.append(self.end_of_text)
        return ids

    def decode(self, ids) -> str:
        """The text of ``ids``: lowercase and cleaned, each word followed by a space."""
        data = bytes(self.byte_decoder[s] for s in "".join(self.decoder[i] for i in ids))
        return data.decode("utf-8", errors="replace").replace(END_OF_WORD, " ")


@functools.lru_cache(maxsize=1)
def clip_tokenizer() -> ClipTokenizer:
    """The shared :class:`ClipTokenizer` on the shipped vocabulary, built once (about 0.3 s)."""
    return ClipTokenizer(BPE_PATH)


def token_upper_bound(text: str) -> int:
    """An upper bound of CLIP's token count for ``text``, start and end tokens included.

    Cheap, with no BPE: BPE merges byte symbols, so a pre-token never yields more tokens than its
    UTF-8 bytes ('é' is two). Only texts above the limit by this bound need the real tokenizer.
    """
    return 2 + sum(len(p.encode("utf-8")) for p in pretokenizer().findall(clean(text)))


def token_count(text: str) -> int:
    """CLIP's exact token count for ``text``, start and end tokens included."""
    return len(clip_tokenizer().encode(text))  # encode() adds the start and end tokens


def over_limit(texts, max_length: int = MAX_LENGTH) -> dict[str, int]:
    """The texts CLIP would truncate at ``max_length`` tokens, with their token counts."""
    out = {}
    for text in set(texts):
        if token_upper_bound(text) > max_length:
            n = token_count(text)
            if n > max_length:
                out[text] = n
    return out


def tokenize(captions: list[str], tokenizer) -> tuple[np.ndarray, list[str]]:
    """CLIP token ids, (n, 77) int32, padded with the end token as KerasCV's sampler does.

    Captions over 77 tokens are truncated (keeping the end token) and returned as the second value.
    """
    out = np.full((len(captions), MAX_LENGTH), END_TOKEN, dtype=np.int32)
    truncated = []
    for i, text in enumerate(captions):
        ids = tokenizer.encode(text)
        if len(ids) > MAX_LENGTH:
            truncated.append(text)
            ids = ids[: MAX_LENGTH - 1] + [END_TOKEN]
        out[i, : len(ids)] = ids
    return out, truncated
