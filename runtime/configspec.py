"""Declarative config classes: each field is declared once, and the parser is derived from it.

A config class is a frozen, keyword-only dataclass whose fields are made with :func:`spec`:
the default, the bounds or choices and a one-line doc sit on the field itself. :func:`parse`
walks ``dataclasses.fields()``, checks every value against its type annotation and its
spec, refuses unknown keys (suggesting the nearest known one) and then calls the class's
optional ``validate(where)`` hook for checks that involve more than one field. Every error
has one format, naming the file, the field path, the value and what is allowed:

    models/mnist/model.yaml: tiers[1].width: got 1.5, expected a number in (0, 1]

No torch, no server imports and no pydantic: the serving image stays small, and this is all
a dozen-field config needs. Both ``model.yaml`` (runtime.repository.config) and the server
config (server.config) are built on it.

Example:
    >>> from dataclasses import dataclass
    >>> @dataclass(frozen=True, kw_only=True)
    ... class Pool:
    ...     size: int = spec(4, lo=1, hi=64, doc="worker threads")
    >>> parse(Pool, {"size": 8}, Where("pool.yaml")).size
    8
    >>> parse(Pool, {"sise": 8}, Where("pool.yaml"))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    runtime.configspec.ConfigError: pool.yaml: sise: got 8, expected ... (did you mean 'size'?)
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import itertools
import math
import os
import re
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple, NoReturn

import yaml

__all__ = [
    "NAME",
    "ConfigError",
    "FieldDoc",
    "Pattern",
    "Where",
    "describe",
    "parse",
    "read_yaml",
    "reference",
    "spec",
    "to_dict",
]

_SPEC = "innfer.spec"  # the metadata key a spec() field carries its Spec under


class ConfigError(ValueError):
    """A config file or value is invalid; the message says where and what is allowed."""


class Pattern(NamedTuple):
    """A regular expression a string field must match, and how to describe it to a user."""

    regex: re.Pattern[str]
    description: str


NAME = Pattern(
    re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,63}$"),
    "a name of letters, digits, '_', '.', '-' (at most 64)",
)
# A model's name is its directory's in the repository (runtime.repository.store): longer
# than other names - the engine cache adds suffixes to it within a file name's 255 bytes.
MODEL_NAME = Pattern(
    re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}"),
    "a model name of letters, digits, '_', '.', '-' (at most 128)",
)


@dataclasses.dataclass(frozen=True)
class Where:
    """Where a value sits: the file it came from, its field path, and the directory that
    relative paths in the file are resolved against. ``fail`` raises the one error format.

    Example:
        >>> Where("server.yaml").child("tls").child("cert").path
        'tls.cert'
        >>> Where("model.yaml").child("tiers").child(1).path
        'tiers[1]'
    """

    source: str
    path: str = ""
    base: Path | None = None
    secret: bool = False  # the value is a secret: errors say "<redacted>", never the value

    def child(self, key: str | int) -> Where:
        if isinstance(key, int):
            path = f"{self.path}[{key}]"
        else:  # (a file's own key of 5,000 characters made a 5 KB error: review 158)
            key = _clipped(str(key))
            path = f"{self.path}.{key}" if self.path else key
        return dataclasses.replace(self, path=path)

    def fail(self, value: Any, expected: str) -> NoReturn:
        loc = f"{self.source}: {self.path}: " if self.path else f"{self.source}: "
        shown = REDACTED if self.secret else _clipped(_short_repr(value))
        raise ConfigError(f"{loc}got {shown}, expected {expected}")


# What an error shows in place of a secret's value (a token echoed in a startup error
# reaches stderr and the pod's logs).
REDACTED = "<redacted>"
# At most this much of a wrong value is shown: a whole file read as one string (a
# model.yaml that is another file) went to every client asking RepositoryIndex (review 156).
SHOWN_CHARS = 80


def _short_repr(value: Any, depth: int = 4, items: int = 12) -> str:
    """``repr(value)`` in YAML's order, within bounds: lists and mappings nested past
    ``depth`` show as ``[...]`` / ``{...}``, past ``items`` entries with ``...``. A value
    that nests or repeats (shared lists ten deep, a list of a million) is not walked whole
    to show 80 characters of it; a small one reads as ``repr``'s."""
    if isinstance(value, list | tuple):
        if depth <= 0:
            return "[...]" if isinstance(value, list) else "(...)"
        inner = [_short_repr(v, depth - 1, items) for v in value[:items]]
        inner += ["..."] if len(value) > items else []
        if isinstance(value, list):
            return f"[{', '.join(inner)}]"
        return f"({inner[0]},)" if len(value) == 1 else f"({', '.join(inner)})"
    if isinstance(value, dict):
        if depth <= 0:
            return "{...}"
        pairs = list(itertools.islice(value.items(), items))
        inner = [
            f"{_short_repr(k, 0, items)}: {_short_repr(v, depth - 1, items)}" for k, v in pairs
        ]
        inner += ["..."] if len(value) > items else []
        return f"{{{', '.join(inner)}}}"
    return repr(value)


