"""A long text still on the tokenizer threads when its model is swapped or reloaded is served
by the successor, not refused (review helper-132): the swap promises that no accepted
request fails, yet the text's runtime, looked up before its decode, had begun to stop by
the time it was decoded - UNAVAILABLE while the new runtime already served. Torch-free: a
fake-backend text model with a real ``tokenizers`` tokenizer."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from pathlib import Path

import pytest

from runtime.engines.fake import write_model
from runtime.repository import Repository
from runtime.repository.tokenizer import TextTokenizer
from server.config import ServerConfig
from server.dataplane import TOKENIZE_INLINE_CHARS, DataPlane
from server.errors import Unavailable
from server.metrics import Metrics
from server.proto_gen import grpc_service_pb2 as pb

WORDS = ["the", "a", "model", "serves", "text", "fast"]


def _tokenizer(path: Path, extra: tuple[str, ...] = ()) -> None:
    from tokenizers import Tokenizer, pre_tokenizers, processors
    from tokenizers.models import WordLevel

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *WORDS, *extra])}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tok.save(str(path))


def _text_model(root: Path) -> None:
    d = write_model(
        root, "t", {"w100": 1.0, "w050": 0.5},
        {"w100": {1: 2.0, 2: 2.0, 4: 2.0}, "w050": {1: 1.0, 2: 1.0, 4: 1.0}},
        inputs=[{"name": "input_ids", "dtype": "int64", "shape": [-1]},
                {"name": "attention_mask", "dtype": "int64", "shape": [-1]}],
        outputs=[{"name": "embedding", "dtype": "float32", "shape": [4]}],
        text={"max_length": 256}, lengths=[256], max_batch=4, default_latency_budget_ms=5000,
    )  # fmt: skip
    _tokenizer(d / "tokenizer.json")
    profile = json.loads((d / "profile.json").read_text())
    profile["lengths"] = {"256": profile["tiers"]}
    (d / "profile.json").write_text(json.dumps(profile))
    repo = Repository(root)
    repo.record_tokenizer("t", repo.config("t"))


def _request(text: str) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name="t")
    t = req.inputs.add(name="text", datatype="BYTES", shape=[1, 1])
    t.contents.bytes_contents.append(text.encode())
    return req


@pytest.fixture
def slow_long_texts(monkeypatch):
    encode = TextTokenizer.encode_rows

    def slowly(self, texts):  # a long text takes a while on the tokenizer threads
        if sum(map(len, texts)) > TOKENIZE_INLINE_CHARS:
            time.sleep(0.3)
        return encode(self, texts)

    monkeypatch.setattr(TextTokenizer, "encode_rows", slowly)


@pytest.mark.parametrize("how", ["swap", "reload", "new tokenizer"])
def test_a_text_decoded_across_a_swap_is_served_by_the_successor(tmp_path, slow_long_texts, how):
    _text_model(tmp_path)
    cfg = ServerConfig.from_dict(
        {"repository": str(tmp_path), "models": ["t"], "profile_at_load": False}
    )
    long_text = "the model serves text fast " * (TOKENIZE_INLINE_CHARS // 20)

    async def go():
        plane = DataPlane(dataclasses.replace(cfg, backend="fake"), Metrics())
        await plane.load_all()
        try:
            task = asyncio.ensure_future(plane.infer(_request(long_text), None))
            await asyncio.sleep(0.05)  # on the tokenizer threads now
            if how == "new tokenizer":  # another file: ids may differ, so no hand-over
                _tokenizer(tmp_path / "t" / "tokenizer.json", extra=("new",))
                repo = Repository(tmp_path)
                repo.record_tokenizer("t", repo.config("t"))
            await (plane.swap("t") if how == "swap" else plane.load("t"))
            got = (await asyncio.gather(task, return_exceptions=True))[0]
            again = await plane.infer(_request(long_text), None)  # the successor serves it
            return got, again
        finally:
            await plane.stop_models()

    got, again = asyncio.run(go())
    assert again.parameters["tier"].string_param
    if how == "new tokenizer":
        assert isinstance(got, Unavailable)
    else:
        assert isinstance(got, pb.ModelInferResponse), got  # was Unavailable
        assert got.parameters["tier"].string_param


def test_a_handed_over_requests_failure_counts_in_its_new_runtimes_statistics(
    tmp_path, slow_long_texts
):
    # After the hand-over the successor refuses it (its tier is gone): the failure went to
    # the retired runtime's statistics, lost with it on a reload (review helper-140).
    import yaml

    _text_model(tmp_path)
    cfg = ServerConfig.from_dict(
        {"repository": str(tmp_path), "models": ["t"], "profile_at_load": False}
    )
    long_text = "the model serves text fast " * (TOKENIZE_INLINE_CHARS // 20)
    request = _request(long_text)
    request.parameters["tier"].string_param = "w050"

    async def go():
        plane = DataPlane(dataclasses.replace(cfg, backend="fake"), Metrics())
        await plane.load_all()
        old = plane.models["t"]
        try:
            task = asyncio.ensure_future(plane.infer(request, None))
            await asyncio.sleep(0.05)  # on the tokenizer threads now
            path = tmp_path / "t" / "model.yaml"
            spec = yaml.safe_load(path.read_text())
            spec["tiers"] = [t for t in spec["tiers"] if t["name"] == "w100"]
            path.write_text(yaml.safe_dump(spec))
            await plane.load("t")
            got = (await asyncio.gather(task, return_exceptions=True))[0]
            return got, old.stats.fail.count, plane.models["t"].stats.fail.count
        finally:
            await plane.stop_models()

    got, old_fails, new_fails = asyncio.run(go())
    assert "w050" in str(got), got  # the new set has no w050
    assert (old_fails, new_fails) == (0, 1)


def test_a_tokenizer_slow_on_the_loop_moves_its_texts_to_the_threads(tmp_path, monkeypatch):
    # A tokenizer.json whose normalizer expands each character held the event loop 5.5 s
    # for a 12-byte text, every request and health probe behind it (review 156). One such
    # encoding moves the model's texts onto the tokenizer threads.
    import threading

    encode, threads = TextTokenizer.encode_rows, []

    def slowly(self, texts):
        threads.append(threading.current_thread())
        time.sleep(0.06)  # past TOKENIZE_INLINE_LONG_S
        return encode(self, texts)

    monkeypatch.setattr(TextTokenizer, "encode_rows", slowly)
    _text_model(tmp_path)
    cfg = ServerConfig.from_dict(
        {"repository": str(tmp_path), "models": ["t"], "profile_at_load": False}
    )

    async def go():
        plane = DataPlane(dataclasses.replace(cfg, backend="fake"), Metrics())
        await plane.load_all()
        try:
            for _ in range(2):
                await plane.infer(_request("a short sentence"), None)
            return threading.current_thread()
        finally:
            await plane.stop_models()

    loop_thread = asyncio.run(go())
    assert threads[0] is loop_thread and threads[1] is not loop_thread
