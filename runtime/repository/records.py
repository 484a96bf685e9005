"""``tiers/<tier>/tier.json``: what the build recorded about one tier. No torch.

Example:
    >>> rec = TierRecord.read(Path("repo/mnist/tiers/w050/tier.json"))  # doctest: +SKIP
    >>> rec.width, rec.accuracy  # doctest: +SKIP
    (0.5, 0.97)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from runtime.atomic import write_json
from runtime.repository.errors import RepositoryError

log = logging.getLogger("innfer.repository")

# The layout of the repository's JSON records (tier.json, frontier.json, auto_tiers.json)
# this innfer reads. A record without a ``format`` key is format 1; one innfer writes a
# higher number only where a record's meaning changes, so that an older innfer refuses it
# by name rather than misreading it. Fields added within a format are ignored by an innfer
# that does not know them (``known_fields``): an older replica or a rollback keeps serving
# a repository a newer build touched, where it called every such record corrupted.
RECORD_FORMAT = 1


def known_fields(cls, data: dict, path: Path) -> dict:
    """``data`` (a record read from ``path``) cut to the fields of dataclass ``cls``: an
    unknown one - written by a newer innfer - is ignored, with a warning that names it.
    Raises ``RepositoryError`` for a ``format`` past ``RECORD_FORMAT``.

    Example:
        >>> @dataclass
        ... class R:
        ...     a: int
        >>> known_fields(R, {"a": 1, "b": 2}, Path("r.json"))
        {'a': 1}
        >>> known_fields(R, {}, Path("r.json"))
        Traceback (most recent call last):
        ...
        ValueError: it has no a
    """
    if not isinstance(data, dict):
        raise TypeError(f"a JSON object expected, got {type(data).__name__}")
    data = dict(data)
    fmt = data.pop("format", 1)
    if not isinstance(fmt, int) or isinstance(fmt, bool) or fmt < 1:
        raise ValueError(f"format is {fmt!r}, not a format number")
    if fmt > RECORD_FORMAT:
        raise RepositoryError(
            f"{path} was written by a newer innfer (record format {fmt}; this one reads up "
            f"to {RECORD_FORMAT}): serve it with that version, or rebuild it with this one "
            "(`innfer build`)"
        )
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(k for k in data if k not in names)
    if unknown:  # (once: a frontier's candidates share them)
        warn_once(f"{path}: fields {', '.join(unknown)} are unknown to this innfer (written "
                  "by a newer one?) and ignored")  # fmt: skip
        data = {k: v for k, v in data.items() if k in names}
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in data
               and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]  # fmt: skip
    if missing:  # (it read "ActiveTiers.__init__() missing 1 required positional argument:
        # 'reason'", a Python internal: review helper-228)
        raise ValueError(f"it has no {', '.join(missing)}")
    return data


_said: set[str] = set()


def warn_once(message: str) -> None:
    """Log ``message`` once per process: what is said about the repository's files at the
    first load (auto-tiering reads the frontier again at every check)."""
    if message not in _said:
        _said.add(message)
        log.warning("%s", message)


TIER_FILE = "tier.json"

# The ids an integer input may hold: the rows of the table it indexes (every id), or per
# column of its last dim (``ids[:, k]`` into a table per column; None: a column no table
# reads directly, unchecked).
Rows = int | list[int | None]


def rows_problem(rows: Any) -> str | None:
    """Why ``rows`` (an input -> ``Rows`` dict) is not a record of table rows; None if it is.

    Example:
        >>> rows_problem({"ids": 50}), rows_problem({"ids": [20, None, 50]})
        (None, None)
        >>> rows_problem({"ids": [None]})
        "input_rows is {'ids': [None]}, not table rows per input (or per column)"
    """

    def count(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v > 0

    def ok(v) -> bool:
        if isinstance(v, list):
            return any(count(c) for c in v) and all(c is None or count(c) for c in v)
        return count(v)

    if isinstance(rows, dict) and all(isinstance(k, str) and ok(v) for k, v in rows.items()):
        return None
    return f"input_rows is {rows!r}, not table rows per input (or per column)"


def merge_rows(a: Rows, b: Rows) -> Rows:
    """The ids both bounds allow: the smaller rows, per column where either is per column
    (an int bounds every column; None leaves a column to the other).

    Example:
        >>> merge_rows(50, 40), merge_rows([20, None], [30, 50]), merge_rows(25, [20, None])
        (40, [20, 50], [20, 25])
    """
    if isinstance(a, int) and isinstance(b, int):
        return min(a, b)
    if isinstance(a, int):
        a, b = b, a
    cols = list(a)
    other = b if isinstance(b, list) else [b] * len(cols)
    if len(other) != len(cols):  # tiers of one model read one shape; keep the first's
        return cols
    return [
        y if x is None else x if y is None else min(x, y) for x, y in zip(cols, other, strict=True)
    ]


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
    # The INN's network beside its weights (``inn_structure``: architecture, groups, sizes):
    # the same weights under another forward (relu -> tanh) or other groups kept the old
    # tiers, built and served (review 198). None: built before this was kept.
    inn_structure_sha256: str | None = None
    # Rows of the embedding table each integer input indexes (runtime.build.export.
    # embedding_rows), or per column of its last dim (``Rows``): the server refuses ids
    # outside [0, rows) as INVALID_ARGUMENT, where the engine failed the whole batch. None:
    # no such input (no key in tier.json).
    input_rows: dict[str, Rows] | None = None
    # The model.yaml settings it was sampled with (``sampling_of``): a server refuses a tier
    # whose model.yaml says otherwise since - served silently at the old channel counts, as
    # a changed width is not (review 157). None: built before this was kept.
    sampling: dict[str, Any] | None = None

    @classmethod
    def read(cls, path: Path) -> TierRecord:
        try:
            data = json.loads(path.read_text())
            record = cls(**known_fields(cls, data, path))
        except FileNotFoundError:
            raise RepositoryError(f"{path} is missing: run `innfer build` for this model") from None
        except (ValueError, TypeError, RecursionError) as exc:  # bad JSON, not UTF-8, fields
            raise RepositoryError(f"{path} is corrupted ({exc}): run `innfer build`") from exc
        problem = record._problem()
        if problem is not None:  # valid JSON, a wrong value inside (a hand edit)
            raise RepositoryError(f"{path} is corrupted ({problem}): run `innfer build`")
        return record

    def _problem(self) -> str | None:
        """What is wrong with a field's type, if anything: read by the scheduler (flops,
        accuracy) and the cache (hashes), a wrong one failed far from the file."""
        if not isinstance(self.source_sha256, str):
            return f"source_sha256 is {self.source_sha256!r}, not a string"
        if self.sampling is not None and not isinstance(self.sampling, dict):
            return f"sampling is {self.sampling!r}, not a mapping"
        return fields_problem(self)

    def sampling_change(self, config: Any) -> str | None:
        """How ``config`` (a ModelConfig) samples this tier differently from its build, as
        "multiple_of 1, but now 8"; None where nothing changed or nothing was recorded."""
        if self.sampling is None:
            return None
        for key, now in sampling_of(config).items():
            if key in self.sampling and self.sampling[key] != now:
                return f"{key} {self.sampling[key]!r}, but now {now!r}"
        return None

    def write(self, path: Path) -> None:
        data = dict(self.__dict__)
        for optional in ("channel_search", "accuracy_on", "inn_sha256", "inn_structure_sha256",
                         "input_rows", "sampling"):  # fmt: skip
            if data[optional] is None:
                del data[optional]
        write_json(path, data)


def sampling_of(config: Any) -> dict[str, Any]:
    """The settings of ``config`` (a ModelConfig) a tier's channels and weights are sampled
    with, beside its width: how counts are rounded and sampled, and the data set its norm
    statistics are re-estimated on (by name; runtime/build/sampling.py).

    Example:
        >>> from types import SimpleNamespace as C
        >>> sampling_of(C(method="auto", multiple_of=8, evaluation=None))
        {'method': 'auto', 'multiple_of': 8, 'norm_from': None}
    """
    evaluation = config.evaluation
    return {
        "method": config.method,
        "multiple_of": config.multiple_of,
        "norm_from": evaluation.dataset if evaluation is not None else None,
    }


def _number(v: Any) -> bool:
    """A finite int or float (JSON reads NaN and Infinity too: no count nor score)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def fields_problem(record: Any) -> str | None:
    """What is wrong with the fields a built tier and a frontier candidate share (``name``,
    ``width``, ``sizes``, ``flops``, ``params``, ``accuracy``, ``onnx_sha256``,
    ``input_rows``), if anything: the scheduler ranks by accuracy and FLOPs, the cache
    keys by the hash, and a wrong type failed far from the file.

    Example:
        >>> from types import SimpleNamespace as R
        >>> fields_problem(R(name="w050", width=0.5, sizes={"a": 4}, flops=10, params=2,
        ...                  accuracy=97.5, onnx_sha256="ab", input_rows=None))
        'accuracy is 97.5, not a score in [-1, 1]'
    """
    for key in ("name", "onnx_sha256"):
        if not isinstance(getattr(record, key), str):
            return f"{key} is {getattr(record, key)!r}, not a string"
    for key in ("flops", "params"):
        v = getattr(record, key)
        if not _number(v) or v < 0:
            return f"{key} is {v!r}, not a count"
    # A top-1 accuracy, a mIoU or an embedding fidelity (a cosine): 97.5, a percentage,
    # outranked every fraction.
    accuracy = record.accuracy
    if accuracy is not None and not (_number(accuracy) and -1 <= accuracy <= 1):
        return f"accuracy is {accuracy!r}, not a score in [-1, 1]"
    if not _is_width(record.width):
        return f"width is {record.width!r}, not a fraction in (0, 1] nor a mapping of groups"
    sizes = record.sizes
    if not isinstance(sizes, dict) or not all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v > 0
        for k, v in sizes.items()
    ):
        return f"sizes is {sizes!r}, not channel counts per group"
    if record.input_rows is not None:
        return rows_problem(record.input_rows)
    return None


