"""``model.yaml``: validated config classes for one model in a repository. No torch.

Every field is checked where it is read; an error names the file, the field path, the value
and what is allowed:

    models/mnist/model.yaml: tiers[1].width: got 1.5, expected a number in (0, 1]
      or a mapping {group: channels}

Example ``model.yaml``:

    inputs:
      - {name: input, dtype: float32, shape: [1, 28, 28]}   # per sample; batch is axis 0
    outputs:
      - {name: logits, dtype: float32, shape: [10]}
    tiers:                       # largest first is conventional, not required
      - {name: w100, width: 1.0}
      - {name: w050, width: 0.5}
    backends: [onnxruntime]      # preference order; the first available one is used
    precision: fp32
    max_batch: 8
    default_latency_budget_ms: 50
    multiple_of: 8               # round channel counts (vector lanes); 16 for tensor cores
    threads: 2                   # ONNX Runtime intra-op threads per engine

Example:
    >>> cfg = ModelConfig.from_dict({"inputs": [{"name": "x", "dtype": "float32",
    ...     "shape": [4]}], "outputs": [{"name": "y", "dtype": "float32", "shape": [2]}],
    ...     "tiers": [{"name": "w100", "width": 1.0}]}, source="model.yaml")
    >>> cfg.tiers[0].name, cfg.max_batch
    ('w100', 8)
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DTYPES = ("float32", "float16", "int64", "int32", "uint8", "bool")
PRECISIONS = ("fp32", "fp16")
BACKEND_NAMES = ("onnxruntime", "tensorrt", "torch")
METHODS = ("auto", "point", "cell")
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,63}$")


class ConfigError(ValueError):
    """A config file or value is invalid; the message says where and what is allowed."""


@dataclass(frozen=True)
class TensorConfig:
    """A model input or output: name, dtype and per-sample shape (batch axis excluded)."""

    name: str
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class TierConfig:
    """A size tier: a name clients can ask for and a width (fraction or {group: channels})."""

    name: str
    width: float | dict[str, int]


@dataclass(frozen=True)
class EvaluationConfig:
    """Optional: the data set whose test split measures each tier's accuracy at build time."""

    dataset: str
    limit: int = 1000  # samples evaluated per tier (build time grows with it)


@dataclass(frozen=True)
class ModelConfig:
    """One model's ``model.yaml``."""

    inputs: tuple[TensorConfig, ...]
    outputs: tuple[TensorConfig, ...]
    tiers: tuple[TierConfig, ...]
    backends: tuple[str, ...] = ("onnxruntime",)
    precision: str = "fp32"
    max_batch: int = 8
    default_latency_budget_ms: float = 100.0
    multiple_of: int = 1
    method: str = "auto"
    threads: int = 1
    max_queue: int = 256
    evaluation: EvaluationConfig | None = None
    name: str = ""
    source: str = field(default="", compare=False)

    @property
    def batch_sizes(self) -> tuple[int, ...]:
        """Profiled batch sizes: 1, 2, 4, ... up to and including ``max_batch``."""
        sizes, b = [], 1
        while b < self.max_batch:
            sizes.append(b)
            b *= 2
        return (*sizes, self.max_batch)

    def tier(self, name: str) -> TierConfig:
        for t in self.tiers:
            if t.name == name:
                return t
        raise KeyError(name)

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        """Read and validate ``path``; the model name defaults to its directory's name."""
        path = Path(path)
        data = read_yaml(path)
        data = {"name": path.parent.name, **(data or {})} if isinstance(data, dict) else data
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: Any, source: str = "<config>") -> ModelConfig:
        r = _Reader(source)
        if not isinstance(data, dict):
            r.fail("", data, "a mapping of fields")
        known = {f for f in cls.__dataclass_fields__ if f != "source"}
        for key in data:
            if key not in known:
                r.fail(key, data[key], f"a known field ({', '.join(sorted(known))})")
        inputs = tuple(r.tensor(f"inputs[{i}]", v) for i, v in enumerate(r.list(data, "inputs")))
        outputs = tuple(r.tensor(f"outputs[{i}]", v) for i, v in enumerate(r.list(data, "outputs")))
        tiers = tuple(r.tier(f"tiers[{i}]", v) for i, v in enumerate(r.list(data, "tiers")))
        for what, items in (("inputs", inputs), ("outputs", outputs), ("tiers", tiers)):
            names = [x.name for x in items]
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                r.fail(what, dup, "unique names")
        backends = tuple(data.get("backends", ("onnxruntime",)))
        for i, b in enumerate(backends):
            if b not in BACKEND_NAMES:
                r.fail(f"backends[{i}]", b, f"one of {', '.join(BACKEND_NAMES)}")
        if not backends:
            r.fail("backends", [], "at least one backend")
        evaluation = data.get("evaluation")
        if evaluation is not None:
            if not isinstance(evaluation, dict) or "dataset" not in evaluation:
                r.fail("evaluation", evaluation, "a mapping with 'dataset' (and optional 'limit')")
            evaluation = EvaluationConfig(
                dataset=r.str_(evaluation, "dataset", "evaluation."),
                limit=r.int_(evaluation, "limit", 1000, 1, 10**7, "evaluation."),
            )
        return cls(
            inputs=inputs,
            outputs=outputs,
            tiers=tiers,
            backends=backends,
            precision=r.choice(data, "precision", "fp32", PRECISIONS),
            max_batch=r.int_(data, "max_batch", 8, 1, 4096),
            default_latency_budget_ms=r.float_(data, "default_latency_budget_ms", 100.0),
            multiple_of=r.int_(data, "multiple_of", 1, 1, 256),
            method=r.choice(data, "method", "auto", METHODS),
            threads=r.int_(data, "threads", 1, 1, 256),
            max_queue=r.int_(data, "max_queue", 256, 1, 10**6),
            evaluation=evaluation,
            name=str(data.get("name", "")),
            source=source,
        )


