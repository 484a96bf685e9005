"""Offline English text for calibrating and evaluating transformers, built from installed docs.

Why: transformers need unlabelled text to calibrate on (activation statistics, channel
importance) and held-out text to evaluate on, but this project may not download a data
set. The Python packages that ``pip install -e '.[build,dev]'`` installs ship plenty of
real English prose: their README long descriptions (``METADATA``) and the docstrings of
their modules, classes and functions. This module extracts sentences from a fixed list of
those distributions (``DISTRIBUTIONS``; the ones not installed are skipped), keeps the
ones that look like prose, and writes two disjoint splits.

How:

* Documents: a distribution's long description (read through ``importlib.metadata``) and
  each docstring of its ``.py`` files (parsed with ``ast``; no package is imported). Files
  are walked in sorted order, distributions interleaved one document at a time so every
  source contributes, and the walk stops once both splits are full.
* Sentences: prose is split into paragraphs and sentences; a sentence is kept if it has
  ``MIN_WORDS``-``MAX_WORDS`` words, is mostly letters, starts with an uppercase letter,
  ends with ``.``, ``?`` or ``!`` and has no code, URL, path or reST/markdown markup
  (``is_prose``). Whitespace is normalised; duplicates are dropped case-insensitively.

Invariants:

* Disjoint by document: a seeded hash of the document id sends a whole document to one
  split, so no document contributes to both; an evaluation sentence that also occurs in
  the calibration set is then dropped, so the two files share no sentence.
* Deterministic: the same installed packages (and seed) give byte-identical files.
  ``manifest.json`` records the counts, the packages and versions used, the sha256 of each
  file and the rules' parameters.

Example:
    >>> from runtime.demo import text_corpus
    >>> sentences = text_corpus.load("calibration")  # builds runs/text/ on first use
    >>> len(sentences) >= 2000
    True

From the shell: ``python -m runtime.demo.text_corpus [--out DIR] [--seed N]``.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import importlib.metadata as metadata
import json
import re
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from runtime.atomic import write_bytes

__all__ = [
    "DISTRIBUTIONS",
    "SPLITS",
    "build",
    "build_from_documents",
    "installed_documents",
    "is_current",
    "is_prose",
    "load",
    "sentences_of",
]

# Distributions a fresh `pip install -e '.[build,dev]'` installs (directly or as a hard
# dependency of one that it names), in the order they are interleaved.
DISTRIBUTIONS: tuple[str, ...] = (
    "numpy",
    "scipy",
    "scikit-learn",
    "torch",
    "matplotlib",
    "hypothesis",
    "pytest",
    "sympy",
    "networkx",
    "jinja2",
    "joblib",
    "onnx",
    "protobuf",
    "grpcio",
    "prometheus-client",
    "pyyaml",
    "tqdm",
    "tritonclient",
    "safetensors",
    "tokenizers",
)
SPLITS: tuple[str, ...] = ("calibration", "evaluation")
DEFAULT_ROOT = Path("runs/text")

# The rules; all of them are recorded in the manifest.
MIN_WORDS = 6
MAX_WORDS = 40
MIN_LETTER_RATIO = 0.8  # letters / non-space characters
MAX_UPPER_RATIO = 0.3  # uppercase / letters (rejects shouted licence text and acronyms)
MAX_BACKTICKS = 2  # one inline `literal` at most
MAX_FILE_BYTES = 1_000_000  # .py files larger than this are skipped
EVALUATION_FRACTION = 0.3  # share of documents hashed into the evaluation split
CALIBRATION_TARGET = 30000  # the walk stops once both splits hold their target
EVALUATION_TARGET = 1200
SKIPPED_DIRS = frozenset({"tests", "test", "testing"})
_MANIFEST_VERSION = 1

# Substrings that mark code, markup, URLs or paths.
_FORBIDDEN = (
    ">>>", "::", "{", "}", "=", "|", "#", "\\", "<", ">", "[", "]", "_", "..", "->", "*",
    "://", "www.", "http", "$", "@", "~", "^",
)  # fmt: skip
_CODE_RE = re.compile(
    r"\w\(|\(\)"  # a call: f(x), f()
    r"|:\w+:"  # a reST role or field: :param x:, :class:
    r"|\w/\w+/|(?:^|[\s`'\"(])/\w"  # a path: a/b/, /opt
    r"|\.\w+/|/\w+\.\w"  # ./x, x/y.py
    r"|\b\w+\.(?:py|pyi|txt|json|yaml|yml|toml|cfg|ini|so|dll|md|rst|csv|onnx|pt|h5)\b"
    r"|\w\.\w+\.\w|`\.\w|`[^`\s]*/"  # dotted names: numpy.linalg.norm, `.pyplot`, `a/b`
    r"|\b[a-z]+[A-Z]\w*"  # camelCase identifiers
)
_SENTENCE_END_RE = re.compile(r"(?<=[.!?])\s+(?=[\"'(]?[A-Z])")
_MARKUP_LINE_RE = re.compile(
    r"^\s*(?:[-=~^*+#`:.|>]{2,}"  # underlines, doctest, directives, tables, literals
    r"|[-*+] |\d+[.)] "  # bullets and numbered items
    r"|\w[\w ]* ?:\s*$"  # section headings: Returns:
    r"|\*{0,2}\w+(?:, ?\*{0,2}\w+)* : )"  # numpy-style fields: x, y : array_like
)


# --- sentences ---------------------------------------------------------------------------


def normalise(text: str) -> str:
    """Collapses every run of whitespace to one space and strips the ends."""
    return " ".join(text.split())


def is_prose(sentence: str) -> bool:
    """Whether a (normalised) sentence looks like English prose, not code or markup."""
    words = sentence.split()
    if not MIN_WORDS <= len(words) <= MAX_WORDS:
        return False
    if not (sentence[0].isascii() and sentence[0].isupper()) or sentence[-1] not in ".?!":
        return False
    if sentence.count("`") > MAX_BACKTICKS or any(s in sentence for s in _FORBIDDEN):
        return False
    if _CODE_RE.search(sentence):
        return False
    return _letters_look_like_prose(sentence)


def _letters_look_like_prose(sentence: str) -> bool:
    chars = [c for c in sentence if not c.isspace()]
    letters = [c for c in chars if c.isalpha()]
    if len(letters) < MIN_LETTER_RATIO * len(chars):
        return False
    upper = sum(c.isupper() for c in letters)
    return upper <= MAX_UPPER_RATIO * len(letters)


def paragraphs(text: str) -> list[str]:
    """Paragraphs: runs of lines with one indentation, cut at blank and markup lines."""
    out: list[str] = []
    current: list[str] = []
    indent = 0
    for line in text.splitlines():
        stripped = line.strip()
        line_indent = len(line) - len(line.lstrip())
        if not stripped or _MARKUP_LINE_RE.match(line) or line_indent != indent:
            out.append(" ".join(current))
            current = []
            indent = line_indent
        if stripped and not _MARKUP_LINE_RE.match(line):
            current.append(stripped)
    out.append(" ".join(current))
    return [p for p in out if p]


def sentences_of(text: str) -> list[str]:
    """The prose sentences of a document, normalised, in order (duplicates kept)."""
    found = []
    for paragraph in paragraphs(text):
        for candidate in _SENTENCE_END_RE.split(normalise(paragraph)):
            if is_prose(candidate):
                found.append(candidate)
    return found


# --- documents of installed distributions ------------------------------------------------


def description_of(dist: metadata.Distribution) -> str:
    """A distribution's long description: the METADATA body or its Description field."""
    meta = dist.metadata
    body = meta.get_payload() if hasattr(meta, "get_payload") else None
    return body or meta.get("Description") or ""


