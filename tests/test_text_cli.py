"""``innfer calibrate --text`` on the tiny sentence embedder (tests/textmodel.py): the
tiers of a text model are distilled on a plain-text file, tokenized with the model's own
tokenizer, and stored with the INN for the next build."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml
from textmodel import WORDS, build_text_repository

import runtime
from innfer.cli import main
from runtime.build.pipeline import BuildError, build_model
from runtime.inn.model import IntegralModel
from runtime.repository import Repository
from runtime.repository.config import ModelConfig


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d, _ = build_text_repository(tmp_path_factory.mktemp("textcli"))
    return d


def _sentences(path, n: int):
    lines = [" ".join(WORDS[(k + j) % len(WORDS)] for j in range(3 + k % 9)) for k in range(n)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _calibrated(model_dir, tmp_path):
    """A copy of the model calibrated on 64 sentences for 10 s: (its directory, the text
    file, the calibrated INN, the key of its half tier). 10 s, not 2: on a loaded machine
    the selection and refit alone took 2 s (0 steps)."""
    copy = tmp_path / "embed"
    shutil.copytree(model_dir, copy)
    text = _sentences(tmp_path / "calib.txt", 64)
    assert main(["calibrate", str(copy), "--text", str(text), "--seconds", "10"]) == 0
    inn = runtime.load(copy)
    return copy, text, inn, IntegralModel.sizes_key(inn.sizes({"heads": 0.5, "ffn": 0.5}))


def test_calibrate_text_stores_the_smaller_tier_and_leaves_the_full_width(model_dir, tmp_path):
    _, _, inn, half = _calibrated(model_dir, tmp_path)
    full = IntegralModel.sizes_key(inn.sizes(1.0))
    assert half in inn.tiers and full not in inn.tiers
    record = inn.info["text_calibration"][half]
    assert record["steps"] >= 1 and record["sentences"] == 64


def test_calibrate_lr_sets_each_tiers_peak_rate_and_is_recorded(model_dir, tmp_path, capsys):
    copy = tmp_path / "embed"
    shutil.copytree(model_dir, copy)
    text = _sentences(tmp_path / "calib.txt", 64)
    args = ["calibrate", str(copy), "--text", str(text), "--seconds", "2"]
    assert main([*args, "--lr", "2.5e-4"]) == 0
    inn = runtime.load(copy)
    (record,) = inn.info["text_calibration"].values()
    assert record["lr"] == 2.5e-4
    with pytest.raises(SystemExit):  # argparse: a rate must be a finite number > 0
        main([*args, "--lr", "0"])
    assert "expected a finite number > 0, got '0'" in capsys.readouterr().err


def test_build_warns_about_data_free_transformer_tiers_until_calibrated(model_dir, tmp_path):
    copy = tmp_path / "embed"
    shutil.copytree(model_dir, copy)
    report = build_model(Repository(tmp_path), "embed", progress=False, profile=False)
    assert len(report.warnings) == 1  # "half"; the full width is the model itself
    assert "tier half of embed" in report.warnings[0] and "innfer calibrate" in report.warnings[0]
    text = _sentences(tmp_path / "calib.txt", 64)
    assert main(["calibrate", str(copy), "--text", str(text), "--seconds", "2"]) == 0
    report = build_model(Repository(tmp_path), "embed", progress=False, profile=False)
    # Calibrated: no data-free warning (the kept profile timed the old engines: said so)
    assert [w for w in report.warnings if "innfer calibrate" in w] == []
    assert [w.split(" does")[0] for w in report.warnings] == ["profile.json"]


def test_build_refuses_a_tokenizer_with_more_ids_than_the_models_embedding_rows(
    model_dir, tmp_path
):
    # Client ids are checked against the tokenizer alone: with two tokens past the model's
    # 26 embedding rows, every batch holding one failed in ONNX Runtime (INTERNAL for each
    # request in it), and the build passed (its validation fed ids 0 and 1).
    copy = tmp_path / "embed"
    shutil.copytree(model_dir, copy)
    tok = json.loads((copy / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    assert len(vocab) == len(WORDS) + 5  # TinyEmbedder's rows (tests/textmodel.py)
    vocab.update({"zebra": len(vocab), "yak": len(vocab) + 1})
    (copy / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(BuildError, match=r"tier full: tokenizer ids reach 27, the model "
                       r"embeds 26 rows \(ids 0-25\)"):  # fmt: skip
        build_model(Repository(tmp_path), "embed", progress=False, profile=False)
    # Without the ONNX to read the table from, the engine's error gives its rows.
    from runtime.build.pipeline import check_token_ids

    served = Repository(model_dir.parent).load("embed")
    try:
        with pytest.raises(BuildError, match="tokenizer ids reach 27, the model embeds 26 rows"):
            check_token_ids(served.engines["full"], served.config, "full", vocab_size=28)
        check_token_ids(served.engines["full"], served.config, "full", vocab_size=26)  # fits
    finally:
        for engine in served.engines.values():
            engine.close()


def test_calibrate_text_refuses_too_little_text_and_models_without_a_tokenizer(
    model_dir, tmp_path, capsys
):
    few = _sentences(tmp_path / "few.txt", 5)
    assert main(["calibrate", str(model_dir), "--text", str(few), "--seconds", "1"]) != 0
    assert "give at least 32" in capsys.readouterr().err
    copy = tmp_path / "notext"
    shutil.copytree(model_dir, copy)
    yaml_text = (copy / "model.yaml").read_text()
    (copy / "model.yaml").write_text(yaml_text.split("text:")[0] + "lengths: [8, 16, 24]\n")
    enough = _sentences(tmp_path / "enough.txt", 40)
    assert main(["calibrate", str(copy), "--text", str(enough), "--seconds", "1"]) != 0
    assert "has no text: section" in capsys.readouterr().err


def test_a_shaped_tier_is_refused_until_calibrated_then_built_at_the_measured_counts(
    model_dir, tmp_path
):
    copy = tmp_path / "embed"
    shutil.copytree(model_dir, copy)
    config = yaml.safe_load((copy / "model.yaml").read_text())
    shaped = {"heads": 0.5, "ffn": 0.5, "shaped": True}
    config["tiers"][1]["width"] = shaped
    (copy / "model.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(BuildError, match=r"tier half: .*innfer calibrate MODEL_DIR --text FILE"):
        build_model(Repository(tmp_path), "embed", progress=False, profile=False)

    text = _sentences(tmp_path / "calib.txt", 64)
    assert main(["calibrate", str(copy), "--text", str(text), "--seconds", "4"]) == 0
    inn = runtime.load(copy)
    assert inn.info["sensitivity"]["groups"]
    sizes = inn.sizes(shaped, ModelConfig.load(copy / "model.yaml").multiple_of)
    assert IntegralModel.sizes_key(sizes) in inn.tiers  # calibrated at the shaped counts
    report = build_model(Repository(tmp_path), "embed", progress=False, profile=False)
    # Calibrated: no data-free warning (the kept profile timed the old engines: said so)
    assert [w for w in report.warnings if "innfer calibrate" in w] == []
    assert [w.split(" does")[0] for w in report.warnings] == ["profile.json"]
    tier = json.loads((Repository(tmp_path).tier_dir("embed", "half") / "tier.json").read_text())
    assert tier["sizes"] == sizes


def test_report_text_gives_each_tiers_fidelity_and_marks_calibrated_ones(model_dir, tmp_path):
    copy = tmp_path / "embed"
    shutil.copytree(model_dir, copy)
    held = _sentences(tmp_path / "held.txt", 48)
    out = tmp_path / "fidelity.json"
    args = ["report", str(copy), "--text", str(held), "--json", str(out),
            "--png", str(tmp_path / "f.png")]  # fmt: skip
    assert main(args) == 0
    before = {r["tier"]: r for r in json.loads(out.read_text())}
    assert list(before) == ["full", "half"]  # model.yaml's tiers; the full width first
    assert before["full"]["cosine"] == pytest.approx(1.0) and before["full"]["top10"] == 1.0
    assert before["half"]["cosine"] < 1.0 and not before["half"]["calibrated"]
    assert before["half"]["channels"]["heads"] < before["full"]["channels"]["heads"]
    assert (tmp_path / "f.png").stat().st_size > 0

    calib = _sentences(tmp_path / "calib.txt", 64)
    assert main(["calibrate", str(copy), "--text", str(calib), "--seconds", "4"]) == 0
    assert main(args) == 0
    after = {r["tier"]: r for r in json.loads(out.read_text())}
    assert after["half"]["calibrated"]
    assert after["half"]["cosine"] != before["half"]["cosine"]  # the calibrated weights


def test_report_on_a_text_model_asks_for_text(model_dir, tmp_path, capsys):
    assert main(["report", str(model_dir)]) != 0
    assert "is a text model" in capsys.readouterr().err
    few = _sentences(tmp_path / "few.txt", 5)
    assert main(["report", str(model_dir), "--text", str(few)]) != 0
    assert "give at least 32" in capsys.readouterr().err


def test_build_scores_text_tiers_by_embedding_fidelity_on_held_out_sentences(model_dir, tmp_path):
    copy = tmp_path / "embed"
    shutil.copytree(model_dir, copy)
    config = yaml.safe_load((copy / "model.yaml").read_text())
    config["evaluation"] = {"text": "held.txt", "limit": 40}
    (copy / "model.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(BuildError, match=r"evaluation.text: .*held.txt does not exist"):
        build_model(Repository(tmp_path), "embed", progress=False, profile=False)

    _sentences(copy / "held.txt", 48)
    report = build_model(Repository(tmp_path), "embed", progress=False, profile=False)
    accuracy = {t.name: t.accuracy for t in report.tiers}
    assert accuracy["full"] == pytest.approx(1.0, abs=1e-5)  # the engine against torch
    assert 0 < accuracy["half"] < 0.999
    record = Repository(tmp_path).load_record("embed", "half")
    assert record.accuracy == accuracy["half"]  # the scheduler's accuracy for the tier
    assert "held.txt" in record.accuracy_on

    # other sentences in the file: re-scored although no tier is exported again
    (copy / "held.txt").write_text(
        "".join(f"{w} {w}\n" for w in WORDS * 2), encoding="utf-8"
    )  # fmt: skip
    report = build_model(Repository(tmp_path), "embed", progress=False, profile=False)
    assert not any(t.exported for t in report.tiers)
    assert Repository(tmp_path).load_record("embed", "half").accuracy != accuracy["half"]
    _sentences(copy / "held.txt", 48)

    calib = _sentences(tmp_path / "calib.txt", 64)
    assert main(["calibrate", str(copy), "--text", str(calib), "--seconds", "4"]) == 0
    report = build_model(Repository(tmp_path), "embed", progress=False, profile=False)
    rebuilt = {t.name: t.accuracy for t in report.tiers}
    assert rebuilt["half"] != accuracy["half"]  # re-scored: the calibrated weights


@pytest.mark.parametrize(
    ("evaluation", "text", "match"),
    [
        ({"text": "held.txt"}, False, "evaluation.text: .*without a text: section"),
        ({"text": "held.txt", "dataset": "digits"}, True, "exactly one of dataset"),
        ({"limit": 10}, True, "exactly one of dataset"),
    ],
)
def test_text_evaluation_config_is_checked(model_dir, evaluation, text, match):
    config = yaml.safe_load((model_dir / "model.yaml").read_text())
    config["evaluation"] = evaluation
    if not text:
        del config["text"]
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_dict(config)


def test_channel_search_times_and_scores_a_text_tier_by_embedding_fidelity(model_dir, tmp_path):
    # A uniform text tier: the search's candidates (FFN 13 / 8 / 16 of 32 channels) are
    # exported with dynamic batch and length, timed at the model's example length and
    # scored by the build's text scorer (cosine to the full width on held-out sentences).
    copy = tmp_path / "embed"
    shutil.copytree(model_dir, copy)
    config = yaml.safe_load((copy / "model.yaml").read_text())
    config["tiers"] = [{"name": "full", "width": 1.0}, {"name": "w040", "width": 0.4}]
    config["channel_search"] = {"multiples": [8, 16], "repeats": 3}
    config["evaluation"] = {"text": "held.txt", "limit": 40}
    (copy / "model.yaml").write_text(yaml.safe_dump(config))
    _sentences(copy / "held.txt", 48)
    report = build_model(Repository(tmp_path), "embed", progress=False, profile=False)
    record = Repository(tmp_path).load_record("embed", "w040")
    search = record.channel_search
    cands = search["candidates"]
    assert len(cands) >= 2
    assert all(c["latency_ms"] > 0 and 0 < c["accuracy"] <= 1 for c in cands)
    assert search["evaluation"]["text"] == "held.txt"
    assert record.sizes == cands[search["chosen"]]["sizes"]
    built = {t.name: t for t in report.tiers}
    assert built["w040"].max_abs_err < 1e-4  # the exported choice runs as torch does
    assert Repository(tmp_path).load("embed").engines["w040"] is not None


def test_simulate_plans_a_text_model_at_the_length_asked(model_dir, capsys):
    # Every request was planned as one of the longest length (the profile's top tables),
    # with nothing said: 64 % within budget where short sentences met nearly all.
    import json

    from innfer.cli import _served, main

    profile = json.loads((model_dir / "profile.json").read_text())
    longest = max(int(n) for n in profile["lengths"])
    _, p50, _, _, lane = _served(model_dir)
    assert lane == longest and p50 == _served(model_dir, longest)[1]
    _, p50_short, note, _, lane = _served(model_dir, 5)
    assert lane == 8 and "every request at 8 tokens (lanes [8, 16, 24]" in note
    want = {t: {int(b): v["p50_ms"] for b, v in table.items()}
            for t, table in profile["lengths"]["8"].items()}  # fmt: skip
    assert p50_short == want != p50
    assert main(["simulate", str(model_dir), "--duration", "1", "--load", "0.01",
                 "--policy", "innfer", "--tokens", "12"]) == 0  # fmt: skip
    # Planned at its own 12 tokens, as the server plans a text: between the 8- and 16-token
    # profiles (it was planned as 16)
    head = capsys.readouterr().out.splitlines()[0]
    assert "every request at 12 tokens, between the 8- and 16-token profiles" in head
    at = {n: _served(model_dir, n)[1] for n in (8, 12, 16)}
    for tier, table in at[12].items():
        lo, hi = min(at[8][tier][1], at[16][tier][1]), at[16][tier][1]
        assert lo <= table[1] <= hi and table[1] == pytest.approx(lo + (hi - lo) / 2)
    assert main(["simulate", str(model_dir), "--tokens", "99"]) == 2
    assert "--tokens must be in [1, 24]" in capsys.readouterr().err


@pytest.mark.parametrize(
    "backend, device, graphs, by_tokens",
    [
        ("onnxruntime", "cpu-x86_64", "1", True),
        ("torch", "NVIDIA H100 80GB HBM3", "1", False),  # CUDA graphs: padded to the lane
        ("torch", "NVIDIA H100 80GB HBM3", "0", True),  # eager: padded to the longest
        ("torch", "cpu-x86_64", "1", True),
    ],
)
def test_simulate_plans_by_tokens_only_where_the_server_pads_to_the_longest(
    model_dir, monkeypatch, backend, device, graphs, by_tokens
):
    # A torch profile names its GPU ("NVIDIA H100 ..."): a check for "cuda" matched none, and
    # simulate planned a GPU text model 2x short of what its server plans (helper-319).
    from innfer.cli import _plans_by_tokens

    monkeypatch.setenv("INNFER_CUDA_GRAPHS", graphs)
    assert _plans_by_tokens(model_dir, {"backend": backend, "device": device}) is by_tokens


def test_bench_sends_a_text_model_requests_of_the_length_it_plans(model_dir, monkeypatch, capsys):
    # bench planned at the longest length and sent 16-token requests (another lane).
    from serverutil import fake_run_load

    from innfer.cli import main

    # A fake that records what bench sends (the real command against a real server:
    # test_sim_review.test_bench_runs_against_a_real_server).
    calls = fake_run_load(monkeypatch, tier="x")
    for tokens, lane in ((None, 24), (7, 8)):
        extra = [] if tokens is None else ["--tokens", str(tokens)]
        code = main(["bench", str(model_dir), "--duration", "1", "--load", "0.01", *extra])
        assert code == 0, capsys.readouterr().err
        sent = calls.pop()["inputs"]
        # --tokens 7 sends 7 tokens, planned at their lane, 8 (it sent 8: review helper-250)
        assert {a.shape[1] for a in sent.values()} == {tokens or lane}
        # every token real: the server refuses a mask with gaps (random 0/1 masks made every
        # request of a real run INVALID_ARGUMENT, review helper-122)
        assert (sent["attention_mask"] == 1).all()
        assert f"planned with every request at {lane} tokens" in capsys.readouterr().out


# -- the text build path's review (session 32): each test failed before its fix ------------
def test_a_shaped_tier_beside_its_uniform_one_gets_its_own_share_of_the_budget(
    model_dir, tmp_path, capsys
):
    # Counted on their totals, "half" and its shaped twin were one tier: each got the whole
    # --seconds (the run took 4x its budget) and the summary said "calibrated 1 tiers".
    copy = tmp_path / "embed"
    shutil.copytree(model_dir, copy)
    config = yaml.safe_load((copy / "model.yaml").read_text())
    config["tiers"].append({"name": "halfs", "width": {"heads": 0.5, "ffn": 0.5, "shaped": True}})
    (copy / "model.yaml").write_text(yaml.safe_dump(config))
    text = _sentences(tmp_path / "calib.txt", 64)
    assert main(["calibrate", str(copy), "--text", str(text), "--seconds", "4"]) == 0
    out = capsys.readouterr().out
    assert "calibrated 2 tiers on 64 sentences (2 s each" in out


def test_a_rerun_keeps_the_stored_tier_where_it_is_closer_to_the_full_width(
    model_dir, tmp_path, capsys
):
    # calibrate always replaced the stored tier: a 1 s rerun with --grid uniform put a refit
    # (0.9965) in place of a distilled tier (0.9970). It now keeps the one closer on the
    # check sentences, as the image path does, and says so.
    copy, text, inn, half = _calibrated(model_dir, tmp_path)
    first = inn.info["text_calibration"][half]
    stored = {k: v.clone() for k, v in inn.tiers[half].items()}
    capsys.readouterr()
    argv = ["calibrate", str(copy), "--text", str(text), "--seconds", "1", "--grid", "uniform"]
    assert main(argv) == 0
    again = runtime.load(copy)
    kept = again.info.get("text_calibration_kept", {})
    if half in kept:  # the usual outcome: the stored tier, weights and record, stays
        assert all((again.tiers[half][k] == v).all() for k, v in stored.items())
        assert again.info["text_calibration"][half] == first
        assert "half: kept the tier stored by an earlier run" in capsys.readouterr().out
        assert kept[half]["stored"] >= max(kept[half]["start"], kept[half]["distilled"])
    else:  # the rerun was closer on the check: it replaced the stored tier, on the record
        record = again.info["text_calibration"][half]
        assert record["check_cosine"]["stored"] < max(
            record["check_cosine"]["start"], record["check_cosine"]["distilled"]
        )


def test_a_rerun_on_other_text_replaces_the_stored_tier_and_says_it_was_not_compared(
    model_dir, tmp_path, capsys
):
    # The stored tier's run checked other sentences, which it may have trained on: judged
    # on this run's check it read closer for it and was kept whatever this run made.
    copy, _, inn, half = _calibrated(model_dir, tmp_path)
    capsys.readouterr()
    other = tmp_path / "other.txt"
    lines = [" ".join(reversed(s.split())) for s in _sentences(other, 80).read_text().split("\n")]
    other.write_text("\n".join(lines), encoding="utf-8")
    assert main(["calibrate", str(copy), "--text", str(other), "--seconds", "1"]) == 0
    out = capsys.readouterr().out
    record = runtime.load(copy).info["text_calibration"][half]
    assert record["stored_judged"] is False
    assert record["check_digest"] != inn.info["text_calibration"][half]["check_digest"]
    assert "replaced the tier stored by an earlier run without comparing them" in out


def test_calibrate_names_a_tokenizer_with_ids_past_the_embedding_table(model_dir, tmp_path, capsys):
    # An IndexError in the teacher's pass, reported as "internal error ... a bug".
    copy = tmp_path / "embed"
    shutil.copytree(model_dir, copy)
    tok = json.loads((copy / "tokenizer.json").read_text())
    tok["model"]["vocab"] = {w: i + 100 if i >= 5 else i for w, i in tok["model"]["vocab"].items()}
    (copy / "tokenizer.json").write_text(json.dumps(tok))
    text = _sentences(tmp_path / "calib.txt", 64)
    assert main(["calibrate", str(copy), "--text", str(text), "--seconds", "1"]) != 0
    err = capsys.readouterr().err
    assert "past the model's embedding table" in err and "internal error" not in err


def test_calibration_text_is_read_bounded_and_its_problems_named(model_dir, tmp_path, capsys):
    # One 12.6 MB line took 14.6 s and 1.2 GB to tokenize (every overflowing piece built to
    # count what truncation drops); a Latin-1 file said only "'utf-8' codec can't decode";
    # --samples 10 said the file had 10 lines.
    from runtime.repository.tokenizer import read_sentences, text_chars

    path = _sentences(tmp_path / "calib.txt", 40)
    with path.open("a", encoding="utf-8") as f:
        f.write(" ".join(["alpha"] * 200_000) + "\n")
    lines = read_sentences(path, max_chars=text_chars(24))
    assert len(lines) == 41 and len(lines[-1]) == text_chars(24)
    assert main(["calibrate", str(model_dir), "--text", str(path), "--samples", "10"]) != 0
    assert "--samples 10 keeps 10; give at least 32 sentences" in capsys.readouterr().err
    # report's flag is --sentences: it named calibrate's --samples
    assert main(["report", str(model_dir), "--text", str(path), "--sentences", "5"]) != 0
    assert "--sentences 5 keeps 5; give at least 32" in capsys.readouterr().err
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\u00e9 au lait\n".encode("latin-1") * 40)
    assert main(["calibrate", str(model_dir), "--text", str(latin), "--seconds", "1"]) != 0
    assert f"{latin} is not UTF-8 text" in capsys.readouterr().err
    argv = ["calibrate", str(model_dir), "--data", "digits", "--seconds", "1"]
    assert main(argv) != 0
    assert "is a text model: calibrate it with --text FILE" in capsys.readouterr().err


def test_the_build_scores_a_text_tier_again_when_the_tokenizer_settings_change(model_dir, tmp_path):
    # The accuracy key named the evaluation file and limit only: with max_length changed, a
    # tier kept the fidelity measured on the old ids.
    from runtime.build.pipeline import evaluation_key

    copy = tmp_path / "embed"
    shutil.copytree(model_dir, copy)
    _sentences(copy / "eval.txt", 40)
    data = yaml.safe_load((copy / "model.yaml").read_text())
    data["evaluation"] = {"text": "eval.txt"}
    (copy / "model.yaml").write_text(yaml.safe_dump(data))
    before = evaluation_key(ModelConfig.load(copy / "model.yaml"), copy)
    data["text"]["max_length"] = data["text"]["max_length"] - 4
    (copy / "model.yaml").write_text(yaml.safe_dump(data))
    assert evaluation_key(ModelConfig.load(copy / "model.yaml"), copy) != before
    tok = json.loads((copy / "tokenizer.json").read_text())
    tok["model"]["vocab"]["zebra"] = len(tok["model"]["vocab"])
    shorter = evaluation_key(ModelConfig.load(copy / "model.yaml"), copy)
    (copy / "tokenizer.json").write_text(json.dumps(tok))
    assert evaluation_key(ModelConfig.load(copy / "model.yaml"), copy) != shorter


def test_a_sentence_that_gives_no_tokens_is_named(model_dir, tmp_path, capsys):
    # With a tokenizer that adds no [CLS]/[SEP], a line of zero-width characters gives no
    # token: "every sentence needs at least one token", naming neither file nor line.
    copy = tmp_path / "embed"
    shutil.copytree(model_dir, copy)
    tok = json.loads((copy / "tokenizer.json").read_text())
    tok["post_processor"] = None
    (copy / "tokenizer.json").write_text(json.dumps(tok))
    text = _sentences(tmp_path / "calib.txt", 40)
    with text.open("a", encoding="utf-8") as f:
        f.write("\u200b\u200b\n")
    assert main(["calibrate", str(copy), "--text", str(text), "--seconds", "1"]) != 0
    err = capsys.readouterr().err
    assert f"{text}: 1 sentences give no tokens" in err and "non-empty line 41" in err


def test_a_text_model_taking_int32_ids_is_scored_on_its_evaluation_text(model_dir, tmp_path):
    # The build fed the tokenizer's int64 ids to an int32 model (which serving accepts):
    # ONNX Runtime's "Unexpected input data type" ended the build (review helper-122).
    copy = tmp_path / "embed"
    shutil.copytree(model_dir, copy)
    config = yaml.safe_load((copy / "model.yaml").read_text())
    for t in config["inputs"]:
        t["dtype"] = "int32"
    config["evaluation"] = {"text": "held.txt", "limit": 40}
    (copy / "model.yaml").write_text(yaml.safe_dump(config))
    _sentences(copy / "held.txt", 48)
    report = build_model(Repository(tmp_path), "embed", progress=False, profile=False)
    accuracy = {t.name: t.accuracy for t in report.tiers}
    assert accuracy["full"] == pytest.approx(1.0, abs=1e-5)
    assert 0 < accuracy["half"] < 0.999


def test_data_sets_are_refused_for_a_model_of_several_inputs_by_name(tmp_path, capsys):
    # A model of token ids and a mask without a text: section (mask_input) crashed in its
    # forward under calibrate / report --data: "missing 1 required positional argument:
    # 'attention_mask'", an internal error (review helper-142).
    import numpy as np
    import torch
    from textmodel import TinyEmbedder, model_yaml

    import runtime
    from innfer.cli import main
    from runtime.build.pipeline import add_model

    torch.manual_seed(0)
    ids, mask = torch.randint(0, 20, (2, 7)), torch.ones(2, 7, dtype=torch.long)
    inn = runtime.convert(TinyEmbedder().eval(), (ids, mask))
    spec = {k: v for k, v in model_yaml().items() if k != "text"}
    d = add_model(tmp_path, "ids", inn, {**spec, "mask_input": "attention_mask"})
    np.savez(tmp_path / "tok.npz", x=np.random.default_rng(0).integers(0, 20, (200, 7)),
             y=np.zeros(200, np.int64))  # fmt: skip
    for command in (["calibrate", str(d), "--widths", "0.5", "--steps", "1"], ["report", str(d)]):
        assert main([*command, "--data", str(tmp_path / "tok.npz")]) == 2
        err = capsys.readouterr().err
        assert "takes 2 inputs (input_ids, attention_mask)" in err, err
        assert "internal error" not in err


def test_a_calibrated_tiers_line_says_which_network_was_kept(monkeypatch):
    # "h050f025: 94 distillation steps, loss 0.1706 -> 0.1889" read as a failed run: the
    # held-out check chose the distilled network, and the line did not say so (review
    # helper-145).
    from types import SimpleNamespace

    from innfer import cli

    monkeypatch.setattr(cli, "_tier_names", lambda *a: {"k": "h050f025"})
    rec = {"steps": 94, "first_loss": 0.1706, "last_loss": 0.1889, "kept": "distilled",
           "check_cosine": {"start": 0.9012, "distilled": 0.9345}, "seconds": 1.0}  # fmt: skip
    tuned = SimpleNamespace(info={"text_calibration": {"k": rec}})
    line = cli._text_summary(SimpleNamespace(info={}), tuned, None, 8, 60.0, None)
    assert "h050f025: 94 distillation steps, loss 0.1706 -> 0.1889" in line
    assert "kept: cosine to the full width 0.9345 on the check sentences, the refit " \
        "alone 0.9012" in line  # fmt: skip


def test_an_interrupted_text_calibration_keeps_the_widths_it_finished(
    model_dir, tmp_path, capsys, monkeypatch
):
    # It saved once at the end: an interrupt in the second width lost the first (review
    # helper-150, the image path; the same for --text).
    import runtime.inn.distill as distill

    copy = tmp_path / "embed"
    shutil.copytree(model_dir, copy)
    text = _sentences(tmp_path / "calib.txt", 64)
    real, calls = distill.calibrate_network, []

    def calibrate_network(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # in the second width
        return real(*args, **kwargs)

    monkeypatch.setattr(distill, "calibrate_network", calibrate_network)
    argv = ["calibrate", str(copy), "--text", str(text), "--steps", "2", "--widths", "0.5", "0.25"]
    assert main(argv) == 130
    assert "1 of 2 widths are calibrated and saved in" in capsys.readouterr().err
    inn = runtime.load(copy)
    assert len(inn.tiers) == 1 and len(inn.info["text_calibration"]) == 1


def test_lengths_past_the_models_position_table_are_named_in_the_build_error(tmp_path):
    # TinyBert's position table holds 32: profiled at 64 tokens the build failed with
    # "the engine failed on a batch of 4: ... invalid expand shape", naming neither the
    # length nor the table (review helper-301).
    import torch
    from textmodel import TinyEmbedder, model_yaml, write_tokenizer

    from runtime.build.pipeline import add_model

    torch.manual_seed(0)
    ids, mask = torch.randint(0, 20, (2, 7)), torch.ones(2, 7, dtype=torch.long)
    inn = runtime.convert(TinyEmbedder().eval(), (ids, mask))
    config = {**model_yaml(), "lengths": [8, 64], "text": {"max_length": 64}}
    d = add_model(tmp_path, "embed", inn, config)
    write_tokenizer(d / "tokenizer.json")
    with pytest.raises(BuildError, match=r"the engine failed on a batch of 4 at 64 tokens: .*"
                       r"no more tokens than its position table holds: lower lengths "
                       r"\(longest 64\)"):  # fmt: skip
        build_model(Repository(tmp_path), "embed", progress=False, repeats=1)