def _clipped(text: str) -> str:
    return text if len(text) <= SHOWN_CHARS else f"{text[:SHOWN_CHARS]}... ({len(text)} chars)"


@dataclasses.dataclass(frozen=True)
class Spec:
    """What :func:`spec` records on a field (see there for the meaning of each)."""

    doc: str
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    choices: Sequence[str] | None = None
    pattern: Pattern | None = None
    nonempty: bool = False
    unique: bool | str = False
    must_exist: bool = False
    unit: str | None = None
    expected: str | None = None
    parse: Callable[[Any, Where], Any] | None = None
    key: bool = True


def spec(
    default: Any = dataclasses.MISSING,
    *,
    doc: str,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    hi_open: bool = False,
    choices: Sequence[str] | None = None,
    pattern: Pattern | None = None,
    nonempty: bool = False,
    unique: bool | str = False,
    must_exist: bool = False,
    unit: str | None = None,
    expected: str | None = None,
    parse: Callable[[Any, Where], Any] | None = None,
    key: bool = True,
    compare: bool = True,
    repr: bool = True,  # the dataclasses.field() argument of the same name
) -> Any:
    """A dataclass field that also carries its rules; no default means the key is required.

    ``lo``/``hi`` bound numbers (``*_open`` excludes the bound); ``choices`` and ``pattern``
    constrain strings. For a ``tuple[X, ...]`` field those apply to every item, ``nonempty``
    refuses an empty list and ``unique`` refuses repeats (``unique="name"``: of the items'
    ``name``). ``must_exist``: a ``Path`` that must be an existing file. ``unit`` words the
    bounds ("milliseconds in [0, 10000)"),
    ``expected`` replaces the derived description, ``parse(value, where)`` replaces the
    derived parser for an odd field. ``key=False``: not read from the file (e.g. ``source``).
    ``repr=False`` also marks a secret: an error about it (or about an unknown key beside it)
    shows ``REDACTED``, not the value.

    Example:
        >>> from dataclasses import dataclass
        >>> @dataclass(frozen=True, kw_only=True)
        ... class Limits:
        ...     max_batch: int = spec(8, lo=1, hi=4096, doc="largest batch")
        >>> Limits().max_batch, Limits.__dataclass_fields__["max_batch"].metadata[_SPEC].hi
        (8, 4096)
    """
    rules = Spec(
        doc=doc, lo=lo, hi=hi, lo_open=lo_open, hi_open=hi_open, choices=choices,
        pattern=pattern, nonempty=nonempty, unique=unique, must_exist=must_exist, unit=unit,
        expected=expected, parse=parse, key=key,
    )  # fmt: skip
    return dataclasses.field(default=default, compare=compare, repr=repr, metadata={_SPEC: rules})


# --- parsing ----------------------------------------------------------------------------


class _Field(NamedTuple):
    name: str
    hint: Any  # the annotation with None taken out of an Optional
    optional: bool
    required: bool
    default: Any
    spec: Spec


