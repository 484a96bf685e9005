"""``innfer config``: every key of both config files from the config classes themselves,
and a check of config files before a deploy (review 196: TLS, auth and many tuning keys
were written down only in source)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from innfer.cli import main as cli
from runtime.configspec import describe
from runtime.repository.config import ModelConfig
from server.config import ServerConfig

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def test_keys_lists_every_key_the_config_accepts(capsys):
    for kind, cls in (("server", ServerConfig), ("model", ModelConfig)):
        assert cli(["config", "keys", kind]) == 0
        listed = {line.split(":")[0] for line in capsys.readouterr().out.splitlines()}
        assert {r.key for r in describe(cls)} <= listed
    assert cli(["config", "keys", "server"]) == 0
    assert "auth.bearer_token_file: null" in capsys.readouterr().out


def test_check_passes_the_deploy_configs(capsys):
    files = [DEPLOY / "k8s/base/server.yaml", *sorted(DEPLOY.glob("**/*.model.yaml"))]
    assert len(files) >= 3
    assert cli(["config", "check", *map(str, files)]) == 0
    out = capsys.readouterr().out
    assert out.count("server config ok") == 1 and out.count("model config ok") == len(files) - 1


def test_check_names_each_bad_file_and_what_is_wrong(tmp_path, capsys):
    bad_model = tmp_path / "m.model.yaml"
    tier_set = (DEPLOY / "tiers/cpu.model.yaml").read_text()
    bad_model.write_text(re.sub(r"(?m)^max_batch: .*$", "max_batch: 0", tier_set))
    server = tmp_path / "server.yaml"  # TLS files relative to the config: absent
    server.write_text("repository: .\ntls: {cert: absent.pem, key: absent.key}\n")
    good = tmp_path / "good.yaml"  # its repository (".") holds a model, as serve needs
    good.write_text("repository: .\ngrpc_port: 9001\n")
    (tmp_path / "tiny").mkdir()
    shutil.copy(DEPLOY / "tiers/cpu.model.yaml", tmp_path / "tiny" / "model.yaml")
    argv = ["config", "check", str(bad_model), str(server), str(good), str(tmp_path / "x.yaml")]
    assert cli(argv) == 2
    said = capsys.readouterr()
    assert f"{bad_model}: max_batch: got 0" in said.err and "(as a model config)" in said.err
    assert f"{server}: tls.cert: got 'absent.pem', expected an existing file" in said.err
    assert f"{tmp_path / 'x.yaml'}" in said.err
    assert said.out == f"{good}: server config ok\n"  # the others did not stop its check
    # --kind reads a file under another name as that kind
    copy = tmp_path / "tiers.yaml"
    copy.write_text((DEPLOY / "tiers/cpu.model.yaml").read_text())
    assert cli(["config", "check", "--kind", "model", str(copy)]) == 0
    # without it, refused as a server config, it reads as the model config its keys make
    # it, with how to name it (test_check_reads_a_model_config_named_otherwise_by_its_keys)
    assert cli(["config", "check", str(copy)]) == 0


def test_the_readmes_server_yaml_example_is_valid(tmp_path):
    """The README's example is what users paste: every key in it must be accepted."""
    readme = (DEPLOY.parent / "README.md").read_text()
    blocks = re.findall(r"```yaml\n(repository: models.*?)```", readme, re.S)
    assert len(blocks) == 1
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", "server.key", "-out", "server.crt", "-days", "2", "-subj", "/CN=s"],
        cwd=tmp_path, check=True, capture_output=True,
    )  # fmt: skip
    shutil.copy(tmp_path / "server.crt", tmp_path / "ca.crt")
    (tmp_path / "token.txt").write_text("correct-horse-battery-staple\n")
    (tmp_path / "server.yaml").write_text(blocks[0])
    cfg = ServerConfig.load(tmp_path / "server.yaml")
    assert cfg.tls is not None and cfg.auth is not None and cfg.grpc_port == 8001


def test_check_notes_a_repository_that_is_not_there_yet(tmp_path, capsys):
    # "ok", and serve then refused it: "repository /nonexistent/x is not a directory"
    # (review helper-219). Still valid - a pod mounts it later - but said.
    server = tmp_path / "server.yaml"
    server.write_text("repository: /nonexistent/x\n")
    assert cli(["config", "check", str(server)]) == 0
    out = capsys.readouterr().out
    assert "server config ok (note: its repository /nonexistent/x is not a directory" in out


def test_check_reads_a_model_config_named_otherwise_by_its_keys(tmp_path, capsys):
    # A model.yaml saved as mymodel.yaml was refused as a server config, field by field
    # ("inputs: ... expected a known field (auth, backend, ...)"), with no word of --kind
    # (review helper-225). Its keys make it a model config; the line says how to name it.
    mine = tmp_path / "mymodel.yaml"
    shutil.copy(DEPLOY / "tiers/cpu.model.yaml", mine)
    assert cli(["config", "check", str(mine)]) == 0
    out = capsys.readouterr().out
    assert "model config ok" in out and "--kind model" in out
    # invalid as a model config too: its own error, not the server's field by field (the
    # fallback hid it: review helper-295)
    bad = re.sub(r"(?m)^threads: *\d+", "threads: 0", mine.read_text())
    (tmp_path / "bad.yaml").write_text(bad)
    assert cli(["config", "check", str(tmp_path / "bad.yaml")]) == 2
    err = capsys.readouterr().err
    assert "threads: got 0" in err and "(as a model config, by its keys" in err, err
    # a file whose keys are of neither stays an error, as the kind its name says
    (tmp_path / "other.yaml").write_text("nonsense: 3\n")
    assert cli(["config", "check", str(tmp_path / "other.yaml")]) == 2
    assert "(as a server config)" in capsys.readouterr().err
    # --kind given: no second guess
    assert cli(["config", "check", "--kind", "server", str(mine)]) == 2
    # A server config named *.model.yaml is read by that name as a tier set (the deploy
    # gate failed on what the check passed): an error, with how to name it (helper-243)
    capsys.readouterr()
    tuning = tmp_path / "tuning.model.yaml"
    tuning.write_text("repository: /models\n")
    assert cli(["config", "check", str(tuning)]) == 2
    assert "server config ok" in capsys.readouterr().err


