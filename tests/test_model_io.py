"""Save/load integrity and every bad argument to sampling."""

from __future__ import annotations

import itertools
import json
import math
import re

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


@pytest.mark.parametrize("shapes", ["absent", [], "x"])
def test_a_record_of_shapes_that_is_no_object_is_malformed(saved, shapes):
    # "internal error: KeyError: 'shapes'" (or an AttributeError of a list) in every command
    meta = json.loads((saved / META_FILE).read_text())
    if shapes == "absent":
        del meta["shapes"]
    else:
        meta["shapes"] = shapes
    (saved / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ModelFileError, match=r"is malformed: shapes is .*, not an object"):
        runtime.load(saved)


@pytest.mark.parametrize("edit", ["group size", "module kwargs", "binding param"])
def test_an_edited_structure_is_refused_at_load(saved, edit):
    # Only the weights carry a checksum: a group's size halved loaded fine and sample(0.5)
    # resampled half of the rows; a module's size escaped as torch's RuntimeError.
    meta = json.loads((saved / META_FILE).read_text())
    if edit == "group size":
        group = next(g for g in meta["groups"] if not g["discrete"])
        group["size"] //= 2
        pattern = (
            r"malformed in its groups' sizes against the weights: binding of .* "
            r"cover \d+ channels, the tensor has shape"
        )
    elif edit == "module kwargs":
        module = next(m for m in meta["architecture"]["modules"].values() if "kwargs" in m
                      and "out_channels" in m["kwargs"])  # fmt: skip
        module["kwargs"]["out_channels"] -= 1
        pattern = r"(?s)malformed in its architecture against the weights: .*size mismatch"
    else:
        meta["bindings"][0]["param"] = "nope"
        pattern = r"malformed in its .*: 'nope' is missing"
    (saved / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ModelFileError, match=pattern):
        runtime.load(saved)


@pytest.mark.parametrize(
    ("edit", "said"),
    [
        ("groups", "malformed in its groups: 'int' object is not iterable"),
        ("members", "malformed in its groups: 'members' is missing"),
        ("bindings", "malformed in its bindings: 'NoneType' object is not iterable"),
        ("sha", "malformed: weights_sha256 is None, not a sha256 hex digest"),
    ],
)
def test_a_hand_edited_record_says_where_it_is_malformed(saved, edit, said):
    # "is malformed: 'members'" named no place, and weights_sha256 null blamed the weights
    # file for the record's fault (review helper-219)
    meta = json.loads((saved / META_FILE).read_text())
    if edit == "groups":
        meta["groups"] = 5
    elif edit == "members":
        del meta["groups"][0]["members"]
    elif edit == "bindings":
        meta["bindings"] = None
    else:
        meta["weights_sha256"] = None
    (saved / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ModelFileError, match=re.escape(said)):
        runtime.load(saved)


def test_unknown_module_type_in_architecture_is_refused(saved):
    meta = json.loads((saved / META_FILE).read_text())
    name = next(iter(meta["architecture"]["modules"]))
    meta["architecture"]["modules"][name]["type"] = "os.system"
    (saved / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ModelFileError, match=r"only torch\.nn classes"):
        runtime.load(saved)


def _node(name, op, target, *args):
    return {"name": name, "op": op, "target": target, "args": {"tuple": list(args)},
            "kwargs": {"dict": {}}}  # fmt: skip


_EXEC_CHAIN = [  # getattr(x, "__class__").__repr__.__globals__["__builtins__"]["exec"](...)
    _node("c", "call_function", "builtins.getattr", {"node": "X"}, "__class__"),
    _node("r", "call_function", "builtins.getattr", {"node": "c"}, "__repr__"),
    _node("g", "call_function", "builtins.getattr", {"node": "r"}, "__globals__"),
    _node("b", "call_function", "operator.getitem", {"node": "g"}, "__builtins__"),
    _node("e", "call_function", "operator.getitem", {"node": "b"}, "exec"),
    _node("run", "call_method", "__call__", {"node": "e"}, "open(MARKER, 'w').write('ran')"),
]


@pytest.mark.parametrize(
    "nodes, says",
    [
        (_EXEC_CHAIN, r"getattr of \('__class__',\): only public attributes"),
        ([_node("run", "call_method", "__call__", {"node": "X"})],
         r"'__call__' is not a public torch.Tensor method"),
        ([_node("s", "call_function", "torch.save", {"node": "X"}, "/tmp/x")],
         r"unknown function 'torch.save'"),
        ([_node("s", "call_function", "torch.load", "/tmp/x")], r"unknown function 'torch.load'"),
        ([_node("a", "call_function", "operator.attrgetter", "__class__")],
         r"'operator.attrgetter' cannot be named"),
        ([_node("a", "get_attr", "forward.__globals__")], r"is not a stored attribute"),
        ([_node("t", "call_function", "torch.set_default_dtype", "X")],
         r"unknown function 'torch.set_default_dtype'"),
        ([_node("t", "call_function", "torch.set_num_threads", 1)],
         r"unknown function 'torch.set_num_threads'"),
        ([_node("t", "call_function", "torch.compile", {"node": "X"})],
         r"unknown function 'torch.compile'"),
        ([_node("m", "call_module", "nowhere", {"node": "X"})], r"is not a stored module"),
    ],
)  # fmt: skip
def test_an_architecture_that_reaches_beyond_tensor_operations_is_refused(
    saved, tmp_path, nodes, says
):
    # inn.json is not checksummed: a chain of allowed calls (getattr of dunders, an
    # operator.getitem, a call_method "__call__") ran exec when the sampled model was
    # called - which innfer build does before exporting - and torch.save wrote anywhere.
    marker = tmp_path / "ran"
    meta = json.loads((saved / META_FILE).read_text())
    graph = meta["architecture"]["nodes"]
    text = json.dumps(nodes).replace('"X"', json.dumps(graph[0]["name"]))
    graph[1:1] = json.loads(text.replace("MARKER", repr(str(marker))))
    (saved / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ModelFileError, match=says):
        runtime.load(saved).sample(0.5)(torch.randn(1, 3, 8, 8))
    assert not marker.exists()