@functools.cache
def _fields(cls: type) -> tuple[_Field, ...]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if _SPEC not in f.metadata:
            raise TypeError(f"{cls.__name__}.{f.name} is not declared with configspec.spec()")
        hint, optional = _strip_none(hints[f.name])
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        out.append(_Field(f.name, hint, optional, required, f.default, f.metadata[_SPEC]))
    return tuple(out)


def _strip_none(hint: Any) -> tuple[Any, bool]:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        rest = tuple(a for a in args if a is not type(None))
        if len(rest) < len(args):
            return (rest[0] if len(rest) == 1 else typing.Union[rest]), True  # noqa: UP007
    return hint, False


def parse(cls: type, data: Any, where: Where, **extra: Any) -> Any:
    """Build ``cls`` from a mapping parsed from YAML, checking every field, then validate.

    ``extra``: values for fields declared with ``key=False`` (not read from ``data``).

    Example:
        >>> from dataclasses import dataclass
        >>> @dataclass(frozen=True, kw_only=True)
        ... class Pool:
        ...     size: int = spec(4, lo=1, hi=64, doc="worker threads")
        >>> parse(Pool, {"size": 0}, Where("pool.yaml"))
        Traceback (most recent call last):
        ...
        runtime.configspec.ConfigError: pool.yaml: size: got 0, expected an integer in [1, 64]
    """
    fields = _fields(cls)
    keys = [f.name for f in fields if f.spec.key]
    secrets = _secret_fields(cls)
    if not isinstance(data, dict):
        # (None: an empty file or section - nothing, or only comments - which the 20 keys
        # of a mapping expected said only as "got None": review 160)
        empty = " (it is empty: nothing, or only comments)" if data is None else ""
        where.fail(data, _mapping_expected(fields) + empty)
    for k in data:
        if k not in keys:
            # A misspelt key beside a secret is most likely the secret itself.
            at = dataclasses.replace(where.child(str(k)), secret=bool(secrets))
            at.fail(data[k], _known_field(str(k), keys))
    values = dict(extra)
    for f in fields:
        if not f.spec.key:
            continue
        at = where.child(f.name)
        if f.name in secrets:
            at = dataclasses.replace(at, secret=True)
        if f.name not in data:
            if f.required:
                at.fail(None, f"{_expected(f)} (required)")
            continue  # the dataclass default applies: declared once, on the field
        values[f.name] = _value(f, data[f.name], at)
    obj = cls(**values)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        validate(where)
    return obj


@functools.cache
def _secret_fields(cls: type) -> frozenset[str]:
    """The fields of ``cls`` declared ``spec(..., repr=False)``: secrets (a bearer token),
    whose values no error message shows."""
    return frozenset(f.name for f in dataclasses.fields(cls) if not f.repr)


def _value(f: _Field, v: Any, at: Where) -> Any:
    if v is None and (f.optional or (not f.required and f.default is None)):
        return None
    if f.spec.parse is not None:
        return f.spec.parse(v, at)
    if typing.get_origin(f.hint) is tuple:
        return _tuple(f, v, at)
    return _scalar(f.hint, f.spec, v, at, _expected(f))


def _tuple(f: _Field, v: Any, at: Where) -> tuple:
    if not isinstance(v, (list, tuple)) or (f.spec.nonempty and not v):
        at.fail(v, _expected(f))
    item = typing.get_args(f.hint)[0]
    items = tuple(
        _scalar(item, f.spec, x, at.child(i), _describe(item, f.spec)) for i, x in enumerate(v)
    )
    if f.spec.unique:
        keys = [getattr(x, f.spec.unique) if isinstance(f.spec.unique, str) else x for x in items]
        dup = sorted({k for k in keys if keys.count(k) > 1})
        if dup:
            what = (
                f"unique {f.spec.unique}s"
                if isinstance(f.spec.unique, str)
                else "no repeated items"
            )
            at.fail(dup, what)
    return items


