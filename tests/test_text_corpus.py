"""The offline text corpus: the prose filter, document-level splits, determinism, the real
build from installed packages' docs, and load()'s rebuild of a damaged corpus."""

from __future__ import annotations

import hashlib
import json

import pytest

from runtime.demo import text_corpus as tc

PROSE = [
    "The quick brown fox jumps over the lazy dog.",
    "Returns the number of nodes in the graph, counting isolated ones.",
    "Is this function safe to call from several threads at once?",
    "If the input is empty, an empty array of the same type is returned.",
    "Set `k` to the number of sampled nodes used as sources.",
]
NOT_PROSE = [
    ">>> import numpy as np; np.zeros(3) is an array.",  # doctest
    "Use x = compute(a, b) to get the result of the call.",  # code
    "See https://example.com/docs for the full list of options.",  # URL
    "Read more about it at www.example.com before you continue.",  # URL
    "The files are written to /tmp/output by default in this mode.",  # path
    "Edit the settings in config/local/site.yaml before starting.",  # path
    ":param graph: The graph whose nodes are counted here.",  # reST field
    "Calls :func:`numpy.linalg.norm` on every row of the matrix.",  # reST role
    "| Name | Type | Description of the column in the table |.",  # table
    "# Installation guide for the package on every platform.",  # markdown heading
    "This is **very** important for the whole thing to work.",  # emphasis
    "Pass ``a``, ``b`` and ``c`` to configure the whole thing.",  # backtick-heavy
    "Uses the my_function helper to compute all of it.",  # identifier
    "Too short to keep.",  # < MIN_WORDS
    " ".join(["Word"] + ["word"] * 45) + ".",  # > MAX_WORDS
    "lowercase start is not the start of a sentence here.",
    "This sentence has no final punctuation mark at the end",
    "THIS SOFTWARE IS PROVIDED BY THE COPYRIGHT HOLDERS AS IS.",  # shouted licence text
    "Values 1, 2, 3, 4, 5, 6, 7, 8, 9, 10 and 11 are allowed.",  # mostly digits
]


@pytest.mark.parametrize("sentence", PROSE)
def test_prose_is_kept(sentence):
    assert tc.is_prose(sentence)


@pytest.mark.parametrize("sentence", NOT_PROSE)
def test_code_urls_and_markup_are_rejected(sentence):
    assert not tc.is_prose(tc.normalise(sentence))


def test_sentences_of_splits_prose_and_drops_code_blocks():
    doc = """Compute the mean of an array along an axis.

    Parameters
    ----------
    a : array_like
        The array whose mean is computed along the requested axis.

    Examples
    --------
    >>> np.mean([1, 2])
    1.5

    The result has the same   dtype as the input.  Integer inputs
    are promoted to floating point before the mean is computed.
    """
    assert tc.sentences_of(doc) == [
        "Compute the mean of an array along an axis.",
        "The array whose mean is computed along the requested axis.",
        "The result has the same dtype as the input.",
        "Integer inputs are promoted to floating point before the mean is computed.",
    ]


def test_docstrings_are_read_with_ast_not_imported():
    source = '''"""Module doc."""
raise SystemExit("importing this would exit")
class A:
    """Class doc."""
    def f(self):
        """Method doc."""
async def g():
    """Function doc."""
'''
    assert list(tc.docstrings_of(source)) == [
        ("<module>", "Module doc."),
        ("A", "Class doc."),
        ("A.f", "Method doc."),
        ("g", "Function doc."),
    ]
    assert list(tc.docstrings_of("def broken(:\n")) == []


def _fake_documents(n_docs: int = 200, per_doc: int = 3) -> list[tuple[str, str]]:
    """Documents of unique prose sentences (plus one sentence shared by all documents)."""
    docs = []
    for d in range(n_docs):
        lines = [
            f"Document number {d} says thing {i} about the subject at hand." for i in range(per_doc)
        ]
        lines.append("Every document repeats this same sentence about shared text.")
        docs.append((f"fake{d % 3}:doc{d}", " ".join(lines) + "\n\n>>> code = 1\n"))
    return docs


def _doc_of(sentence: str) -> str:
    return sentence.split()[2]  # "Document number {d} says ..."


