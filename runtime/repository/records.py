"""``tiers/<tier>/tier.json``: what the build recorded about one tier. No torch.

Example:
    >>> rec = TierRecord.read(Path("repo/mnist/tiers/w050/tier.json"))  # doctest: +SKIP
    >>> rec.width, rec.accuracy  # doctest: +SKIP
    (0.5, 0.97)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.atomic import write_json
from runtime.repository.errors import RepositoryError

TIER_FILE = "tier.json"


@dataclass(frozen=True)
class TierRecord:
    """What the build recorded about one tier (``tiers/<tier>/tier.json``)."""

    name: str
    width: Any
    sizes: dict[str, int]
    onnx_sha256: str
    source_sha256: str  # hash of what the tier was sampled from (INN weights + sampling args)
    flops: int
    params: int
    accuracy: float | None = None
    # The build's channel search (runtime/build/channels.py): candidates, timings, the choice.
    # None when model.yaml has no channel_search; then tier.json has no such key, as before.
    channel_search: dict[str, Any] | None = None
    # What ``accuracy`` was measured on (runtime.build.pipeline.evaluation_key): another
    # evaluation set, or an edited file, is scored again. None: no key in tier.json.
    accuracy_on: str | None = None
    # The INN it was sampled from (``inn_fingerprint`` of inn.json: weights, grids, norm
    # statistics): a server refuses a tier whose INN was replaced, retrained or recalibrated
    # since. None: built before this was kept.
    inn_sha256: str | None = None

    @classmethod
    def read(cls, path: Path) -> TierRecord:
        try:
            data = json.loads(path.read_text())
            return cls(**data)
        except FileNotFoundError:
            raise RepositoryError(f"{path} is missing: run `innfer build` for this model") from None
        except (ValueError, TypeError) as exc:  # bad JSON, bytes that are not UTF-8, fields
            raise RepositoryError(f"{path} is corrupted ({exc}): run `innfer build`") from exc

    def write(self, path: Path) -> None:
        data = dict(self.__dict__)
        for optional in ("channel_search", "accuracy_on", "inn_sha256"):
            if data[optional] is None:
                del data[optional]
        write_json(path, data)


def inn_fingerprint(meta: dict[str, Any]) -> str:
    """What a tier sampled from an INN depends on in its ``inn.json`` (``meta``): the
    weights' hash (calibrated tiers' weights included), the grids and the stored norm
    statistics - recalibration may change only the last two. KeyError/TypeError where
    ``meta`` is not an INN's.

    Example:
        >>> a = inn_fingerprint({"weights_sha256": "ab", "info": {"grids": {"g": [0.5]}}})
        >>> a == inn_fingerprint({"weights_sha256": "ab", "info": {}})
        False
    """
    info = meta.get("info") or {}
    payload = {
        "weights": meta["weights_sha256"],
        "grids": info.get("grids", {}),
        "norm_stats": info.get("norm_stats", {}),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=list).encode()).hexdigest()
