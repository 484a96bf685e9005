"""A tiny sentence embedder for the text-serving tests: a BERT-style encoder (the one
tests/test_capture.py converts) with mean pooling and L2 normalisation, a word-level
``tokenizer.json`` written with the ``tokenizers`` library, and a model repository built
from them with ``innfer build``'s pipeline. No transformers needed; about 10 s to build.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from test_capture import TinyBert
from torch import nn

import runtime
from runtime.build.pipeline import add_model, build_model
from runtime.repository import Repository

WORDS = ["the", "a", "model", "serves", "text", "fast", "small", "large", "tiers", "budget",
         "token", "cafe", "naive", "elastic", "width", "heads", "network", "sentence",
         "embedding", "server", "request"]  # fmt: skip
MAX_LENGTH = 24  # the position table of TinyBert holds 32
LENGTHS = [8, 16, 24]


class TinyEmbedder(nn.Module):
    """(input_ids, attention_mask) (B, T) int64 -> (B, 16) unit-norm mean-pooled embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = TinyBert(vocab=len(WORDS) + 5)

    def forward(self, input_ids, attention_mask):
        h = self.encoder(input_ids, attention_mask)  # (B, T, 16)
        m = attention_mask.unsqueeze(-1).to(h.dtype)  # (B, T, 1)
        return F.normalize((h * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1)


def write_tokenizer(path: Path) -> Path:
    """A word-level tokenizer: lowercase, accents stripped, [CLS] text [SEP], [UNK] for
    words it does not know; ids 0-4 are the special tokens ([PAD] = 0)."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {w: i for i, w in enumerate([*specials, *WORDS])}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tok.save(str(path))
    return path


def model_yaml() -> dict:
    return {
        "inputs": [
            {"name": "input_ids", "dtype": "int64", "shape": [-1]},
            {"name": "attention_mask", "dtype": "int64", "shape": [-1]},
        ],
        "outputs": [{"name": "embedding", "dtype": "float32", "shape": [16]}],
        "tiers": [
            {"name": "full", "width": 1.0},
            {"name": "half", "width": {"heads": 0.5, "ffn": 0.5}},
        ],
        "text": {"max_length": MAX_LENGTH},
        "lengths": LENGTHS,
        "max_batch": 4,
        "default_latency_budget_ms": 1000,
    }


def build_text_repository(root: Path, name: str = "embed") -> tuple[Path, nn.Module]:
    """Convert TinyEmbedder, write it with its tokenizer into ``root/name`` and build its
    tiers (ONNX Runtime). Returns the model directory and the source module."""
    torch.manual_seed(0)
    model = TinyEmbedder().eval()
    ids, mask = torch.randint(0, 20, (2, 7)), torch.ones(2, 7, dtype=torch.long)
    inn = runtime.convert(model, (ids, mask))
    d = add_model(root, name, inn, model_yaml())
    tok = write_tokenizer(root / "tokenizer.tmp.json")
    shutil.move(tok, d / "tokenizer.json")
    build_model(Repository(root), name, progress=False, repeats=5)
    return d, model