def _scalar(hint: Any, s: Spec, v: Any, at: Where, expected: str) -> Any:
    """One value of type ``hint`` (a bool, int, float, str, Path or config class)."""
    if dataclasses.is_dataclass(hint):
        return parse(hint, v, at)
    if hint is bool:
        if not isinstance(v, bool):
            at.fail(v, expected)
        return v
    if hint in (int, float):
        ok = isinstance(v, int) if hint is int else isinstance(v, (int, float))
        if isinstance(v, bool) or not ok or not _finite(v):
            at.fail(v, expected)
        if not _in_bounds(s, v):
            at.fail(v, expected)
        return hint(v)
    if hint is str or hint is Path:
        if isinstance(v, bool) and s.choices:
            return _yaml_word(v, s.choices, at, expected)
        if not isinstance(v, str) or not v:
            at.fail(v, expected)
        if hint is Path:
            p = Path(v)
            p = p if p.is_absolute() or at.base is None else at.base / p
            if s.must_exist and not p.is_file():  # a mounted Secret's folder is not its file
                at.fail(v, expected)
            return p
        if s.choices and v not in s.choices:
            at.fail(v, expected + _did_you_mean(v, s.choices))
        if s.pattern is not None and not s.pattern.regex.fullmatch(v):  # "$" allows a "\n"
            at.fail(v, expected)
        return v
    raise TypeError(f"{at.path}: no parser for {hint!r}; give the field spec(parse=...)")


# The words YAML 1.1 (PyYAML) reads as booleans where they stand unquoted.
_YAML_BOOL_WORDS = {True: ("yes", "true", "on"), False: ("no", "false", "off")}


def _yaml_word(v: bool, choices: Sequence[str], at: Where, expected: str) -> str:
    """The one choice an unquoted YAML word read as ``v`` stands for: ``level: OFF`` reads
    as False, and was refused as "got False, expected one of OFF, TIMESTAMPS" (review
    helper-261). Where no choice (or more than one) is such a word, the refusal says why."""
    words = [c for c in choices if c.lower() in _YAML_BOOL_WORDS[v]]
    if len(words) == 1:
        return words[0]
    # "quote it" only where a quoted word could be a choice (several spell this boolean);
    # a quoted "off" for model_control is refused too (review helper-270)
    quote = ": quote the value" if words else ""
    at.fail(v, f"{expected} (YAML reads an unquoted yes/no/on/off/true/false as a boolean"
            f"{quote})")  # fmt: skip


def _finite(v: float) -> bool:
    """Whether ``v`` is a finite float, or an int a float can hold (YAML reads 1e400 as inf
    and a 400-digit integer as an int that float() overflows on)."""
    try:
        return math.isfinite(v)
    except OverflowError:
        return False


def _in_bounds(s: Spec, v: float) -> bool:
    if s.lo is not None and (v <= s.lo if s.lo_open else v < s.lo):
        return False
    return s.hi is None or (v < s.hi if s.hi_open else v <= s.hi)


# --- how values are described to users --------------------------------------------------


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


def _bounds(s: Spec) -> str:
    if s.lo is not None and s.hi is not None:
        left, right = "(" if s.lo_open else "[", ")" if s.hi_open else "]"
        return f"in {left}{_num(s.lo)}, {_num(s.hi)}{right}"
    if s.lo is not None:
        return f"{'>' if s.lo_open else '>='} {_num(s.lo)}"
    if s.hi is not None:
        return f"{'<' if s.hi_open else '<='} {_num(s.hi)}"
    return ""


def _describe(hint: Any, s: Spec) -> str:
    """What one value of type ``hint`` under ``s`` may be, in words."""
    if dataclasses.is_dataclass(hint):
        return _mapping_expected(_fields(hint))
    if hint is bool:
        return "true or false"
    if hint in (int, float):
        noun = s.unit or ("an integer" if hint is int else "a number")
        return f"{noun} {_bounds(s)}".strip()
    if hint is Path:
        return "an existing file" if s.must_exist else "a path"
    if s.choices:
        return f"one of {', '.join(s.choices)}"
    if s.pattern is not None:
        return s.pattern.description
    return "a non-empty string"