@pytest.mark.parametrize(
    "name",
    ["operator.__or__", "operator.__and__", "operator.__not__", "operator.__add__",
     "torch.nn.functional._threshold", "torch._assert", "torch._sym_sqrt"],
)  # fmt: skip
def test_names_saved_before_the_allow_list_still_resolve(name):
    # Saves named each function by the first of its names dir() listed - dunder and private
    # aliases first: operator.__or__ for operator.or_ (a boolean mask's |), F._threshold for
    # F.threshold. Models with | & not or F.threshold failed to load after the allow-list.
    from runtime.inn import graphio

    prefix, _, attr = name.rpartition(".")
    assert graphio._resolve_function(name) is getattr(graphio._NAMESPACES[prefix], attr)


def test_a_model_stored_in_double_or_bfloat16_samples_in_its_dtype(tmp_path):
    # Leaf modules were rebuilt in float32 while free parameters kept their dtype: a
    # float64 or bfloat16 model failed at sample(1.0) ("mat1 and mat2 must have the same
    # dtype") or, without free parameters, silently became float32.
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(8, 16), torch.nn.Linear(16, 3)
            self.gamma = torch.nn.Parameter(torch.rand(16) + 0.5)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)) * self.gamma)

    torch.manual_seed(0)
    for dtype in (torch.float64, torch.bfloat16):
        net = Net().to(dtype).eval()
        x = torch.randn(4, 8, dtype=dtype)
        loaded = runtime.load(runtime.convert(net, (x,)).save(tmp_path / str(dtype)))
        full = loaded.sample(1.0)
        assert {p.dtype for p in full.parameters()} == {dtype}
        with torch.no_grad():
            torch.testing.assert_close(full(x), net(x))
            assert loaded.sample(0.5)(x).dtype == dtype


def test_missing_directory(tmp_path):
    # It asked "is ... a directory written by save()?" - a Python name, no fix for a user
    # of the CLI (`innfer report <repository>`; review helper-149).
    with pytest.raises(ModelFileError, match=r"does not exist: give a model's folder"):
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
    with pytest.raises(ValueError, match="multiple_of must be an int >= 1"):
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
def test_full_width_keeps_every_channel_whatever_multiple_of():
    # 10 channels with multiple_of=8: rounding 1.0 x 10 to the nearest multiple gives 8, so
    # without full width's own case the "full" tier silently dropped 2 channels.
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 10), torch.nn.ReLU(), torch.nn.Linear(10, 12), torch.nn.ReLU(),
        torch.nn.Linear(12, 3),
    ).eval()  # fmt: skip
    x = torch.randn(5, 6)
    inn = runtime.convert(model, (x,))
    full = {g.name: g.size for g in inn.groups}
    assert sorted(full.values()) == [10, 12]  # 10 is not a multiple of 8
    assert inn.sizes(1.0, multiple_of=8) == full
    assert inn.sizes(0.5, multiple_of=8) != full  # (rounding does apply below full width)
    torch.testing.assert_close(inn.sample(1.0, multiple_of=8)(x), model(x))


@torch.no_grad()
def test_sample_is_eval_mode_and_deterministic(inn):
    a, b = inn.sample(0.6), inn.sample(0.6)
    assert not a.training
    x = torch.randn(2, 2, 8, 8)
    assert torch.equal(a(x), b(x))


def test_a_save_puts_both_files_on_the_disk_before_renaming_them(inn, tmp_path, monkeypatch):
    # IntegralModel.save renamed files it had never synced: after a power loss the names
    # could point at empty files (ext4, xfs), and the INN a calibration or a training run
    # made was lost (review helper-150). What was synced, and when, relative to the renames:
    import os

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("sync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("rename", str(src)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    d = inn.save(tmp_path / "inn")
    renamed = [path for what, path in events if what == "rename"]
    assert len(renamed) == 2
    for path in renamed:  # each file synced before its rename
        assert events.index(("sync", path)) < events.index(("rename", path))
    assert events[-1] == ("sync", str(d.resolve()))  # and the directory after them
    runtime.load(d)
