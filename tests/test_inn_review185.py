"""The INN library's edges found by review 185: a group named like a kind, a malformed
inn.json field, optimizer state a checkpoint could not hold, calibrated() against a
partial mapping, a full-width tier, a kind the model lacks, and one discrete name given as
a string. Tiny networks, real conversion."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import runtime
from runtime.inn.model import ModelFileError, load
from runtime.inn.train import TrainableINN, load_checkpoint, save_checkpoint
from runtime.repository.config import ModelConfig


class _Named(nn.Module):
    """One hidden layer whose attribute name is a kind's."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        setattr(self, name, nn.Linear(8, 32))
        self.out = nn.Linear(32, 3)

    def forward(self, x):
        return self.out(torch.relu(getattr(self, self.name)(x)))


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(),
                         nn.Linear(24, 3)).eval()  # fmt: skip


@pytest.mark.parametrize("name", ["ffn", "heads"])
def test_a_group_named_like_a_kind_takes_counts(name):
    """``sizes`` returns {name: 16}; given back, it was read as a kind's fraction and every
    tier of such a model failed with "width must be in (0, 1], got 16"."""
    torch.manual_seed(0)
    inn = runtime.convert(_Named(name).eval(), (torch.randn(2, 8),))
    assert [g.name for g in inn.groups] == [name]
    sizes = inn.sizes(0.5)
    assert sizes == {name: 16} and inn.sizes(sizes) == sizes
    key = inn.set_tier(sizes, inn.sample(sizes).state_dict())
    assert inn.calibrated(sizes) and key in inn.tiers
    with pytest.raises(ValueError, match=f"count for group '{name}' must be an int"):
        inn.sizes({name: 0.5})  # a group's name is a group's: a count, not a fraction
    # model.yaml: a whole number >= 2 is a count, whatever the key; fractions stay kinds
    tiers = [{"name": "w100", "width": 1.0}, {"name": "c16", "width": {name: 16}}]
    cfg = ModelConfig.from_dict(
        {"inputs": [{"name": "x", "shape": [8]}], "outputs": [{"name": "y", "shape": [3]}],
         "tiers": tiers}, source="model.yaml",
    )  # fmt: skip
    assert cfg.tiers[1].width == {name: 16}
    kinds = ModelConfig.from_dict(
        {"inputs": [{"name": "x", "shape": [8]}], "outputs": [{"name": "y", "shape": [3]}],
         "tiers": [tiers[0], {"name": "h50", "width": {"heads": 0.5, "ffn": 1}}]},
        source="model.yaml",
    )  # fmt: skip
    assert kinds.tiers[1].width == {"heads": 0.5, "ffn": 1.0}


def test_a_kind_the_model_lacks_is_refused_not_served_at_full_width():
    inn = runtime.convert(_mlp(), (torch.randn(2, 8),))
    with pytest.raises(ValueError, match=r"no groups of kind \['heads'\].*\['ffn'\]"):
        inn.sizes({"heads": 0.25})
    # model.yaml reads {heads: 4} as a count; with no group of that name, it is said
    with pytest.raises(ValueError, match=r"'heads' is a kind of group here .* not 4"):
        inn.sizes({"heads": 4})
    assert inn.sizes({"heads": 1.0, "ffn": 0.5}) == inn.sizes(0.5)  # 1.0: nothing to cut


def test_calibrated_answers_for_the_groups_a_partial_mapping_leaves_out():
    inn = runtime.convert(_mlp(), (torch.randn(2, 8),))
    partial = {"0": 16}  # group "2" keeps its full size
    inn.set_tier(partial, inn.sample(partial).state_dict())
    assert inn.calibrated(partial) and inn.calibrated(inn.sizes(partial))


def test_the_full_width_cannot_be_stored_as_a_tier():
    """sample(1.0) served it: the source model was gone."""
    inn = runtime.convert(_mlp(), (torch.randn(2, 8),))
    full = inn.sample(1.0).state_dict()
    with pytest.raises(ValueError, match="full width is the source model"):
        inn.set_tier(inn.sizes(1.0), {k: v + 1 for k, v in full.items()})
    assert not inn.tiers


def test_one_discrete_name_as_a_string_is_that_module():
    """``discrete="2"`` was the set of its characters; "20" fixed modules 2 and 0."""
    net = _mlp()
    x = (torch.randn(2, 8),)
    assert [g.name for g in runtime.convert(net, x).groups] == ["0", "2"]
    assert [g.name for g in runtime.convert(net, x, discrete="2").groups] == ["0"]
    with pytest.raises(ValueError, match=r"unknown modules \['20'\]"):
        runtime.convert(net, x, discrete="20")


def test_an_inn_json_field_of_another_type_is_a_model_file_error(tmp_path):
    inn = runtime.convert(_mlp(), (torch.randn(2, 8),))
    inn.save(tmp_path)
    meta = json.loads((tmp_path / "inn.json").read_text())
    meta["architecture"] = "x"  # AttributeError: 'str' object has no attribute 'get'
    (tmp_path / "inn.json").write_text(json.dumps(meta))
    with pytest.raises(ModelFileError, match="is malformed"):
        load(tmp_path)


def test_a_deeply_nested_inn_json_is_a_model_file_error(tmp_path):
    """A bare RecursionError before (review 198); the repository's own read of the file
    already said what was wrong."""
    runtime.convert(_mlp(), (torch.randn(2, 8),)).save(tmp_path)
    (tmp_path / "inn.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ModelFileError, match="is not valid JSON"):
        load(tmp_path)


def _closure(model, opt, x, y):
    def step():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x, 0.5), y)
        loss.backward()
        return loss

    return step


def test_an_lbfgs_checkpoint_resumes_exactly(tmp_path):
    """LBFGS keeps lists (its history, at first [None] * history_size) in its state:
    save_checkpoint failed on float(list)."""
    inn = runtime.convert(_mlp(), (torch.randn(2, 8),))
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    model = TrainableINN(inn)
    opt = torch.optim.LBFGS(model.parameters(), history_size=4)
    for _ in range(2):
        opt.step(_closure(model, opt, x, y))
    save_checkpoint(tmp_path, model, opt, {"epoch": 0})
    other = TrainableINN(inn)
    opt2 = torch.optim.LBFGS(other.parameters(), history_size=4)
    load_checkpoint(tmp_path, other, opt2)
    for m, o in ((model, opt), (other, opt2)):
        o.step(_closure(m, o, x, y))
    for a, b in zip(model.nodes, other.nodes, strict=True):
        assert torch.equal(a, b)


def test_optimizer_state_a_checkpoint_cannot_hold_is_named(tmp_path):
    inn = runtime.convert(_mlp(), (torch.randn(2, 8),))
    model = TrainableINN(inn)
    opt = torch.optim.SGD(model.parameters(), 0.1)
    opt.state[model.nodes[0]]["note"] = "text"
    with pytest.raises(ValueError, match="'note' is a str: a checkpoint holds numbers"):
        save_checkpoint(tmp_path, model, opt, {"epoch": 0})