def _expected(f: _Field) -> str:
    if f.spec.expected is not None:
        text = f.spec.expected
    elif typing.get_origin(f.hint) is tuple:
        item = typing.get_args(f.hint)[0]
        what = _describe(item, f.spec)
        if dataclasses.is_dataclass(item):
            what = what.replace("a mapping with", "mappings, each with", 1)
        text = f"a {'non-empty ' if f.spec.nonempty else ''}list of {_plural(what)}"
    else:
        text = _describe(f.hint, f.spec)
    return f"{text}, or null" if f.optional and not f.required else text


def _plural(what: str) -> str:
    # "a list of an integer >= 1" reads badly; "a list of integers >= 1" does not.
    for one, many in (("an integer", "integers"), ("a number", "numbers"), ("a name", "names")):
        if what.startswith(one):
            return many + what[len(one) :]
    return what


def _mapping_expected(fields: Sequence[_Field]) -> str:
    need = [f.name for f in fields if f.spec.key and f.required]
    rest = [f.name for f in fields if f.spec.key and not f.required]
    if need and rest:
        return f"a mapping with {', '.join(need)} and optional {_and(rest, 'or')}"
    if need:
        return f"a mapping with {_and(need)}"
    return f"a mapping with optional {_and(rest, 'or')}" if rest else "a mapping"


def _and(names: Sequence[str], word: str = "and") -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} {word} {names[-1]}"