def python_files(dist: metadata.Distribution) -> list[Path]:
    """The distribution's .py files (sorted, no tests, at most MAX_FILE_BYTES each)."""
    files = []
    for entry in sorted(dist.files or (), key=str):
        if entry.suffix != ".py" or SKIPPED_DIRS.intersection(entry.parts[:-1]):
            continue
        path = Path(str(dist.locate_file(entry)))
        if path.is_file() and path.stat().st_size <= MAX_FILE_BYTES:
            files.append(path)
    return files


def docstrings_of(source: str) -> Iterator[tuple[str, str]]:
    """(qualified name, docstring) of a module and its classes and functions, in order."""
    try:
        with warnings.catch_warnings():  # invalid escape sequences in other people's code
            warnings.simplefilter("ignore")
            tree = ast.parse(source)
    except (SyntaxError, ValueError, RecursionError):
        return
    yield from _docstrings(tree, "")


def _docstrings(node: ast.AST, prefix: str) -> Iterator[tuple[str, str]]:
    doc = ast.get_docstring(node, clean=True)  # type: ignore[arg-type]
    if doc:
        yield prefix or "<module>", doc
    for child in getattr(node, "body", ()):
        if isinstance(child, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            yield from _docstrings(child, f"{prefix}.{child.name}" if prefix else child.name)


def documents_of(dist: metadata.Distribution) -> Iterator[tuple[str, str]]:
    """(document id, text) of one distribution: its description, then its docstrings."""
    name = dist.metadata["Name"].lower()
    yield f"{name}:METADATA", description_of(dist)
    root = Path(str(dist.locate_file("")))
    for path in python_files(dist):
        relative = path.relative_to(root).as_posix() if path.is_relative_to(root) else path.name
        source = path.read_text(encoding="utf-8", errors="replace")
        for qualname, doc in docstrings_of(source):
            yield f"{name}:{relative}:{qualname}", doc


def installed(names: Iterable[str] = DISTRIBUTIONS) -> dict[str, metadata.Distribution]:
    """The named distributions that are installed, in the given order."""
    found = {}
    for name in names:
        try:
            found[name] = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def installed_documents(
    dists: dict[str, metadata.Distribution],
) -> Iterator[tuple[str, str]]:
    """The documents of several distributions, interleaved one document at a time."""
    iterators = [documents_of(dist) for dist in dists.values()]
    while iterators:
        alive = []
        for it in iterators:
            doc = next(it, None)
            if doc is not None:
                yield doc
                alive.append(it)
        iterators = alive


# --- splitting and writing ---------------------------------------------------------------


def split_of(doc_id: str, seed: int) -> str:
    """The split a document belongs to: a seeded hash of its id, uniform in [0, 1)."""
    digest = hashlib.sha256(f"{seed}\0{doc_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    return "evaluation" if u < EVALUATION_FRACTION else "calibration"


@dataclass
class _Splits:
    """Sentences per split, keyed by ``duplicate_key`` (insertion-ordered), and the source
    each came from."""

    targets: dict[str, int]
    sentences: dict[str, dict[str, str]] = field(default_factory=lambda: {s: {} for s in SPLITS})
    origin: dict[str, str] = field(default_factory=dict)

    def full(self, split: str) -> bool:
        return len(self.sentences[split]) >= self.targets[split]

    def add(self, split: str, sentence: str, source: str) -> None:
        key = duplicate_key(sentence)
        calibration, evaluation = self.sentences["calibration"], self.sentences["evaluation"]
        if key in self.sentences[split] or (split == "evaluation" and key in calibration):
            return
        if split == "calibration":
            evaluation.pop(key, None)  # calibration wins: evaluation stays held out
        self.sentences[split][key] = sentence
        self.origin[key] = source

    def source_counts(self) -> dict[str, dict[str, int]]:
        """{source: {split: number of sentences}} for the sources that contributed."""
        counts: dict[str, dict[str, int]] = {}
        for split in SPLITS:
            for key in self.sentences[split]:
                per_split = counts.setdefault(self.origin[key], {})
                per_split[split] = per_split.get(split, 0) + 1
        return counts


def duplicate_key(sentence: str) -> str:
    """What two sentences share when they are the same text: lowercase letters and digits
    (any script), words separated by one space. Keyed by the lowercase form alone, sentences
    that differed only by markup or punctuation ("--" for "-", backticks) sat in both
    splits, so an evaluation sentence had been calibrated on.

    Example:
        >>> duplicate_key("Use ``load()`` -- not save.") == duplicate_key("use load() - not save")
        True
    """
    return " ".join(re.sub(r"[\W_]+", " ", sentence.lower()).split())


def split_documents(
    documents: Iterable[tuple[str, str]], seed: int, targets: dict[str, int]
) -> _Splits:
    """Streams documents into the splits until both hold their target (or the stream ends)."""
    splits = _Splits(targets)
    for doc_id, text in documents:
        if all(splits.full(s) for s in SPLITS):
            break
        split = split_of(doc_id, seed)
        for sentence in sentences_of(text):
            if splits.full(split):
                break
            splits.add(split, sentence, source=doc_id.split(":", 1)[0])
    return splits


def _write_bytes(path: Path, data: bytes) -> str:
    """Writes data atomically (temporary file, then rename); returns its sha256."""
    write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def _write_lines(path: Path, lines: Iterable[str]) -> str:
    return _write_bytes(path, "".join(f"{line}\n" for line in lines).encode("utf-8"))


def _rules(targets: dict[str, int]) -> dict:
    return {
        "min_words": MIN_WORDS,
        "max_words": MAX_WORDS,
        "min_letter_ratio": MIN_LETTER_RATIO,
        "max_upper_ratio": MAX_UPPER_RATIO,
        "max_backticks": MAX_BACKTICKS,
        "forbidden_substrings": list(_FORBIDDEN),
        "code_regex": _CODE_RE.pattern,
        "markup_line_regex": _MARKUP_LINE_RE.pattern,
        "max_file_bytes": MAX_FILE_BYTES,
        "skipped_dirs": sorted(SKIPPED_DIRS),
        "evaluation_fraction": EVALUATION_FRACTION,
        "targets": targets,
        "distributions": list(DISTRIBUTIONS),
        "duplicate_key": "lowercase letters and digits (any script), one space between words",
    }


def _targets() -> dict[str, int]:
    """Sentences per split the walk stops at (read at call time: tests change them)."""
    return {"calibration": CALIBRATION_TARGET, "evaluation": EVALUATION_TARGET}


def _check_counts(counts: dict[str, int], minimums: dict[str, int]) -> None:
    if any(counts[s] < minimums[s] for s in SPLITS):
        found = ", ".join(f"{s} {counts[s]} (need {minimums[s]})" for s in SPLITS)
        raise ValueError(f"too few prose sentences found: {found}")


def build_from_documents(
    documents: Iterable[tuple[str, str]],
    out_dir: Path = DEFAULT_ROOT,
    seed: int = 0,
    min_calibration: int = 2000,
    min_evaluation: int = 1000,
    sources: dict[str, str] | None = None,
) -> dict:
    """Splits (doc_id, text) documents into the two files and writes the manifest.

    A doc_id's part before its first ``:`` names its source; ``sources`` maps source names
    to the versions recorded in the manifest. Each split stops at its target
    (CALIBRATION_TARGET, EVALUATION_TARGET, raised to the minimum). Raises ValueError,
    writing nothing, if a split has fewer sentences than its minimum.
    """
    minimums = {"calibration": min_calibration, "evaluation": min_evaluation}
    targets = {s: max(t, minimums[s]) for s, t in _targets().items()}
    splits = split_documents(documents, seed, targets)
    counts = {s: len(splits.sentences[s]) for s in SPLITS}
    _check_counts(counts, minimums)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sha = {s: _write_lines(out_dir / f"{s}.txt", splits.sentences[s].values()) for s in SPLITS}
    contributed = splits.source_counts()
    versions = {name: None for name in contributed} | dict(sources or {})
    manifest = {
        "format": _MANIFEST_VERSION,
        "seed": seed,
        "counts": counts,
        "sha256": {f"{s}.txt": sha[s] for s in SPLITS},
        "packages": [
            {"name": name, "version": version, "sentences": contributed.get(name, {})}
            for name, version in sorted(versions.items())
        ],
        "rules": _rules(targets),
    }
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    _write_bytes(out_dir / "manifest.json", text.encode("utf-8"))
    return manifest


def build(
    out_dir: Path = DEFAULT_ROOT,
    seed: int = 0,
    min_calibration: int = 2000,
    min_evaluation: int = 1000,
) -> dict:
    """Builds the corpus from the installed DISTRIBUTIONS into out_dir; returns the manifest."""
    dists = installed()
    versions = {dist.metadata["Name"].lower(): dist.version for dist in dists.values()}
    return build_from_documents(
        installed_documents(dists), out_dir, seed, min_calibration, min_evaluation, versions
    )


# --- loading -----------------------------------------------------------------------------


def is_intact(root: Path) -> bool:
    """Whether root holds a manifest whose sha256 matches both split files."""
    try:
        manifest = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
        for name, expected in manifest["sha256"].items():
            if hashlib.sha256((root / name).read_bytes()).hexdigest() != expected:
                return False
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    return set(manifest["sha256"]) == {f"{s}.txt" for s in SPLITS}


def is_current(root: Path) -> bool:
    """Whether root's manifest was written by these rules and targets (a corpus built by an
    older version of this module - fewer sentences, other filters - is rebuilt, not used)."""
    try:
        manifest = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return manifest.get("format") == _MANIFEST_VERSION and manifest.get("rules") == _rules(
        _targets()
    )


def load(split: str, root: Path = DEFAULT_ROOT) -> list[str]:
    """The sentences of a split, building (or rebuilding a damaged or outdated) corpus in
    root first."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: expected one of {SPLITS}")
    root = Path(root)
    if not (is_intact(root) and is_current(root)):
        build(root)
    return (root / f"{split}.txt").read_text(encoding="utf-8").splitlines()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_ROOT, help="output directory")
    parser.add_argument("--seed", type=int, default=0, help="seed of the document split")
    args = parser.parse_args(argv)
    manifest = build(args.out, args.seed)
    counts = manifest["counts"]
    print(
        f"{args.out}: calibration {counts['calibration']} sentences, "
        f"evaluation {counts['evaluation']} sentences, "
        f"from {len(manifest['packages'])} packages"
    )


if __name__ == "__main__":
    main()
