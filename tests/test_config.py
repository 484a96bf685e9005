"""Config idiom (runtime/configspec.py) as used by model.yaml and the server config.

Every field is declared once (default, bounds, doc), the parser is derived from the
declarations, names of backends and policies come from their owners, and checks across
fields refuse a config when it is read rather than when a model is built or loaded.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from runtime.configspec import ConfigError, Where, describe, parse, reference, spec, to_dict
from runtime.engines import BACKENDS
from runtime.repository.config import (
    FP16_BACKENDS,
    ChannelSearchConfig,
    EvaluationConfig,
    ModelConfig,
    TensorConfig,
    TierConfig,
)
from server.config import AuthConfig, ServerConfig, TLSConfig, safe_dump
from server.scheduling import POLICIES

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
MODEL_YAMLS = sorted(DEPLOY.rglob("*.model.yaml"))
SERVER_YAMLS = sorted(DEPLOY.glob("k8s/**/server.yaml"))
CLASSES = [ModelConfig, TensorConfig, TierConfig, EvaluationConfig, ChannelSearchConfig,
           ServerConfig, TLSConfig, AuthConfig]  # fmt: skip
# The one error format: <file>: <field>: got <value>, expected <allowed>
FORMAT = re.compile(r"^(?P<file>[^:]+): (?P<field>[^:]+): got (?P<value>.+), expected (?P<exp>.+)$")

MINIMAL = {
    "inputs": [{"name": "x", "shape": [4]}],
    "outputs": [{"name": "y", "shape": [2]}],
    "tiers": [{"name": "w100", "width": 1.0}, {"name": "w050", "width": 0.5}],
}


def _model(**patch) -> ModelConfig:
    return ModelConfig.from_dict({**MINIMAL, **patch}, source="model.yaml")


def _refused(fn, *args, **kw) -> re.Match:
    with pytest.raises(ConfigError) as err:
        fn(*args, **kw)
    m = FORMAT.match(str(err.value))
    assert m, f"not in the one error format: {err.value}"
    return m


# --- every default declared once -------------------------------------------------------------


def test_model_defaults_come_from_the_dataclass():
    cfg = ModelConfig.from_dict(MINIMAL, source="model.yaml")
    by_hand = ModelConfig(
        inputs=(TensorConfig(name="x", shape=(4,)),),
        outputs=(TensorConfig(name="y", shape=(2,)),),
        tiers=(TierConfig(name="w100", width=1.0), TierConfig(name="w050", width=0.5)),
    )
    assert cfg == by_hand
    assert cfg.inputs[0].dtype == "float32" and cfg.backends == ("onnxruntime",)
    ev = ModelConfig.from_dict({**MINIMAL, "evaluation": {"dataset": "d"}}).evaluation
    assert ev == EvaluationConfig(dataset="d")


def test_server_defaults_come_from_the_dataclass():
    assert ServerConfig.from_dict({"repository": "m"}) == ServerConfig(repository=Path("m"))
    assert ServerConfig.load  # the file path goes through the same from_dict


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_every_field_is_declared_with_a_doc(cls):
    # parse() refuses a field not made with spec(); describe() shows what users read.
    for f in dataclasses.fields(cls):
        assert f.metadata["innfer.spec"].doc.strip(), f"{cls.__name__}.{f.name}"
    rows = describe(cls)
    # (not read from the file: ``source``, ``auto_tiers_empty``)
    keys = {f.name for f in dataclasses.fields(cls) if f.metadata["innfer.spec"].key}
    assert "source" not in keys
    assert keys <= {r.key for r in rows}
    assert all(r.doc and r.allowed and r.default for r in rows)


def test_reference_lists_every_key_with_default_and_doc():
    text = reference(ModelConfig)
    assert "max_batch: 8" in text and "an integer in [1, 4096]" in text
    assert "tiers[].width: (required)" in text
    assert "tls.client_ca: null" in reference(ServerConfig)


def test_reference_comments_start_where_a_terminal_shows_them():
    # One long default (limits', 3 lines of YAML) padded every key's line to column 272,
    # a screen of blanks between each key and its meaning (review helper-225).
    from runtime.configspec import REFERENCE_COLUMN

    for cls in (ServerConfig, ModelConfig):
        starts = {line.index("  # ") for line in reference(cls).splitlines() if "  # " in line}
        assert max(starts) <= REFERENCE_COLUMN + 2, (cls.__name__, sorted(starts)[-3:])
        assert "repository: (required)" + " " * 10 in reference(ServerConfig)  # still lined up


def test_a_field_without_spec_is_a_programming_error():
    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Bare:
        n: int = 1

    with pytest.raises(TypeError, match="spec"):
        parse(Bare, {}, Where("x.yaml"))


def test_generic_parse_on_a_new_class():
    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Pool:
        size: int = spec(4, lo=1, hi=64, doc="workers")
        ratio: float = spec(0.5, lo=0, hi=1, lo_open=True, doc="share")
        tags: tuple[str, ...] = spec((), choices=("a", "b"), unique=True, doc="tags")
        on: bool = spec(True, doc="switch")

    assert parse(Pool, {}, Where("p.yaml")) == Pool()
    assert parse(Pool, {"tags": ["a", "b"], "on": False}, Where("p.yaml")).tags == ("a", "b")
    m = _refused(parse, Pool, {"ratio": 0}, Where("p.yaml"))
    assert (m["field"], m["value"], m["exp"]) == ("ratio", "0", "a number in (0, 1]")
    assert _refused(parse, Pool, {"tags": ["c"]}, Where("p.yaml"))["field"] == "tags[0]"
    assert _refused(parse, Pool, {"on": "yes"}, Where("p.yaml"))["exp"] == "true or false"
    assert to_dict(Pool(tags=("a",))) == {"size": 4, "ratio": 0.5, "tags": ["a"], "on": True}


# --- unknown keys ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("load", "data", "field", "suggestion"),
    [
        ("model", {**MINIMAL, "max_btach": 4}, "max_btach", "max_batch"),
        ("model", {**MINIMAL, "precison": "fp32"}, "precison", "precision"),
        ("model", {**MINIMAL, "evaluation": {"dataset": "d", "limt": 5}}, "evaluation.limt",
         "limit"),
        ("model", {**MINIMAL, "tiers": [{"name": "a", "widht": 1}]}, "tiers[0].widht", "width"),
        ("server", {"repository": "m", "gprc_port": 1}, "gprc_port", "grpc_port"),
        ("server", {"repository": "m", "auth": {"bearer_tokn": "x" * 9}}, "auth.bearer_tokn",
         "bearer_token"),
    ],
)  # fmt: skip
def test_unknown_key_is_refused_with_a_suggestion(load, data, field, suggestion):
    fn = ModelConfig.from_dict if load == "model" else ServerConfig.from_dict
    m = _refused(fn, data, source=f"{load}.yaml")
    assert m["field"] == field
    assert m["exp"] == f"a known field (did you mean {suggestion!r}?)"


def test_unknown_key_without_a_near_one_lists_the_known_fields():
    m = _refused(ServerConfig.from_dict, {"repository": "m", "zzz": 1}, source="s.yaml")
    assert "grpc_port" in m["exp"] and "repository" in m["exp"]


# --- values out of range ---------------------------------------------------------------------


def test_a_kinds_width_may_ask_to_be_shaped():
    cfg = _model(tiers=[{"name": "h50", "width": {"heads": 0.5, "ffn": 0.25, "shaped": True}}])
    assert cfg.tiers[0].width == {"heads": 0.5, "ffn": 0.25, "shaped": True}
    cfg = _model(tiers=[{"name": "h50", "width": {"heads": 1, "shaped": False}}])
    assert cfg.tiers[0].width == {"heads": 1.0, "shaped": False}


def test_a_width_mixing_kind_fractions_and_counts_says_so():
    # {heads: 0.5, ffn: 2} blamed the valid 0.5 ("expected a positive channel count")
    for width in ({"heads": 0.5, "ffn": 2}, {"heads": 2, "ffn": 0.5}):
        m = _refused(_model, tiers=[{"name": "t", "width": width}])
        assert "fractions for kinds" in m["exp"] and "not both" in m["exp"], m
    assert _model(tiers=[{"name": "t", "width": {"ffn": 16}}]).tiers[0].width == {"ffn": 16}


@pytest.mark.parametrize(
    ("patch", "field", "value"),
    [
        ({"max_batch": 0}, "max_batch", "0"),
        ({"max_batch": 5000}, "max_batch", "5000"),
        ({"max_batch": 2.5}, "max_batch", "2.5"),
        ({"max_batch": True}, "max_batch", "True"),
        ({"threads": 0}, "threads", "0"),
        ({"multiple_of": 512}, "multiple_of", "512"),
        ({"max_queue": 0}, "max_queue", "0"),
        ({"default_latency_budget_ms": 0}, "default_latency_budget_ms", "0"),
        ({"default_latency_budget_ms": float("nan")}, "default_latency_budget_ms", "nan"),
        ({"precision": "int8"}, "precision", "'int8'"),
        ({"method": "nearest"}, "method", "'nearest'"),
        ({"backends": []}, "backends", "[]"),
        ({"backends": ["onnx"]}, "backends[0]", "'onnx'"),
        ({"tiers": [{"name": "w", "width": 1.5}]}, "tiers[0].width", "1.5"),
        ({"tiers": [{"name": "w", "width": {"conv1": 0}}]}, "tiers[0].width.conv1", "0"),
        # no group named: every group at full size - the full tier under another name
        ({"tiers": [{"name": "w", "width": {}}]}, "tiers[0].width", "{}"),
        ({"tiers": [{"name": "w", "width": {"heads": 0.5, "shaped": 1}}]},
         "tiers[0].width.shaped", "1"),
        ({"tiers": [{"name": "w", "width": {"heads": 0.5, "shape": True}}]}, "tiers[0].width",
         "{'heads': 0.5, 'shape': True}"),
        ({"tiers": [{"name": "bad name", "width": 1}]}, "tiers[0].name", "'bad name'"),
        # "$" matched before a trailing newline: it became a directory "tiers/w100\n"
        ({"tiers": [{"name": "w100\n", "width": 1}]}, "tiers[0].name", "'w100\\n'"),
        ({"inputs": [{"name": "x", "shape": [0]}]}, "inputs[0].shape[0]", "0"),
        ({"inputs": [{"name": "x", "dtype": "complex", "shape": [1]}]}, "inputs[0].dtype",
         "'complex'"),
        ({"evaluation": {"dataset": "d", "limit": 0}}, "evaluation.limit", "0"),
        # neither a data set nor a text file: nothing to score on
        ({"evaluation": {"limit": 5}}, "evaluation",
         "{'dataset': None, 'text': None, 'limit': 5}"),
    ],
)  # fmt: skip
def test_model_value_out_of_range_names_field_and_value(patch, field, value):
    m = _refused(_model, **patch)
    assert (m["file"], m["field"], m["value"]) == ("model.yaml", field, value)


@pytest.mark.parametrize(
    ("patch", "field", "value"),
    [
        ({"grpc_port": 70000}, "grpc_port", "70000"),
        ({"metrics_port": -1}, "metrics_port", "-1"),
        ({"max_message_bytes": 10}, "max_message_bytes", "10"),
        # below twice an answer's 64 KiB frame reserve every inference was refused
        ({"max_message_bytes": 50_000}, "max_message_bytes", "50000"),
        ({"max_message_bytes": 2**31}, "max_message_bytes", str(2**31)),
        ({"grace_period_s": 4000}, "grace_period_s", "4000"),
        ({"budget_margin_ms": 10_000}, "budget_margin_ms", "10000"),
        ({"host": ""}, "host", "''"),
        ({"backend": "onnx"}, "backend", "'onnx'"),
        ({"policy": "fastest"}, "policy", "'fastest'"),
        ({"models": ["a b"]}, "models[0]", "'a b'"),
        ({"models": "mnist"}, "models", "'mnist'"),
        ({"tls": {"cert": "nope.crt", "key": "nope.key"}}, "tls.cert", "'nope.crt'"),
        ({"tls": {"cert": str(ROOT / "README.md")}}, "tls.key", "None"),
    ],
)
def test_server_value_out_of_range_names_field_and_value(patch, field, value):
    m = _refused(ServerConfig.from_dict, {"repository": "m", **patch}, source="server.yaml")
    assert (m["file"], m["field"], m["value"]) == ("server.yaml", field, value)


def test_an_optional_port_says_null_once():
    # "expected a port number in [0, 65535] (0: pick a free port), or null (off), or null"
    # (review helper-219)
    m = _refused(ServerConfig.from_dict, {"repository": "m", "http_port": -5}, source="s.yaml")
    assert m["exp"].count("null") == 1, m["exp"]


def test_missing_required_field_says_so():
    m = _refused(ModelConfig.from_dict, {"inputs": MINIMAL["inputs"]}, source="model.yaml")
    assert m["field"] == "outputs" and m["exp"].endswith("(required)")
    assert _refused(ServerConfig.from_dict, {}, source="s.yaml")["field"] == "repository"


def test_not_a_mapping():
    with pytest.raises(ConfigError, match=r"^model\.yaml: got \[1\], expected a mapping"):
        ModelConfig.from_dict([1], source="model.yaml")


# --- checks across fields --------------------------------------------------------------------


def test_fp16_needs_a_backend_that_builds_it():
    m = _refused(_model, precision="fp16", backends=["onnxruntime"])
    assert m["field"] == "precision" and "add tensorrt or torch" in m["exp"]
    for ok in (["tensorrt"], ["torch"], ["tensorrt", "onnxruntime"]):
        assert _model(precision="fp16", backends=ok).precision == "fp16"
    assert set(FP16_BACKENDS) <= set(BACKENDS)


@pytest.mark.parametrize("what", ["tiers", "inputs", "outputs"])
def test_names_are_unique(what):
    item = {"name": "a", "width": 1} if what == "tiers" else {"name": "a", "shape": [1]}
    patch = {what: [item, item]}
    if what == "inputs":
        patch["outputs"] = [{"name": "b", "shape": [1]}]
    m = _refused(_model, **patch)
    assert (m["field"], m["value"], m["exp"]) == (what, "['a']", "unique names")


def test_backends_and_models_are_not_repeated():
    assert _refused(_model, backends=["torch", "torch"])["field"] == "backends"
    m = _refused(ServerConfig.from_dict, {"repository": "m", "models": ["a", "a"]})
    assert m["field"] == "models"


def test_an_output_cannot_share_an_input_name():
    m = _refused(_model, outputs=[{"name": "x", "shape": [2]}])
    assert (m["field"], m["value"]) == ("outputs", "['x']")


def test_evaluation_needs_one_input_and_a_class_vector_output():
    ev = {"dataset": "mnist5k"}
    two = [{"name": "x", "shape": [4]}, {"name": "z", "shape": [4]}]
    assert _refused(_model, evaluation=ev, inputs=two)["field"] == "evaluation"
    m = _refused(_model, evaluation=ev, outputs=[{"name": "y", "shape": [2, 3]}])
    assert m["field"] == "outputs[0].shape"
    assert _model(inputs=two).evaluation is None  # fine without evaluation


@pytest.mark.parametrize("policy", ["fixed:", "fixed", "fixed:bad name", "slackfit:w100"])
def test_malformed_policy_is_refused(policy):
    m = _refused(ServerConfig.from_dict, {"repository": "m", "policy": policy})
    assert (m["field"], m["value"]) == ("policy", repr(policy))


def test_policy_names_come_from_the_scheduler():
    m = _refused(ServerConfig.from_dict, {"repository": "m", "policy": "nope"})
    for p in POLICIES:
        assert p in m["exp"]
    for p in POLICIES:
        name = f"{p}:w100" if p == "fixed" else p
        assert ServerConfig.from_dict({"repository": "m", "policy": name}).policy == name


def test_backend_names_come_from_the_engines():
    for b in BACKENDS:
        assert _model(backends=[b]).backends == (b,)
        assert ServerConfig.from_dict({"repository": "m", "backend": b}).backend == b


def test_metrics_port_must_differ_from_grpc_port():
    m = _refused(ServerConfig.from_dict, {"repository": "m", "metrics_port": 8001})
    assert m["field"] == "metrics_port"
    both_free = ServerConfig.from_dict({"repository": "m", "grpc_port": 0, "metrics_port": 0})
    assert both_free.grpc_port == both_free.metrics_port == 0


def test_auth_takes_exactly_one_token_source(tmp_path):
    (tmp_path / "token").write_text("file-token-123\n")
    data = {"repository": "m", "auth": {"bearer_token_file": "token"}}
    assert ServerConfig.from_dict(data, base=tmp_path).bearer_token == "file-token-123"
    both = {"bearer_token_file": "token", "bearer_token": "literal-123"}
    assert _refused(ServerConfig.from_dict, {**data, "auth": both}, base=tmp_path)["field"] == (
        "auth"
    )
    assert _refused(ServerConfig.from_dict, {**data, "auth": {}})["field"] == "auth"
    (tmp_path / "short").write_text("abc")
    short = {**data, "auth": {"bearer_token_file": "short"}}
    with pytest.raises(ConfigError, match="at least 8 characters") as refused:
        ServerConfig.from_dict(short, base=tmp_path)
    # the file to fix is named (the message said "auth: got '<token>'" - review helper-225)
    assert "auth.bearer_token_file" in str(refused.value) and "short" in str(refused.value)


def _repo(tmp_path: Path, **models: dict) -> Path:
    for name, patch in models.items():
        (tmp_path / name).mkdir(parents=True)
        (tmp_path / name / "model.yaml").write_text(yaml.safe_dump({**MINIMAL, **patch}))
    return tmp_path


def test_fixed_policy_tier_must_exist_in_the_served_models(tmp_path):
    repo = str(_repo(tmp_path, a={}, b={"tiers": [{"name": "w100", "width": 1.0}]}))
    assert ServerConfig.from_dict({"repository": repo, "policy": "fixed:w100"})
    m = _refused(ServerConfig.from_dict, {"repository": repo, "policy": "fixed:w050"})
    assert m["field"] == "policy" and "'b'" in m["exp"] and "w100" in m["exp"]
    # Only the models served count; a repository not there yet cannot be checked.
    cfg = {"repository": repo, "policy": "fixed:w050", "models": ["a"]}
    assert ServerConfig.from_dict(cfg).policy == "fixed:w050"
    missing = {"repository": str(tmp_path / "later"), "policy": "fixed:w999"}
    assert ServerConfig.from_dict(missing).policy == "fixed:w999"
    # Checked as a whole name: "w050\n" was accepted where no repository could check it
    # (review 160), and no tier is named so.
    m = _refused(ServerConfig.from_dict, {**missing, "policy": "fixed:w050\n"})
    assert m["field"] == "policy"


@pytest.mark.parametrize("text", ["tiers: [unclosed", "[" * 5000, "max_batch: " + "9" * 5000])
def test_a_broken_model_yaml_is_left_to_the_model_loader(tmp_path, text):
    # (the last two - nested too deep, an integer past int()'s limit - stopped the server)
    repo = _repo(tmp_path, a={})
    (repo / "a" / "model.yaml").write_text(text)
    assert ServerConfig.from_dict({"repository": str(repo), "policy": "fixed:w999"})


def test_backend_override_must_build_each_models_precision(tmp_path):
    repo = str(_repo(tmp_path, g={"precision": "fp16", "backends": ["tensorrt"]}))
    m = _refused(ServerConfig.from_dict, {"repository": repo, "backend": "onnxruntime"})
    assert m["field"] == "backend" and "fp16" in m["exp"]
    assert ServerConfig.from_dict({"repository": repo, "backend": "tensorrt"}).backend
    # a fallback the model lists builds fp32 when forced, as when reached by itself
    listed = str(_repo(tmp_path / "l", g={"precision": "fp16",
                                          "backends": ["tensorrt", "onnxruntime"]}))  # fmt: skip
    cfg = ServerConfig.from_dict({"repository": listed, "backend": "onnxruntime"})
    assert cfg.backend == "onnxruntime"


def test_replace_validates_like_the_file():
    cfg = ServerConfig.from_dict({"repository": "m"}, source="server.yaml")
    assert cfg.replace(policy="slackfit", repository=Path("n")).repository == Path("n")
    m = _refused(cfg.replace, policy="fixed:")
    assert (m["file"], m["field"]) == ("server.yaml", "policy")


@pytest.fixture(scope="module")
def pems(tmp_path_factory) -> Path:
    """Two self-signed certificates with their keys (EC P-256: fast to make): a.crt, a.key,
    b.crt, b.key."""
    d = tmp_path_factory.mktemp("pems")
    for name in ("a", "b"):
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
             "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", f"{name}.key", "-out",
             f"{name}.crt", "-days", "2", "-subj", f"/CN={name}"],
            cwd=d, check=True, capture_output=True,
        )  # fmt: skip
    return d


@pytest.mark.parametrize("text", ["max_batch: 010", "max_batch: 1:30", "max_batch: -007"])
def test_an_integer_in_another_yaml_base_is_refused_not_misread(tmp_path, text):
    # YAML 1.1 reads 010 as 8 and 1:30 as 90: max_batch 8 served where 10 was written
    # (review 160). Plain and hexadecimal integers read as before.
    from runtime.configspec import read_yaml

    path = tmp_path / "c.yaml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError, match="reads as a number in another base"):
        read_yaml(path)
    for ok, value in (
        ("0", 0),
        ("10", 10),
        ("-7", -7),
        ("0x1F", 31),
        ("1_000", 1000),
    ):
        path.write_text(f"max_batch: {ok}\n")
        assert read_yaml(path) == {"max_batch": value}


def test_a_float_in_base_60_is_refused_and_plain_ones_read(tmp_path):
    # grace_period_s: 1:30.0 was read as 90.0, default_latency_budget_ms: 1:30.5 as 90.5
    # (review helper-281); the integers were refused already.
    from runtime.configspec import read_yaml

    path = tmp_path / "c.yaml"
    path.write_text("grace_period_s: 1:30.0\n")
    with pytest.raises(ConfigError, match="reads as a base-60 number"):
        read_yaml(path)
    for ok, value in (("1.5", 1.5), ("1.0e+3", 1000.0), (".inf", float("inf")), ("-2.5", -2.5)):
        path.write_text(f"x: {ok}\n")
        assert read_yaml(path) == {"x": value}


def test_localhost_in_capitals_is_loopback():
    from server.config import loopback

    assert loopback("LOCALHOST") and loopback("localhost.") and not loopback("localhost.evil")


def test_an_unquoted_yaml_word_read_as_a_boolean_is_the_choice_it_spells(tmp_path):
    # YAML 1.1 reads `level: OFF` as False: it was refused as "got False, expected one of
    # OFF, TIMESTAMPS" (review helper-261); a boolean no choice spells says to quote it.
    path = tmp_path / "server.yaml"
    base = "repository: /tmp\nmodels: [m]\n"
    for word in ("OFF", "off", "no", "false"):
        path.write_text(base + f"trace:\n  level: {word}\n")
        assert ServerConfig.load(path).trace.level == "OFF"
    path.write_text(base + "trace:\n  level: on\n")
    with pytest.raises(ConfigError, match=r"got True, .* as a boolean\)"):
        ServerConfig.load(path)
    path.write_text(base + "model_control: no\n")  # (quoted, "no" is no choice either)
    with pytest.raises(ConfigError, match=r"model_control: got False, .*as a boolean\)$"):
        ServerConfig.load(path)


def test_an_empty_model_yaml_or_a_directory_for_a_config_says_so(tmp_path):
    # "model.yaml: got None, expected a mapping with inputs, outputs, tiers and ..." for an
    # empty file; a directory given for a config read "file not found" (review 160).
    (tmp_path / "model.yaml").write_text("# inputs: ...\n")
    with pytest.raises(ConfigError, match=r"\(it is empty: nothing, or only comments\)"):
        ModelConfig.load(tmp_path / "model.yaml")
    with pytest.raises(ConfigError, match=rf"^{tmp_path}: is a directory; give the YAML file"):
        ServerConfig.load(tmp_path)


@pytest.mark.parametrize("key", ["auth", "tls"])
def test_a_protection_written_with_nothing_under_it_is_refused_not_turned_off(tmp_path, key):
    # Every key under auth: commented out reads as null: the server started without
    # authentication (or TLS), saying nothing (review 160). Left out, it is off as before.
    path = tmp_path / "server.yaml"
    path.write_text(f"repository: models\n{key}:\n  # bearer_token_file: token.txt\n")
    with pytest.raises(ConfigError, match=rf"{key}: .*reads as null.*write {key}: null") as err:
        ServerConfig.load(path)
    assert str(err.value).startswith(f"{path}: {key}: got None")
    for off in ("repository: models\n", f"repository: models\n{key}: null\n"):
        path.write_text(off)  # left out, or said null: off, as asked
        assert getattr(ServerConfig.load(path), key) is None


@pytest.mark.parametrize("key", ["text", "evaluation", "channel_search"])
def test_a_model_yaml_section_left_blank_is_refused(tmp_path, key):
    # channel_search: with its settings commented out read as null: no search, said nowhere.
    d = tmp_path / "m"
    d.mkdir()
    (d / "model.yaml").write_text(yaml.safe_dump(MINIMAL) + f"{key}:\n  # settings\n")
    with pytest.raises(ConfigError, match=rf"{key}: got None, expected its settings"):
        ModelConfig.load(d / "model.yaml")
    (d / "model.yaml").write_text(yaml.safe_dump(MINIMAL) + f"{key}: null\n")
    assert getattr(ModelConfig.load(d / "model.yaml"), key) is None


def test_tls_paths_are_relative_to_the_config_file(tmp_path, pems):
    for name, pem in (("server.crt", "a.crt"), ("server.key", "a.key")):
        shutil.copy(pems / pem, tmp_path / name)
    (tmp_path / "server.yaml").write_text(
        "repository: models\ntls: {cert: server.crt, key: server.key}\n"
    )
    cfg = ServerConfig.load(tmp_path / "server.yaml")
    assert cfg.tls == TLSConfig(cert=tmp_path / "server.crt", key=tmp_path / "server.key")
    assert cfg.repository == tmp_path / "models"


def test_a_repository_flag_naming_a_link_keeps_the_link(tmp_path, monkeypatch):
    # `innfer serve --config tuning.yaml --repository current`: resolved at start, a swap
    # of current -> releases/v2 was never seen and the old release served on - the shipped
    # images name the repository so (review helper-293). Absolute, the link kept, as the
    # file's `repository:` is read.
    (tmp_path / "releases" / "v1").mkdir(parents=True)
    (tmp_path / "current").symlink_to(tmp_path / "releases" / "v1")
    (tmp_path / "tuning.yaml").write_text("policy: innfer\n")
    monkeypatch.chdir(tmp_path)
    cfg = ServerConfig.load(tmp_path / "tuning.yaml", repository="current")
    assert cfg.repository == tmp_path / "current"


@pytest.mark.parametrize(
    ("tls", "field", "expected"),
    [
        ({"cert": "garbage.pem", "key": "a.key"}, "tls.cert", "a PEM certificate chain"),
        ({"cert": "a.key", "key": "a.key"}, "tls.cert", "a PEM certificate chain"),
        ({"cert": "a.crt", "key": "b.key"}, "tls.key", "the private key of the certificate"),
        ({"cert": "a.crt", "key": "garbage.pem"}, "tls.key", "a PEM private key"),
        ({"cert": "a.crt", "key": "a.key", "client_ca": "garbage.pem"}, "tls.client_ca",
         "a PEM file of the CA certificates"),
    ],
)  # fmt: skip
def test_tls_files_that_do_not_load_name_their_field(pems, tls, field, expected):
    # A bad certificate or key passed the config (which checked only that the files exist)
    # and the server then failed to start with gRPC's "Failed to bind to address".
    (pems / "garbage.pem").write_text("not a PEM file\n")
    data = {"repository": "m", "tls": tls}
    m = _refused(ServerConfig.from_dict, data, source="server.yaml", base=pems)
    assert (m["field"], m["value"]) == (field, repr(str(pems / tls[field.split(".")[1]])))
    assert m["exp"].startswith(expected), m["exp"]
    good = {"cert": "a.crt", "key": "a.key", "client_ca": "b.crt"}
    assert ServerConfig.from_dict({"repository": "m", "tls": good}, base=pems).tls.client_ca


def test_an_encrypted_tls_key_is_refused_without_a_prompt(pems, tmp_path):
    subprocess.run(
        ["openssl", "pkey", "-in", str(pems / "a.key"), "-aes256", "-passout", "pass:secret",
         "-out", str(tmp_path / "enc.key")], check=True, capture_output=True,
    )  # fmt: skip
    data = {"repository": "m", "tls": {"cert": str(pems / "a.crt"), "key": "enc.key"}}
    m = _refused(ServerConfig.from_dict, data, source="server.yaml", base=tmp_path)
    assert m["field"] == "tls.key" and "unencrypted" in m["exp"] and "openssl pkey" in m["exp"]


def test_the_token_file_is_read_once_when_the_config_is_validated(tmp_path):
    # AuthConfig.token read the file at every use: the server started with whatever it held
    # then - unchecked, and an empty read turned auth off.
    token = tmp_path / "token"
    token.write_text("file-token-123\n")
    cfg = ServerConfig.from_dict(
        {"repository": "m", "auth": {"bearer_token_file": "token"}}, base=tmp_path
    )
    token.write_text("")
    assert cfg.bearer_token == "file-token-123"
    assert "file-token" not in repr(cfg) and "file-token" not in safe_dump(cfg)


def test_safe_dump_masks_the_token():
    cfg = ServerConfig.from_dict({"repository": "m", "auth": {"bearer_token": "s3cret-token"}})
    text = safe_dump(cfg)
    assert "s3cret" not in text and "***" in text
    assert "s3cret" not in repr(cfg)


def test_models_lists_any_name_a_model_directory_may_have():
    # A model named with 65-128 characters was built and served by default, but could not
    # be listed in models: (at most 64, the pattern of other names).
    from runtime.repository.store import check_model_name

    name = "m" * 100
    check_model_name(name)
    assert ServerConfig.from_dict({"repository": "r", "models": [name]}).models == (name,)
    m = _refused(ServerConfig.from_dict, {"repository": "r", "models": ["m" * 129]})
    assert m["field"] == "models[0]" and "at most 128" in m["exp"]


def test_an_integer_too_large_for_a_float_field_is_a_config_error():
    value = 10**400
    # float(10**400) raised OverflowError past the bounds check (a lower bound only): the
    # CLI said "internal error ... (a bug)" for a typo of many zeros.
    m = _refused(_model, default_latency_budget_ms=value)
    assert m["field"] == "default_latency_budget_ms"
    m = _refused(ServerConfig.from_dict, {"repository": "m", "grace_period_s": value})
    assert m["field"] == "grace_period_s"


def test_a_default_budget_no_answer_can_report_is_refused():
    # 1e30 ms was accepted, and every request without a gRPC deadline then failed INTERNAL
    # (its answer's budget_us, int64 microseconds, overflowed); a request may not send more
    # than 1e9 ms either (review 160).
    m = _refused(_model, default_latency_budget_ms=1e30)
    assert m["field"] == "default_latency_budget_ms" and "1000000000]" in m["exp"], m
    assert _model(default_latency_budget_ms=1e9).default_latency_budget_ms == 1e9


@pytest.mark.parametrize(
    "auth, field",
    [
        ({"bearer_token": 918273645546372819}, "auth.bearer_token"),  # YAML read a number
        ({"bearer_tokn": "Zq9-SECRET-TOKEN-xyz"}, "auth.bearer_tokn"),  # a misspelt key
    ],
)
def test_config_errors_never_show_the_token(auth, field):
    # The generic errors echoed the value: a numeric token, or one under a misspelt key,
    # reached stderr and the pod's logs verbatim.
    with pytest.raises(ConfigError) as err:
        ServerConfig.from_dict({"repository": "m", "auth": auth})
    message = str(err.value)
    assert field in message and "<redacted>" in message
    assert "918273645546372819" not in message and "SECRET" not in message


def test_a_token_file_that_is_not_text_is_a_config_error(tmp_path):
    # It was "innfer serve: error: 'utf-8' codec can't decode byte 0xff": no file, no key.
    (tmp_path / "token").write_bytes(b"\xff\xfe binary secret")
    with pytest.raises(ConfigError, match=r"auth\.bearer_token_file: .*token.*not UTF-8"):
        ServerConfig.from_dict(
            {"repository": "m", "auth": {"bearer_token_file": "token"}}, base=tmp_path
        )


# --- shipped configs -------------------------------------------------------------------------


def test_shipped_configs_are_found():
    assert len(MODEL_YAMLS) >= 3 and len(SERVER_YAMLS) >= 2


@pytest.mark.parametrize("path", MODEL_YAMLS, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_shipped_model_configs_load_and_round_trip(path):
    cfg = ModelConfig.load(path)
    again = ModelConfig.from_dict(to_dict(cfg), source=str(path))
    assert again == cfg
    assert again.evaluation == cfg.evaluation


@pytest.mark.parametrize("path", SERVER_YAMLS, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_shipped_server_configs_load_and_round_trip(path):
    cfg = ServerConfig.load(path)
    again = ServerConfig.from_dict(to_dict(cfg), source=str(path))
    assert again == cfg
    assert yaml.safe_load(safe_dump(cfg))["repository"] == str(cfg.repository)


def test_config_method_names_match_the_inn():
    import runtime.inn.continuous as continuous  # imports torch
    from runtime.repository.config import METHODS

    assert tuple(continuous.METHODS) == METHODS


def test_config_width_keys_match_the_inn():
    import runtime.inn.model as model  # imports torch
    from runtime.inn.shaping import SHAPED as INN_SHAPED
    from runtime.repository.config import KINDS, SHAPED

    assert (tuple(model.KINDS), INN_SHAPED) == (KINDS, SHAPED)


def test_fp16_builds_where_the_backend_can_and_a_cpu_fallback_builds_fp32(tmp_path):
    # backends: [tensorrt, onnxruntime] on a CPU host: ONNX Runtime serves fp32 (its
    # build raised a bare ValueError on fp16, which reached the client as INTERNAL).
    from runtime.engines import get_backend
    from runtime.repository import Repository

    cfg = _model(precision="fp16", backends=["tensorrt", "onnxruntime"])
    repo = Repository(tmp_path)
    assert repo.build_options(cfg, get_backend("onnxruntime")).precision == "fp32"
    assert repo.build_options(cfg, get_backend("tensorrt")).precision == "fp16"


def test_a_sequence_model_builds_with_a_sequence_profile_and_its_own_cache_key(tmp_path):
    # TensorRT needs the length range of a (-1) sequence axis; fixed-shape models keep the
    # cache keys they had before sequence profiles existed.
    from runtime.engines import get_backend
    from runtime.repository import Repository
    from runtime.repository.cache import engine_key

    seq = _model(
        inputs=[{"name": "ids", "dtype": "int64", "shape": [-1]}], lengths=[16, 32, 64, 128]
    )
    fixed = _model()
    repo, backend = Repository(tmp_path), get_backend("tensorrt")
    assert seq.sequence_profile == (1, 64, 128)  # any length 1..longest; tuned for the middle
    assert fixed.sequence_profile is None
    assert repo.build_options(seq, backend).sequence == (1, 64, 128)
    assert repo.build_options(fixed, backend).sequence is None
    # Backends that run any length keep it out of their options, so out of their keys.
    assert repo.build_options(seq, get_backend("onnxruntime")).sequence is None
    # TensorRT's key holds the length range (engine_key asks version(), device() and the
    # device's fields of the backend: stand-ins for the library this machine lacks).
    trt = get_backend("tensorrt")
    trt.version, trt.device = (lambda: "10.x"), (lambda: "gpu")
    trt._device_fields = dict  # (the GPU's capability, SMs and CUDA runtime: none here)
    key, fields = engine_key("0" * 64, trt, repo.build_options(seq, trt))
    assert fields["sequence_profile"] == [1, 64, 128]
    _, fixed_fields = engine_key("0" * 64, trt, repo.build_options(fixed, trt))
    assert "sequence_profile" not in fixed_fields
    shorter = dataclasses.replace(repo.build_options(seq, trt), sequence=(1, 64, 96))
    assert engine_key("0" * 64, trt, shorter)[0] != key


def test_engines_that_run_any_shape_keep_batch_and_length_out_of_their_cache_key(tmp_path):
    # ONNX Runtime and torch engines run any batch and length: a new max_batch (or lengths)
    # in model.yaml rebuilt every tier's engine for nothing. TensorRT's optimisation profile
    # is built for the range, so its key keeps it.
    from runtime.engines import get_backend
    from runtime.repository import Repository
    from runtime.repository.cache import engine_key

    repo = Repository(tmp_path)
    small, large = _model(), _model(max_batch=32)
    for name in ("onnxruntime", "torch"):
        backend = get_backend(name)
        key, fields = engine_key("0" * 64, backend, repo.build_options(small, backend))
        assert "batch_profile" not in fields and "sequence_profile" not in fields
        assert engine_key("0" * 64, backend, repo.build_options(large, backend))[0] == key
    trt = get_backend("tensorrt")
    trt.version, trt.device = (lambda: "10.x"), (lambda: "gpu")
    trt._device_fields = dict  # (the GPU's capability, SMs and CUDA runtime: none here)
    key, fields = engine_key("0" * 64, trt, repo.build_options(small, trt))
    assert fields["batch_profile"] == [1, 4, small.max_batch]
    assert engine_key("0" * 64, trt, repo.build_options(large, trt))[0] != key


def test_a_model_name_other_than_its_directorys_is_refused(tmp_path, monkeypatch):
    # name: was read, documented and ignored: the model was served under its directory's.
    d = tmp_path / "mnist"
    d.mkdir()
    body = (
        "inputs: [{name: x, shape: [4]}]\noutputs: [{name: y, shape: [2]}]\n"
        "tiers: [{name: w100, width: 1.0}]\n"
    )
    (d / "model.yaml").write_text(body + "name: mnist\n")
    assert ModelConfig.load(d / "model.yaml").name == "mnist"
    (d / "model.yaml").write_text(body + "name: digits-v2\n")
    with pytest.raises(ConfigError, match=r"name: 'digits-v2' is not its directory's name"):
        ModelConfig.load(d / "model.yaml")
    (d / "model.yaml").write_text(body + "name: mnist\n")
    monkeypatch.chdir(d)  # `innfer calibrate .`: the directory of "model.yaml" is d, not ""
    assert ModelConfig.load(Path("model.yaml")).name == "mnist"
    # A deployed tier set <model>.model.yaml (a ConfigMap's folder is the mount's): its
    # name is the file's (review helper-243: "name: 'mnist' is not its directory's 'etc'")
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "mnist.model.yaml").write_text(body + "name: mnist\n")
    assert ModelConfig.load(etc / "mnist.model.yaml").name == "mnist"
    (etc / "mnist.model.yaml").write_text(body + "name: digits\n")
    with pytest.raises(ConfigError, match=r"'digits' is not its file name's model 'mnist'"):
        ModelConfig.load(etc / "mnist.model.yaml")


@pytest.mark.parametrize(
    ("host", "refused"),
    [
        ("127.0.0.1", False),
        ("127.3.2.1", False),
        ("::1", False),
        ("localhost", False),
        ("127.attacker.example", True),
        ("0.0.0.0", True),
    ],
)
def test_explicit_model_control_without_auth_needs_a_loopback_address(host, refused):
    # Any host starting "127." counted as loopback: "127.attacker.example" took explicit
    # model control without a token (review helper-136).
    from server.config import ConfigError, ServerConfig

    spec = {"repository": "repo", "host": host, "model_control": "explicit"}
    if refused:
        with pytest.raises(ConfigError, match="auth"):
            ServerConfig.from_dict(spec)
    else:
        assert ServerConfig.from_dict(spec).host == host


def test_an_error_about_a_very_long_key_is_short(tmp_path):
    # A model.yaml key of 5,000 characters made a 5,315-character ConfigError, sent to the
    # client that asked to load the model (review 158).
    path = tmp_path / "model.yaml"
    path.write_text(f"? {'k' * 5000}\n: 1\n")  # (an explicit key: a plain one stops at 1,024)
    with pytest.raises(ConfigError) as err:
        ModelConfig.load(path)
    assert len(str(err.value)) < 600 and "... (5000 chars)" in str(err.value)


def test_a_yaml_alias_bomb_is_refused_at_once_and_aliases_within_reason_still_read(tmp_path):
    # Review helper-183: ten nested lists of nine aliases (687 bytes) expand to 9^10 values;
    # the error's text walked them all - the server stalled ~40 s and grew to gigabytes,
    # every model unreachable. Merge keys and a few aliases stay valid YAML configs.
    import time

    from runtime.configspec import read_yaml

    lines = ["a0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"a{k}: &l{k} [{', '.join([f'*l{k - 1}'] * 9)}]" for k in range(1, 10)]
    bomb = tmp_path / "model.yaml"
    bomb.write_text("\n".join(lines) + "\n")
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=r"aliases \(\*name\) expand to more than 100,000"):
        read_yaml(bomb)
    assert time.monotonic() - t0 < 5.0
    recursive = tmp_path / "recursive.yaml"  # counting it never ended
    recursive.write_text("threads: &a [1, *a]\n")
    with pytest.raises(ConfigError, match=r"or into the value that holds them"):
        read_yaml(recursive)
    fine = tmp_path / "fine.yaml"
    fine.write_text("base: &b {x: 1, y: 2}\nother:\n  <<: *b\n  y: 3\nboth: [*b, *b]\n")
    assert read_yaml(fine)["other"] == {"x": 1, "y": 3}
    # A wrong value that nests and repeats is shown within bounds, in the file's order.
    deep = [1]
    for _ in range(30):
        deep = [deep] * 9
    with pytest.raises(ConfigError, match=r"got \[\[\[\[\[\.\.\.\], .*chars\), expected") as err:
        Where("model.yaml").child("threads").fail(deep, "an integer")
    assert len(str(err.value)) < 300
    with pytest.raises(ConfigError, match=r"got \{'z': 1, 'a': \[2\]\}, expected"):
        Where("model.yaml").child("x").fail({"z": 1, "a": [2]}, "an integer")