def test_build_splits_by_document_and_is_disjoint(tmp_path):
    docs = _fake_documents()
    manifest = tc.build_from_documents(docs, tmp_path, min_calibration=50, min_evaluation=20)
    cal = (tmp_path / "calibration.txt").read_text(encoding="utf-8").splitlines()
    ev = (tmp_path / "evaluation.txt").read_text(encoding="utf-8").splitlines()
    assert manifest["counts"] == {"calibration": len(cal), "evaluation": len(ev)}
    assert len(cal) >= 50 and len(ev) >= 20
    assert not {s.lower() for s in cal} & {s.lower() for s in ev}
    assert len(set(cal)) == len(cal) and len(set(ev)) == len(ev)
    shared = "Every document repeats this same sentence about shared text."
    assert shared in cal and shared not in ev  # calibration wins a sentence both have
    cal_docs = {_doc_of(s) for s in cal if s != shared}
    ev_docs = {_doc_of(s) for s in ev}
    assert cal_docs and ev_docs and not cal_docs & ev_docs  # no document in both splits
    for d in ev_docs:  # and the split is the seeded hash of the document id
        assert tc.split_of(f"fake{int(d) % 3}:doc{d}", seed=0) == "evaluation"
    for name, text in (("calibration.txt", cal), ("evaluation.txt", ev)):
        data = "".join(f"{s}\n" for s in text).encode()
        assert manifest["sha256"][name] == hashlib.sha256(data).hexdigest()
    assert [p["name"] for p in manifest["packages"]] == ["fake0", "fake1", "fake2"]


def test_build_is_deterministic_and_seeded(tmp_path):
    outs = [tmp_path / "a", tmp_path / "b", tmp_path / "c"]
    for out, seed in zip(outs, (0, 0, 1), strict=True):
        tc.build_from_documents(_fake_documents(), out, seed, 50, 20, sources={"fake0": "1.0"})
    for name in ("calibration.txt", "evaluation.txt", "manifest.json"):
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes()
    assert (outs[0] / "evaluation.txt").read_bytes() != (outs[2] / "evaluation.txt").read_bytes()
    manifest = json.loads((outs[0] / "manifest.json").read_text())
    assert manifest["packages"][0] == {
        "name": "fake0",
        "version": "1.0",
        "sentences": manifest["packages"][0]["sentences"],
    }


def test_build_raises_on_too_few_sentences(tmp_path):
    with pytest.raises(ValueError, match=r"calibration \d+ \(need 2000\).*evaluation \d+"):
        tc.build_from_documents(_fake_documents(20), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.fixture
def built(monkeypatch) -> list:
    """``tc.build`` replaced by a build from the fake documents; lists the roots it built."""
    roots = []

    def fake_build(root):
        roots.append(root)
        return tc.build_from_documents(_fake_documents(), root, 0, 50, 20)

    monkeypatch.setattr(tc, "build", fake_build)
    return roots


def test_load_builds_and_rebuilds_a_damaged_corpus(tmp_path, built):
    cal = tc.load("calibration", tmp_path)
    assert len(built) == 1 and len(cal) >= 50
    assert tc.load("evaluation", tmp_path) and len(built) == 1  # intact: not rebuilt
    (tmp_path / "calibration.txt").write_text("Tampered with by hand, this file is.\n")
    assert tc.load("calibration", tmp_path) == cal and len(built) == 2
    with pytest.raises(ValueError, match="unknown split"):
        tc.load("train", tmp_path)


def test_load_rebuilds_a_corpus_built_by_other_rules(tmp_path, built, monkeypatch):
    tc.load("calibration", tmp_path)
    assert tc.is_current(tmp_path) and len(built) == 1
    monkeypatch.setattr(tc, "CALIBRATION_TARGET", tc.CALIBRATION_TARGET + 1)  # a new version
    assert not tc.is_current(tmp_path)
    tc.load("calibration", tmp_path)
    assert len(built) == 2 and tc.is_current(tmp_path)


@pytest.mark.slow  # ~25 s: parses the docstrings of the installed packages until 30,000 sentences
def test_real_build_from_installed_docs(tmp_path):
    manifest = tc.build(tmp_path)
    cal = tc.load("calibration", tmp_path)
    ev = tc.load("evaluation", tmp_path)
    assert len(cal) >= 2000 and len(ev) >= 1000
    assert manifest["counts"] == {"calibration": len(cal), "evaluation": len(ev)}
    assert not {s.lower() for s in cal} & {s.lower() for s in ev}
    assert all(tc.is_prose(s) for s in cal + ev)
    names = {p["name"] for p in manifest["packages"]}
    assert {"numpy", "torch"} <= names and all(p["version"] for p in manifest["packages"])


def test_sentences_differing_only_by_markup_or_punctuation_are_one_sentence():
    # Keyed by the lowercase form alone, "a -- b" and "a - b" (or ``x`` and x) sat in both
    # splits: two evaluation sentences had been calibrated on.
    splits = tc._Splits({"calibration": 10, "evaluation": 10})
    splits.add("calibration", "Call ``load()`` -- it reads the file back.", "a")
    splits.add("evaluation", "Call load() - it reads the file back", "b")
    splits.add("evaluation", "Größe und Maß sind zwei verschiedene Wörter hier.", "b")
    splits.add("evaluation", "Grösse und Mass sind zwei verschiedene Wörter hier.", "b")
    assert len(splits.sentences["calibration"]) == 1
    assert len(splits.sentences["evaluation"]) == 2  # other letters are other sentences
