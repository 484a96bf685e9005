"""Save/load integrity and every bad argument to sampling."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from netgen import random_cnn

import runtime
from runtime.inn.model import META_FILE, WEIGHTS_FILE, ModelFileError


@pytest.fixture(scope="module")
def inn():
    model, x = random_cnn(7)
    return runtime.convert(model, (x,))


@pytest.fixture
def saved(inn, tmp_path):
    return inn.save(tmp_path / "inn")


def _assert_safetensors(path):
    """A safetensors file: u64 header length, a JSON header of dtype/shape/offsets whose
    offsets tile the rest of the file exactly - no room for anything else."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    spans = sorted(v["data_offsets"] for k, v in header.items() if k != "__metadata__")
    assert spans and spans[0][0] == 0
    assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))
    assert 8 + n + spans[-1][1] == len(data)
    for k, v in header.items():
        if k != "__metadata__":
            assert set(v) == {"dtype", "shape", "data_offsets"}, k


def _assert_not_pickle_or_zip(path):
    head = path.read_bytes()[:4]
    assert not head.startswith(b"\x80"), f"{path} starts with a pickle protocol opcode"
    assert head != b"PK\x03\x04", f"{path} is a zip archive (torch.save's format)"


def test_no_pickle_in_saved_files(saved):
    # safetensors + JSON only: neither file can carry a pickle opcode stream.
    assert sorted(p.name for p in saved.iterdir()) == [META_FILE, WEIGHTS_FILE]
    json.loads((saved / META_FILE).read_text())
    _assert_safetensors(saved / WEIGHTS_FILE)
    for f in saved.rglob("*"):
        if f.is_file():
            _assert_not_pickle_or_zip(f)


def test_pickle_and_zip_checks_can_fail(tmp_path):
    import pickle

    import torch

    pickle_file, zip_file = tmp_path / "p.bin", tmp_path / "z.pt"
    pickle_file.write_bytes(pickle.dumps({"w": 1}))
    torch.save({"w": torch.zeros(2)}, zip_file)
    for f in (pickle_file, zip_file):
        with pytest.raises(AssertionError):
            _assert_not_pickle_or_zip(f)
    with pytest.raises((AssertionError, ValueError)):
        _assert_safetensors(zip_file)


def test_corrupted_weights_are_detected(saved):
    data = bytearray((saved / WEIGHTS_FILE).read_bytes())
    data[-5] ^= 0xFF
    (saved / WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="checksum"):
        runtime.load(saved)


def test_truncated_json_is_detected(saved):
    text = (saved / META_FILE).read_text()
    (saved / META_FILE).write_text(text[: len(text) // 2])
    with pytest.raises(ModelFileError, match="not valid JSON"):
        runtime.load(saved)


def test_weights_of_another_model_are_refused(saved, tmp_path):
    other_model, x = random_cnn(8)
    other = runtime.convert(other_model, (x,)).save(tmp_path / "other")
    (saved / WEIGHTS_FILE).write_bytes((other / WEIGHTS_FILE).read_bytes())
    with pytest.raises(ModelFileError, match="checksum"):
        runtime.load(saved)


def test_mismatched_shapes_are_detected_even_with_a_fixed_checksum(saved):
    meta = json.loads((saved / META_FILE).read_text())
    first = next(iter(meta["shapes"]))
    meta["shapes"][first] = [999]
    (saved / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ModelFileError, match="do not match"):
        runtime.load(saved)


@pytest.mark.parametrize("edit", ["group size", "module kwargs", "binding param"])
def test_an_edited_structure_is_refused_at_load(saved, edit):
    # Only the weights carry a checksum: a group's size halved loaded fine and sample(0.5)
    # resampled half of the rows; a module's size escaped as torch's RuntimeError.
    meta = json.loads((saved / META_FILE).read_text())
    if edit == "group size":
        group = next(g for g in meta["groups"] if not g["discrete"])
        group["size"] //= 2
        pattern = r"malformed: binding of .* cover \d+ channels, the tensor has shape"
    elif edit == "module kwargs":
        module = next(m for m in meta["architecture"]["modules"].values() if "kwargs" in m
                      and "out_channels" in m["kwargs"])  # fmt: skip
        module["kwargs"]["out_channels"] -= 1
        pattern = r"(?s)malformed: .*size mismatch"
    else:
        meta["bindings"][0]["param"] = "nope"
        pattern = r"malformed: 'nope'"
    (saved / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ModelFileError, match=pattern):
        runtime.load(saved)


def test_unknown_module_type_in_architecture_is_refused(saved):
    meta = json.loads((saved / META_FILE).read_text())
    name = next(iter(meta["architecture"]["modules"]))
    meta["architecture"]["modules"][name]["type"] = "os.system"
    (saved / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ModelFileError, match=r"only torch\.nn classes"):
        runtime.load(saved)


def test_missing_directory(tmp_path):
    with pytest.raises(ModelFileError, match="does not exist"):
        runtime.load(tmp_path / "nowhere")


@pytest.mark.parametrize("width", [0, -0.5, 1.5, math.nan, math.inf, "half", True])
def test_bad_width(inn, width):
    with pytest.raises(ValueError, match="width must be"):
        inn.sample(width)


def test_bad_group_name_and_counts(inn):
    g = inn.groups[0]
    with pytest.raises(ValueError, match="unknown group 'nope'"):
        inn.sample({"nope": 1})
    for bad in (0, g.size + 1, 2.5):
        with pytest.raises(
            ValueError, match=rf"group '{g.name}' must be an int in \[1, {g.size}\]"
        ):
            inn.sample({g.name: bad})


def test_bad_method_and_multiple(inn):
    with pytest.raises(ValueError, match="method must be one of"):
        inn.sample(0.5, method="bilinear")
    with pytest.raises(ValueError, match="multiple_of must be >= 1"):
        inn.sample(0.5, multiple_of=0)


def test_counts_mapping_resizes_only_named_group(inn):
    g = inn.groups[0]
    small = inn.sample({g.name: 1})
    sizes = {p: t.shape for p, t in small.state_dict().items()}
    member, dim = g.members[0]
    assert sizes[member][dim] == 1 * (inn.state[member].shape[dim] // g.size)
    # Every bound dim that does not carry the named group keeps its stored size.
    gi = inn.all_groups.index(g)
    untouched = [b for b in inn.bindings if all(s.group != gi for s in b.layout)]
    assert untouched
    for b in untouched:
        assert sizes[b.param][b.dim] == inn.state[b.param].shape[b.dim], b


def test_multiple_of_rounds_channel_counts(inn):
    sizes = inn.sizes(0.4, multiple_of=4)
    for g in inn.groups:
        assert sizes[g.name] % 4 == 0 or sizes[g.name] == g.size or g.size < 4


@torch.no_grad()
def test_sample_is_eval_mode_and_deterministic(inn):
    a, b = inn.sample(0.6), inn.sample(0.6)
    assert not a.training
    x = torch.randn(2, 2, 8, 8)
    assert torch.equal(a(x), b(x))
