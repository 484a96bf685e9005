"""Text -> token ids with a model's own ``tokenizer.json`` (Hugging Face ``tokenizers``; no torch).

The same class tokenizes calibration text at build time and request text in the server, so
a tier is calibrated on exactly the ids it is served with. The file's own padding and
truncation settings are replaced: padding is to the longest text of the call (a batch is
padded again, to its longest request, when the server forms it) and truncation is at
``max_length`` tokens, special tokens included.

Example:
    >>> tok = TextTokenizer("models/minilm/tokenizer.json", max_length=256)  # doctest: +SKIP
    >>> ids, mask = tok.encode(["a short sentence", "another"])  # doctest: +SKIP
    >>> ids.shape, ids.dtype  # doctest: +SKIP
    ((2, 5), dtype('int64'))
    >>> tok.encode_rows(["a short sentence", "a long document ..."]).truncated  # doctest: +SKIP
    {1: 412}
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np


def read_sentences(
    path: str | Path, limit: int | None = None, max_chars: int | None = None
) -> list[str]:
    """The non-empty lines of a UTF-8 text file (one sentence per line), ends stripped; the
    first ``limit`` of them, each cut at ``max_chars`` characters. What ``innfer calibrate
    --text``, ``innfer report --text`` and the build's ``evaluation.text`` read.

    ``max_chars``: a bound far above what ``max_length`` tokens can span (``text_chars``),
    so that the ids do not change: the tokenizer builds every overflowing piece of a line to
    count what truncation drops, and one 12.6 MB line took 14.6 s and 1.2 GB to keep 24
    tokens. ValueError, naming the file, for bytes that are not UTF-8.

    Example:
        >>> read_sentences("calibration.txt", limit=3000, max_chars=32768)  # doctest: +SKIP
        ['A first sentence.', 'Another one.', ...]
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"{path} is not UTF-8 text (byte {exc.start}: {exc.reason}); save it as UTF-8, "
            "one sentence per line"
        ) from None
    lines = (ln.strip() for ln in text.splitlines())
    return [ln[:max_chars] for ln in lines if ln][:limit]


def text_chars(max_length: int) -> int:
    """Characters kept of a text line read for ``max_length`` tokens: 128 per token, past
    any real text's tokens (a WordPiece token spans at most 100 characters: longer words
    become one [UNK])."""
    return 128 * max_length


class TokenizerError(ValueError):
    """The tokenizer file is missing or unreadable, or a text cannot be tokenized."""


class Encoded(NamedTuple):
    """``TextTokenizer.encode_rows``: ids and mask, int64 (rows, longest), and the rows cut
    at ``max_length``, each with its token count before the cut (special tokens included)."""

    ids: np.ndarray
    mask: np.ndarray
    truncated: dict[int, int]


class TextTokenizer:
    """``tokenizer.json`` with truncation at ``max_length`` and no padding of its own."""

    def __init__(self, path: str | Path, max_length: int, sha256: str | None = None) -> None:
        try:
            from tokenizers import Tokenizer
        except ImportError as exc:  # pragma: no cover - a declared dependency
            raise TokenizerError(
                "text inputs need the 'tokenizers' package: pip install tokenizers"
            ) from exc
        if max_length < 2:
            raise TokenizerError(
                f"max_length must be >= 2 (room for [CLS] and [SEP]), got {max_length}"
            )
        self.path = Path(path)
        self.max_length = max_length
        # The file's hash as the caller checked it (a served model's, against its build
        # record): what identifies its encoding - a reload may bring another file at the
        # same path (DataPlane._successor). None: nobody asked.
        self.sha256 = sha256
        try:
            self._tok = Tokenizer.from_file(str(self.path))
        except Exception as exc:  # tokenizers raises plain Exception on bad files
            raise TokenizerError(f"cannot read tokenizer {self.path}: {exc}") from None
        self._tok.no_padding()
        self._tok.enable_truncation(max_length)
        self._specials = self._tok.num_special_tokens_to_add(is_pair=False)  # [CLS], [SEP]
        # One more than the largest id it can produce: ids a client sends itself must be
        # below it (an id past the model's embedding table fails inside the engine).
        self.vocab_size = max(self._tok.get_vocab(with_added_tokens=True).values()) + 1

    def lengths(self, texts: Sequence[str]) -> list[int]:
        """Token count of each text after truncation (what the model will run on)."""
        return [len(e.ids) for e in self._tok.encode_batch(list(texts))]

    def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(input_ids, attention_mask)``, each int64 of shape (len(texts), longest): ids
        padded with 0 and mask 0 after each text's own tokens."""
        ids, mask, _ = self.encode_rows(texts)
        return ids, mask

    def encode_rows(self, texts: Sequence[str]) -> Encoded:
        """``encode``, and which rows were truncated at ``max_length`` (a client is told:
        the server's ``truncated_rows``, or an error with ``truncate=false``)."""
        if not texts:
            raise TokenizerError("no texts to tokenize")
        try:
            encodings = self._tok.encode_batch(list(texts))
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # a panic in the library's Rust code arrives as
            # pyo3's PanicException, a BaseException: on a tokenizer thread it ended the
            # thread and left the request unanswered (review 166)
            raise TokenizerError(
                f"the tokenizer failed on these texts ({type(exc).__name__}: {exc})"
            ) from None
        longest = max(len(e.ids) for e in encodings)
        ids = np.zeros((len(texts), longest), np.int64)
        mask = np.zeros((len(texts), longest), np.int64)
        truncated = {}
        for i, e in enumerate(encodings):
            ids[i, : len(e.ids)] = e.ids
            mask[i, : len(e.ids)] = 1
            if e.overflowing:  # the rest, in pieces of max_length with their own specials
                extra = sum(len(o.ids) - self._specials for o in e.overflowing)
                truncated[i] = len(e.ids) + extra
        return Encoded(ids, mask, truncated)
