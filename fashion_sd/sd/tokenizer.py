"""CLIP's tokenizer with the vocabulary shipped in the package, so tokenizing never needs a network.

``assets/bpe_simple_vocab_16e6.txt.gz`` is OpenAI CLIP's BPE vocabulary (MIT licence, see
``assets/LICENSE-CLIP``), byte for byte the file inside the ``open-clip-torch`` 3.3.0 wheel.
KerasCV's ``SimpleTokenizer()`` would download it from GitHub at construction.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import numpy as np

BPE_PATH = Path(__file__).parents[1] / "assets" / "bpe_simple_vocab_16e6.txt.gz"
BPE_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
MAX_LENGTH = 77  # CLIP's context: start token + 75 tokens + end token
END_TOKEN = 49407  # CLIP's <|endoftext|>, which KerasCV also pads with

# CLIP's pre-tokenizer: each match becomes one or more BPE tokens, never more than its characters.
_PRETOKEN = re.compile(
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|[^\s\w]+", re.UNICODE
)


@functools.lru_cache(maxsize=1)
def clip_tokenizer():
    """KerasCV's ``SimpleTokenizer`` on the shipped vocabulary (imports TensorFlow)."""
    from keras_cv.models.stable_diffusion import SimpleTokenizer

    return SimpleTokenizer(bpe_path=str(BPE_PATH))


def token_upper_bound(text: str) -> int:
    """An upper bound of CLIP's token count for ``text``, start and end tokens included.

    Pure Python and cheap: BPE merges characters, so a pre-token never yields more tokens than it
    has characters. Only texts above the limit by this bound need the real tokenizer.
    """
    return 2 + sum(len(m) for m in _PRETOKEN.findall(text.lower()))


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