def _known_field(key: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    if close:
        return f"a known field (did you mean {close[0]!r}?)"
    return f"a known field ({', '.join(sorted(known))})"


def _did_you_mean(value: Any, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(str(value), choices, n=1) if isinstance(value, str) else []
    return f" (did you mean {close[0]!r}?)" if close else ""


# --- back to plain data, and documentation ----------------------------------------------


def to_dict(obj: Any) -> dict[str, Any]:
    """The mapping :func:`parse` reads ``obj`` back from (keys only, ``key=False`` left out).

    Example:
        >>> from dataclasses import dataclass
        >>> @dataclass(frozen=True, kw_only=True)
        ... class Pool:
        ...     size: int = spec(4, lo=1, hi=64, doc="worker threads")
        >>> to_dict(Pool(size=8))
        {'size': 8}
    """
    return {f.name: _plain(getattr(obj, f.name)) for f in _fields(type(obj)) if f.spec.key}


def _plain(v: Any) -> Any:
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return to_dict(v)
    if isinstance(v, (tuple, list)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, Path):
        return str(v)
    return v


class FieldDoc(NamedTuple):
    """One documented key: dotted path (``[]`` for list items), default, allowed, doc."""

    key: str
    default: str
    allowed: str
    doc: str


def describe(cls: type, prefix: str = "") -> list[FieldDoc]:
    """Every key of ``cls``, nested classes included, with its default, rules and doc.

    Example:
        >>> from dataclasses import dataclass
        >>> @dataclass(frozen=True, kw_only=True)
        ... class Pool:
        ...     size: int = spec(4, lo=1, hi=64, doc="worker threads")
        >>> describe(Pool)
        [FieldDoc(key='size', default='4', allowed='an integer in [1, 64]', doc='worker threads')]
    """
    rows = []
    for f in _fields(cls):
        if not f.spec.key:
            continue
        key = prefix + f.name
        default = "(required)" if f.required else _default_text(f.default)
        rows.append(FieldDoc(key, default, _expected(f), f.spec.doc))
        item = typing.get_args(f.hint)[0] if typing.get_origin(f.hint) is tuple else f.hint
        if dataclasses.is_dataclass(item) and f.spec.parse is None:
            sub = f"{key}[]." if item is not f.hint else f"{key}."
            rows.extend(describe(item, sub))
    return rows


def _default_text(v: Any) -> str:
    return yaml.safe_dump(_plain(v), default_flow_style=True).strip().removesuffix("...").strip()


def reference(cls: type) -> str:
    """``describe(cls)`` as commented YAML-like lines, for docs and ``--help`` text.

    Example:
        >>> from dataclasses import dataclass
        >>> @dataclass(frozen=True, kw_only=True)
        ... class Pool:
        ...     size: int = spec(4, lo=1, hi=64, doc="worker threads")
        >>> print(reference(Pool))
        size: 4  # worker threads; an integer in [1, 64]
    """
    rows = describe(cls)
    lines = [(f"{r.key}: {r.default}", f"# {r.doc}; {r.allowed}") for r in rows]
    # The comments line up after the keys and defaults, up to REFERENCE_COLUMN: one long
    # default (server limits', 3 lines of YAML) padded every line to 270 columns
    # (review helper-225).
    width = min(max((len(head) for head, _ in lines), default=0), REFERENCE_COLUMN) + 2

    def line(head: str, tail: str) -> str:
        last = head.rpartition("\n")[2]
        if len(last) > REFERENCE_COLUMN:  # (a section's default on one line: the server's
            return f"{head}\n{' ' * width}{tail}"  # trace) its meaning under it, lined up
        return head + " " * max(width - len(last), 2) + tail

    return "\n".join(line(head, tail) for head, tail in lines)


REFERENCE_COLUMN = 48


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping: PyYAML keeps the last
    silently, so a second ``tiers:`` block further down a model.yaml dropped the first one's
    tiers without a word. Merge keys (``<<: *base``) may still be overridden."""

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict:
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    repeated = key in seen
                except TypeError:  # unhashable: the base class says so
                    continue
                if repeated:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} is given twice in one mapping (YAML would "
                        "keep only the last): remove one", key_node.start_mark,
                    )  # fmt: skip
                seen.add(key)
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node: yaml.Node) -> int:
        """YAML 1.1's integers, refusing the two forms no one writes on purpose in a config:
        a leading 0 (octal: ``max_batch: 010`` read as 8) and base 60 (``1:30`` read as 90),
        both read silently by PyYAML (review 160). ``0``, ``10`` and ``0x1F`` stay."""
        text = str(self.construct_scalar(node)).replace("_", "").lstrip("+-")
        if (len(text) > 1 and text[0] == "0" and text[1:].isdigit()) or ":" in text:
            raise yaml.constructor.ConstructorError(
                None, None, f"{node.value!r} reads as a number in another base in YAML 1.1 "
                "(010 is 8, 1:30 is 90): write it without the leading 0 or the colon, or "
                "quote it", node.start_mark,
            )  # fmt: skip
        return super().construct_yaml_int(node)

    def construct_yaml_float(self, node: yaml.Node) -> float:
        """YAML 1.1's floats, refusing base 60 as the integers do (``1:30.5`` read as 90.5;
        review helper-281)."""
        if ":" in str(self.construct_scalar(node)):
            raise yaml.constructor.ConstructorError(
                None, None, f"{node.value!r} reads as a base-60 number in YAML 1.1 (1:30.5 is "
                "90.5): write it without the colon, or quote it", node.start_mark,
            )  # fmt: skip
        return super().construct_yaml_float(node)


_UniqueKeyLoader.add_constructor("tag:yaml.org,2002:int", _UniqueKeyLoader.construct_yaml_int)
_UniqueKeyLoader.add_constructor("tag:yaml.org,2002:float", _UniqueKeyLoader.construct_yaml_float)


def read_yaml(path: Path) -> Any:
    """Parse a YAML file; a missing file, a syntax error or a key given twice in one mapping
    is a ConfigError naming it."""
    return _read(path)[0]


def read_config_yaml(path: Path, blank_refused: dict[str, str]) -> Any:
    r"""``read_yaml``, refusing a top-level key of ``blank_refused`` (key -> what it turns
    on) written with nothing after it: ``auth:`` with its settings commented out reads as
    null, as ``auth: null`` does, and a section begun and left blank was taken as off,
    saying nothing (review 160: the server started without authentication). ``key: null``
    stays the way to say off.

    Example:
        >>> import tempfile
        >>> p = Path(tempfile.mkdtemp()) / "c.yaml"
        >>> _ = p.write_text("auth:\n  # bearer_token_file: t\ntls: null\n")
        >>> read_config_yaml(p, {"tls": "TLS"})
        {'auth': None, 'tls': None}
        >>> try:
        ...     read_config_yaml(p, {"auth": "authentication"})
        ... except ConfigError as exc:
        ...     print(str(exc).split(": ", 1)[1][:33])
        auth: got None, expected its sett
    """
    data, root = _read(path)
    blank = set()
    if isinstance(root, yaml.MappingNode):
        blank = {
            k.value
            for k, v in root.value
            if isinstance(k, yaml.ScalarNode) and isinstance(v, yaml.ScalarNode)
            and v.tag == "tag:yaml.org,2002:null" and v.value == ""
        }  # fmt: skip
    for key in sorted(blank & set(blank_refused)):
        what = blank_refused[key]
        Where(str(path)).child(key).fail(
            None,
            f"its settings ({key}: with nothing after it reads as null: {what} off); give "
            f"them, or write {key}: null (or leave the key out) for {what} off",
        )
    return data


# The most values (scalars, lists, mappings) a config file may hold once its aliases are
# expanded: ten nested lists of nine aliases each (a 687-byte model.yaml) expand to 9^10,
# and building an error's text for them stalled the whole server for 40 s and ~24 GB
# (review helper-183). Real configs hold a few hundred.
MAX_NODES = 100_000


def _expanded_size(root: yaml.Node) -> int:
    """How many nodes ``root`` holds with every alias expanded (an alias is the node it
    names, shared), counted once per distinct node with memoised subtotals, stopping just
    past ``MAX_NODES``: linear in the file, whatever the expansion. An alias inside the value
    it names (a recursive value) counts as past it."""
    total: dict[int, int] = {}
    open_: set[int] = set()  # the nodes whose children are being counted: the path here
    stack = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        if id(node) in total:
            continue
        if isinstance(node, yaml.ScalarNode):
            total[id(node)] = 1
            continue
        kids = (
            [k for pair in node.value for k in pair]
            if isinstance(node, yaml.MappingNode)
            else node.value
        )
        if not children_done:
            if id(node) in open_:  # (&a [*a]: an alias inside the value it names)
                return MAX_NODES + 1  # infinite
            open_.add(id(node))
            stack.append((node, True))
            stack.extend((k, False) for k in kids if id(k) not in total)
            continue
        open_.discard(id(node))
        total[id(node)] = min(1 + sum(total.get(id(k), 0) for k in kids), MAX_NODES + 1)
    return total[id(root)]


def _read(path: Path) -> tuple[Any, yaml.Node | None]:
    """The file's data and the node tree it was built from (one read, one parse)."""
    if path.is_dir():
        raise ConfigError(f"{path}: is a directory; give the YAML file")
    if path.is_symlink() and not path.exists():
        raise ConfigError(
            f"{path}: a link to {os.readlink(path)}, which does not exist: restore its target "
            "(a mounted ConfigMap or Secret's files missing?)"
        )
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    try:
        with path.open(encoding="utf-8") as f:  # a stream: YAML's marks name the file
            loader = _UniqueKeyLoader(f)  # a SafeLoader subclass
            try:
                root = loader.get_single_node()
                if root is not None and _expanded_size(root) > MAX_NODES:
                    raise ConfigError(
                        f"{path}: its YAML aliases (*name) expand to more than {MAX_NODES:,} "
                        "values (or into the value that holds them), more than a config "
                        "holds: write the values out, or drop the aliases that repeat others"
                    )
                return (loader.construct_document(root) if root is not None else None), root
            finally:
                loader.dispose()
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    except ConfigError:
        raise
    except RecursionError:  # 5,000 nested [: it stopped the whole server's start
        raise ConfigError(f"{path}: nested too deeply to be a config; fix the file") from None
    except ValueError as exc:  # an integer of 5,000 digits (Python's int() limit)
        raise ConfigError(f"{path}: not a config innfer reads ({exc}); fix the file") from None