def _is_width(v: Any) -> bool:
    """A width as model.yaml gives it: a fraction in (0, 1], or a mapping of group (or kind)
    names to channel counts or fractions (and ``shaped: true|false``)."""
    if isinstance(v, dict):
        return all(isinstance(k, str) and (isinstance(n, bool) or _number(n)) for k, n in v.items())
    return _number(v) and 0 < v <= 1


class InnPrint(NamedTuple):
    """An INN's two fingerprints, as tiers and frontiers record them."""

    weights: str  # ``inn_fingerprint``
    structure: str  # ``inn_structure``

    @classmethod
    def of(cls, meta: dict[str, Any]) -> InnPrint:
        return cls(inn_fingerprint(meta), inn_structure(meta))


# What of inn.json makes the network beside its weights: the traced architecture, the
# groups and what they bind, the tensors' shapes, and the info sampling reads (folded norms,
# the sampling norm statistics were measured on, the sensitivity curves shaped tiers
# follow). Records (sources, seeds, timings, calibration reports) are left out.
_STRUCTURE = ("shapes", "architecture", "groups", "bindings", "size_fields")
_STRUCTURE_INFO = ("folded_norms", "frontend", "norm_stats_sampling", "sensitivity")


def inn_structure(meta: dict[str, Any]) -> str:
    """The hash of an INN's network beside its weights (``inn.json``'s ``meta``): the
    channel ordering is decided from the weights alone, so the same weights converted under
    another forward (relu -> tanh) or with other groups (``discrete=``, ``permute=False``)
    have the same ``weights_sha256``, and their old tiers were built and served as current
    (review 198). KeyError where ``meta`` is not an INN's.

    Example:
        >>> m = {k: {} for k in _STRUCTURE} | {"info": {"seed": 1}}
        >>> inn_structure(m) == inn_structure(m | {"info": {"seed": 2}})  # a record only
        True
        >>> inn_structure(m) == inn_structure(m | {"architecture": {"act": "tanh"}})
        False
        >>> inn_structure(m) == inn_structure(m | {"info": {"norm_stats_sampling": {}}})
        True
    """
    info = meta.get("info") or {}
    # an empty entry is an absent one: a calibration that kept every width wrote
    # ``norm_stats_sampling: {}`` where none was, and its tiers read as another network's
    # (review 201)
    kept = {k: info.get(k) or None for k in _STRUCTURE_INFO}
    payload = {k: meta[k] for k in _STRUCTURE} | {"info": kept}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=list).encode()).hexdigest()


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
