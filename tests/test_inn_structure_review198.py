"""Tiers follow the INN's network, not only its weights (review 198): the channel order is
decided from the weights alone, so the same weights converted under another forward
(relu -> tanh) saved an INN with the same weights hash - the build kept the old tiers and
failed validating them against the new network ("differs from the torch sample", every
rebuild), and a server loaded and served the old network under the new one's name."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
import yaml
from torch import nn

import runtime
from runtime.build.pipeline import build_model
from runtime.repository import Repository
from runtime.repository.errors import RepositoryError
from runtime.repository.frontier import Frontier
from runtime.repository.records import TIER_FILE, InnPrint, TierRecord
from runtime.repository.store import _same_inn_as


class Net(nn.Module):
    def __init__(self, act: str):
        super().__init__()
        self.act, self.a, self.b = act, nn.Linear(12, 40), nn.Linear(40, 5)

    def forward(self, x):
        h = self.a(x)
        return self.b(torch.relu(h) if self.act == "relu" else torch.tanh(h))


CONFIG = {
    "inputs": [{"name": "input", "dtype": "float32", "shape": [12]}],
    "outputs": [{"name": "logits", "dtype": "float32", "shape": [5]}],
    "tiers": [{"name": "w100", "width": 1.0}, {"name": "w050", "width": 0.5}],
    "max_batch": 4,
    "backends": ["onnxruntime"],
}


def _w100(root, x):
    onnx = root / "mlp" / "tiers" / "w100" / "model.onnx"
    return ort.InferenceSession(str(onnx)).run(None, {"input": x.numpy()})[0]


def test_the_same_weights_under_another_network_are_built_and_served_anew(tmp_path):
    torch.manual_seed(0)
    relu = Net("relu").eval()
    d = tmp_path / "mlp"
    runtime.convert(relu, (torch.randn(2, 12),), progress=False).save(d)
    (d / "model.yaml").write_text(yaml.safe_dump(CONFIG))
    build_model(Repository(tmp_path), "mlp", progress=False, profile=False)
    weights = TierRecord.read(d / "tiers" / "w100" / TIER_FILE).inn_sha256

    tanh = Net("tanh").eval()
    tanh.load_state_dict(relu.state_dict())
    runtime.convert(tanh, (torch.randn(2, 12),), progress=False).save(d)
    with pytest.raises(RepositoryError, match=r"sampled from another network than .* converted"):
        Repository(tmp_path).load("mlp")  # the old tiers are not served under the new INN

    report = build_model(Repository(tmp_path), "mlp", progress=False, profile=False)
    assert all(t.exported for t in report.tiers)
    record = TierRecord.read(d / "tiers" / "w100" / TIER_FILE)
    assert record.inn_sha256 == weights and record.inn_structure_sha256 is not None
    x = torch.randn(3, 12)
    with torch.no_grad():
        np.testing.assert_allclose(_w100(tmp_path, x), tanh(x).numpy(), atol=1e-5)
    served = Repository(tmp_path).load("mlp")
    try:
        assert set(served.tiers) == {"w100", "w050"}
    finally:
        for engine in served.engines.values():
            engine.close()
    # a second build keeps what the first wrote
    again = build_model(Repository(tmp_path), "mlp", progress=False, profile=False)
    assert not any(t.exported for t in again.tiers)


def test_a_record_from_before_the_structure_was_kept_is_adopted_not_refused(tmp_path):
    """Tiers built by an older innfer have no inn_structure_sha256: they load as before, and
    the next build records it without exporting them again."""
    torch.manual_seed(0)
    d = tmp_path / "mlp"
    runtime.convert(Net("relu").eval(), (torch.randn(2, 12),), progress=False).save(d)
    (d / "model.yaml").write_text(yaml.safe_dump(CONFIG))
    build_model(Repository(tmp_path), "mlp", progress=False, profile=False)
    for tier in ("w100", "w050"):
        path = d / "tiers" / tier / TIER_FILE
        record = TierRecord.read(path)
        TierRecord(**{**record.__dict__, "inn_structure_sha256": None}).write(path)
    served = Repository(tmp_path).load("mlp")
    for engine in served.engines.values():
        engine.close()
    report = build_model(Repository(tmp_path), "mlp", progress=False, profile=False)
    assert not any(t.exported for t in report.tiers)
    assert TierRecord.read(d / "tiers" / "w100" / TIER_FILE).inn_structure_sha256


def test_a_frontier_of_another_network_is_refused():
    """The frontier's check (``Repository.check_frontier_inn``) is the tiers': each
    fingerprint it records must match; one it does not record is not compared."""

    now = InnPrint("w", "s")
    assert _same_inn_as(now, Frontier([], "flops", "src", "ort", "cpu", 1, 8, inn_sha256="w"))
    other = Frontier([], "flops", "src", "ort", "cpu", 1, 8, inn_sha256="w",
                     inn_structure_sha256="t")  # fmt: skip
    assert not _same_inn_as(now, other)