def test_check_says_what_serve_would_refuse_and_warn(tmp_path, capsys):
    # The check said "ok" to configs serve refused at once (a model the repository lacks)
    # and showed none of serve's start-up warnings (review helper-243).
    repo = tmp_path / "repo"
    (repo / "tiny").mkdir(parents=True)
    shutil.copy(DEPLOY / "tiers/cpu.model.yaml", repo / "tiny" / "model.yaml")
    server = tmp_path / "server.yaml"
    server.write_text(f"repository: {repo}\nmodels: [tiny, nosuch]\n")
    assert cli(["config", "check", str(server)]) == 2
    err = capsys.readouterr().err
    assert "`innfer serve` would refuse it: models nosuch" in err and "tiny" in err
    server.write_text(f"repository: {repo}\nlimits: {{max_inflight_bytes: 2097152}}\n")
    assert cli(["config", "check", str(server)]) == 0
    out = capsys.readouterr().out
    assert "server config ok" in out and "warning (innfer serve logs it at start)" in out
    assert "max_stream_bytes" in out
    # a trace file serve cannot write: refused at its start, "ok" here (helper-276) - and
    # checked without making the missing folders serve would make
    server.write_text(f"repository: {repo}\ntrace: {{level: TIMESTAMPS, file: /proc/x/t.json}}\n")
    assert cli(["config", "check", str(server)]) == 2
    assert "would refuse it: trace.level TIMESTAMPS: cannot write" in capsys.readouterr().err
    later = tmp_path / "not" / "yet"
    server.write_text(f"repository: {repo}\ntrace: {{level: TIMESTAMPS, file: {later}/t.json}}\n")
    assert cli(["config", "check", str(server)]) == 0
    assert not (tmp_path / "not").exists()
    capsys.readouterr()
    server.write_text(f"repository: {repo}\n")
    assert cli(["config", "check", str(server)]) == 0
    assert "warning" not in capsys.readouterr().out


def test_check_says_a_model_configs_auto_tiers_has_no_goals(tmp_path, capsys):
    # build and serve said it; the check printed "model config ok" alone (helper-281)
    path = tmp_path / "m" / "model.yaml"
    path.parent.mkdir()
    path.write_text((DEPLOY / "tiers/cpu.model.yaml").read_text() + "auto_tiers:\n")
    assert cli(["config", "check", str(path)]) == 0
    out = capsys.readouterr().out
    assert "model config ok" in out and "auto_tiers has no goals" in out, out


def test_a_linked_model_yaml_is_named_by_the_folder_it_is_in(tmp_path, capsys):
    # model.yaml linked to shared/tiny-tiers.yaml holding `name: tiny` was told "name:
    # 'tiny' is not its directory's name 'shared'" (review helper-281)
    shared = tmp_path / "shared" / "tiny-tiers.yaml"
    shared.parent.mkdir()
    shared.write_text((DEPLOY / "tiers/cpu.model.yaml").read_text() + "name: tiny\n")
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "model.yaml").symlink_to(shared)
    assert cli(["config", "check", str(tmp_path / "tiny" / "model.yaml")]) == 2
    err = capsys.readouterr().err
    # ... and the link out is refused as serve refuses it ("ok" before)
    assert "tiny/model.yaml is a link out of the model's folder" in err, err
    assert "'shared'" not in err


def test_check_takes_serves_repository_and_says_its_other_start_refusals(tmp_path, capsys):
    # A tuning-only file serve takes with --repository was refused here; a backend this
    # machine lacks and limits no request to a model passes were "ok", where serve stops or
    # starts not ready (review helper-281).
    repo = tmp_path / "repo"
    (repo / "tiny").mkdir(parents=True)
    shutil.copy(DEPLOY / "tiers/cpu.model.yaml", repo / "tiny" / "model.yaml")
    tuning = tmp_path / "tuning.yaml"
    tuning.write_text("grace_period_s: 5\n")
    assert cli(["config", "check", str(tuning)]) == 2
    capsys.readouterr()
    assert cli(["config", "check", str(tuning), "--repository", str(repo)]) == 0
    assert "server config ok" in capsys.readouterr().out
    yaml_path = repo / "tiny" / "model.yaml"  # an input name longer than the limit below
    yaml_path.write_text(
        yaml_path.read_text().replace("{name: input,", "{name: pixel_values_norm,")
    )
    tuning.write_text("limits: {max_name_bytes: 16}\n")
    assert cli(["config", "check", str(tuning), "--repository", str(repo)]) == 2
    err = capsys.readouterr().err
    assert "model tiny: no request to it passes this server's request limits" in err, err
    from runtime.engines import get_backend

    if get_backend("tensorrt").unavailable_reason() is not None:  # (here: no GPU)
        tuning.write_text("backend: tensorrt\n")  # (a warning: the check may run elsewhere)
        assert cli(["config", "check", str(tuning), "--repository", str(repo)]) == 0
        out = capsys.readouterr().out
        assert "warning" in out and "backend: tensorrt is not available on this machine" in out