def read_yaml(path: Path) -> Any:
    """Parse a YAML file; a missing file or a syntax error is a ConfigError naming it."""
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc


class _Reader:
    """Reads fields with one error style: '<source>: <field>: got <value>, expected <what>'."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, where: str, value: Any, expected: str):
        loc = f"{self.source}: {where}: " if where else f"{self.source}: "
        raise ConfigError(f"{loc}got {value!r}, expected {expected}")

    def list(self, data: dict, key: str) -> list:
        if key not in data:
            self.fail(key, None, "a non-empty list (this field is required)")
        v = data[key]
        if not isinstance(v, list) or not v:
            self.fail(key, v, "a non-empty list")
        return v

    def name(self, where: str, v: Any) -> str:
        if not isinstance(v, str) or not _NAME.match(v):
            self.fail(where, v, "a name of letters, digits, '_', '.', '-' (at most 64)")
        return v

    def tensor(self, where: str, v: Any) -> TensorConfig:
        if not isinstance(v, dict):
            self.fail(where, v, "a mapping with name, dtype, shape")
        extra = set(v) - {"name", "dtype", "shape"}
        if extra:
            self.fail(f"{where}.{sorted(extra)[0]}", v[sorted(extra)[0]], "name, dtype or shape")
        name = self.name(f"{where}.name", v.get("name"))
        dtype = v.get("dtype", "float32")
        if dtype not in DTYPES:
            self.fail(f"{where}.dtype", dtype, f"one of {', '.join(DTYPES)}")
        shape = v.get("shape")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape
        ):
            self.fail(f"{where}.shape", shape, "a list of positive ints (per sample, no batch)")
        return TensorConfig(name, dtype, tuple(shape))

    def tier(self, where: str, v: Any) -> TierConfig:
        if not isinstance(v, dict) or "name" not in v or "width" not in v:
            self.fail(where, v, "a mapping with name and width")
        extra = set(v) - {"name", "width"}
        if extra:
            self.fail(f"{where}.{sorted(extra)[0]}", v[sorted(extra)[0]], "name or width")
        name = self.name(f"{where}.name", v["name"])
        w = v["width"]
        allowed = "a number in (0, 1] or a mapping {group: channels}"
        if isinstance(w, dict):
            for g, n in w.items():
                if not isinstance(n, int) or isinstance(n, bool) or n < 1:
                    self.fail(f"{where}.width.{g}", n, "a positive channel count")
            return TierConfig(name, dict(w))
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 < w <= 1:
            self.fail(f"{where}.width", w, allowed)
        return TierConfig(name, float(w))

    def choice(self, data: dict, key: str, default: str, allowed: tuple[str, ...]) -> str:
        v = data.get(key, default)
        if v not in allowed:
            self.fail(key, v, f"one of {', '.join(allowed)}")
        return v

    def int_(self, data: dict, key: str, default: int, lo: int, hi: int, prefix="") -> int:
        v = data.get(key, default)
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            self.fail(prefix + key, v, f"an integer in [{lo}, {hi}]")
        return v

    def float_(self, data: dict, key: str, default: float) -> float:
        v = data.get(key, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            self.fail(key, v, "a positive number of milliseconds")
        return float(v)

    def str_(self, data: dict, key: str, prefix="") -> str:
        v = data.get(key)
        if not isinstance(v, str) or not v:
            self.fail(prefix + key, v, "a non-empty string")
        return v
