"""model.yaml values refused when the file is read, naming the field (review helper-304,
mutations Y01, Y05 and Y07: each was accepted, and refused later at build - or never - with
a worse message)."""

from __future__ import annotations

import re

import pytest

from runtime.configspec import ConfigError
from runtime.repository.config import ModelConfig

MINIMAL = {
    "inputs": [{"name": "x", "shape": [4]}],
    "outputs": [{"name": "y", "shape": [2]}],
    "tiers": [{"name": "w100", "width": 1.0}, {"name": "w050", "width": 0.5}],
}
# The one error format (tests/test_config.py): <file>: <field>: got <value>, expected <allowed>
FORMAT = re.compile(r"^(?P<file>[^:]+): (?P<field>[^:]+): got (?P<value>.+), expected (?P<exp>.+)$")


@pytest.mark.parametrize(
    ("patch", "field", "value", "expected"),
    [
        # Y01: a width of 0 keeps no channel of any group
        ({"tiers": [{"name": "w000", "width": 0}]}, "tiers[0].width", "0", "a number in (0, 1]"),
        ({"tiers": [{"name": "w000", "width": 0.0}]}, "tiers[0].width", "0.0",
         "a number in (0, 1]"),
        # Y07: a kind's fraction above 1 asks for more heads / ffn channels than there are
        ({"tiers": [{"name": "h", "width": {"heads": 1.5}}]}, "tiers[0].width.heads", "1.5",
         "a fraction in (0, 1]"),
        ({"tiers": [{"name": "h", "width": {"heads": 0.5, "ffn": 2.0}}]},
         "tiers[0].width.ffn", "2.0", "a fraction in (0, 1]"),
        # Y05: candidates timed at a batch the engines are not built for
        ({"max_batch": 8, "channel_search": {"batch": 9}}, "channel_search.batch", "9",
         "a batch size <= max_batch (8) or null"),
        ({"max_batch": 8, "channel_search": {"batch": 16}}, "channel_search.batch", "16",
         "a batch size <= max_batch (8) or null"),
    ],
    ids=["Y01-width-0", "Y01-width-0.0", "Y07-heads-1.5", "Y07-ffn-2.0", "Y05-batch-9",
         "Y05-batch-16"],
)  # fmt: skip
def test_a_value_out_of_range_is_refused_naming_its_field(patch, field, value, expected):
    with pytest.raises(ConfigError) as err:
        ModelConfig.from_dict({**MINIMAL, **patch}, source="model.yaml")
    m = FORMAT.match(str(err.value))
    assert m, f"not in the one error format: {err.value}"
    assert (m["file"], m["field"], m["value"]) == ("model.yaml", field, value)
    assert m["exp"].startswith(expected), m["exp"]


def test_the_bounds_themselves_are_accepted():
    cfg = ModelConfig.from_dict({
        **MINIMAL, "max_batch": 8, "channel_search": {"batch": 8},
        "tiers": [{"name": "w100", "width": 1}, {"name": "h", "width": {"heads": 1, "ffn": 1}}],
    }, source="model.yaml")  # fmt: skip
    assert cfg.channel_search.batch == 8
    assert [t.width for t in cfg.tiers] == [1.0, {"heads": 1.0, "ffn": 1.0}]
