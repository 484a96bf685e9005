"""Text in, embeddings out (issue 13): a tiny sentence embedder served by the real server
and ONNX Runtime, called with the stock tritonclient - raw strings (BYTES) tokenized in the
server with the model's own tokenizer.json, or INT64 ids and mask; dynamic batch and
sequence length; one scheduler lane per profiled length.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time

import numpy as np
import pytest
import torch
import tritonclient.grpc as tc
from serverutil import ServerThread
from textmodel import LENGTHS, MAX_LENGTH, WORDS, build_text_repository
from tritonclient.utils import InferenceServerException

from runtime.repository import Repository
from runtime.repository.tokenizer import TextTokenizer
from server.errors import DeadlineExceeded
from server.metrics import Metrics
from server.model_runtime import ModelRuntime, batch_rows

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("textrepo")
    d, model = build_text_repository(root)
    return root, d, model


@pytest.fixture(scope="module")
def server(repo):
    """The text model's server: conftest's ``client`` fixture calls it."""
    s = ServerThread({"repository": str(repo[0]), "http_port": 0}).start()
    yield s
    s.stop()


def _text_input(texts: list[str], name: str = "text") -> tc.InferInput:
    t = tc.InferInput(name, [len(texts), 1], "BYTES")
    t.set_data_from_numpy(np.array([[s.encode()] for s in texts], dtype=object))
    return t


def _embed(client, texts, tier="full", **params):
    r = client.infer("embed", [_text_input(texts)], parameters={"tier": tier, **params})
    return r.as_numpy("embedding"), r.get_response().parameters


@torch.no_grad()
def _reference(model, d, texts):
    """What the source module computes on the tokenizer's ids, one text at a time."""
    tok = TextTokenizer(d / "tokenizer.json", MAX_LENGTH)
    out = []
    for s in texts:
        ids, mask = tok.encode([s])
        out.append(model(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()[0])
    return np.stack(out)


def _code(exc_info) -> str:
    return exc_info.value.status()


def test_text_in_embeddings_out_match_the_source_model_one_text_at_a_time(repo, client):
    _, d, model = repo
    # Mixed lengths in one request: padded to the longest in the server, masked out.
    texts = ["the model", "elastic width heads serve a sentence embedding fast", "text"]
    got, params = _embed(client, texts)
    assert got.shape == (3, 16) and got.dtype == np.float32
    np.testing.assert_allclose(got, _reference(model, d, texts), atol=2e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert params["tier"].string_param == "full"


def test_the_smaller_tier_serves_text_too_and_stays_close(client):
    texts = ["the small model serves text", "a large network"]
    full, _ = _embed(client, texts, "full")
    half, params = _embed(client, texts, "half")
    assert params["tier"].string_param == "half" and half.shape == (2, 16)
    assert not np.allclose(half, full)  # a different network...
    assert np.isfinite(half).all()  # ...that still runs on the same tokenized text


def test_unicode_and_empty_strings_are_embedded(repo, client):
    _, d, model = repo
    texts = ["café naïve 😀 ünïcode", "", "   "]
    got, _ = _embed(client, texts)
    np.testing.assert_allclose(got, _reference(model, d, texts), atol=2e-5)
    # Accents are stripped by the tokenizer's normaliser: "café naive" == "cafe naive".
    np.testing.assert_allclose(_embed(client, ["café naïve"])[0], _embed(client, ["cafe naive"])[0])


def test_text_sent_as_json_over_rest_is_embedded_as_over_grpc(repo, client, server):
    # KServe v2's JSON: BYTES as strings (unicode and empty included), in a [n, 1] shape
    import json
    import urllib.request

    texts = ["café naïve 😀 ünïcode", "", "the model serves text"]
    body = {"inputs": [{"name": "text", "shape": [3, 1], "datatype": "BYTES", "data": texts}],
            "parameters": {"tier": "full"}}  # fmt: skip
    url = f"http://127.0.0.1:{server.server.rest.port}/v2/models/embed/infer"
    req = urllib.request.Request(url, data=json.dumps(body).encode())
    with urllib.request.urlopen(req, timeout=30) as r:
        doc = json.loads(r.read())
    out = doc["outputs"][0]
    got = np.array(out["data"], np.float32).reshape(out["shape"])
    np.testing.assert_allclose(got, _embed(client, texts)[0], atol=1e-6)
    assert doc["parameters"]["tier"] == "full" and doc["parameters"]["sequence_length"] > 0


def test_over_long_text_is_truncated_at_max_length_tokens(client, server):
    def counted() -> float:  # for the operator: invisible but per answer (review helper-153)
        get = server.server.metrics.registry.get_sample_value
        return get("innfer_truncated_texts_total", {"model": "embed"}) or 0.0

    words = " ".join(WORDS[i % len(WORDS)] for i in range(100))  # ~100 tokens
    first = " ".join(words.split()[: MAX_LENGTH - 2])  # what fits beside [CLS] and [SEP]
    before = counted()
    cut, params = _embed(client, ["the model", words])
    whole, plain = _embed(client, ["the model", first])
    np.testing.assert_allclose(cut, whole, atol=1e-6)
    # The cut was silent: the answer now says which rows lost tokens (only when one did).
    assert params["truncated_rows"].string_param == "[1]"
    assert "truncated_rows" not in plain
    assert counted() - before == 1


def test_truncate_false_refuses_an_over_long_text_naming_its_row_and_length(repo, client):
    words = " ".join(WORDS[i % len(WORDS)] for i in range(100))
    tokens = TextTokenizer(repo[1] / "tokenizer.json", 1000).lengths([words])[0]
    assert tokens == 102  # 100 words, [CLS] and [SEP]
    with pytest.raises(InferenceServerException) as e:
        _embed(client, ["the model", words, words], truncate=False)
    assert _code(e) == "StatusCode.INVALID_ARGUMENT"
    assert e.value.message().endswith(
        f"text[1] is 102 tokens, over max_length {MAX_LENGTH}; shorten it or send truncate=true"
    )
    # Texts that fit are served as ever; truncate=true is the default's behaviour.
    fits, params = _embed(client, ["the model"], truncate=False)
    np.testing.assert_allclose(fits, _embed(client, ["the model"])[0])
    assert "truncated_rows" not in params
    assert _embed(client, [words], truncate=True)[1]["truncated_rows"].string_param == "[0]"
    with pytest.raises(InferenceServerException, match="'truncate' must be a bool") as e:
        _embed(client, ["the model"], truncate="no")
    assert _code(e) == "StatusCode.INVALID_ARGUMENT"


def test_long_text_is_tokenized_off_the_event_loop_while_a_short_request_is_answered(
    server, monkeypatch
):
    # Tokenizing ran on the event loop: 8 texts of 16 KB took 49 ms there, and no other
    # request was decoded, scheduled or answered meanwhile.
    import threading
    import time

    import tritonclient.grpc.aio as aio

    encode = TextTokenizer.encode_rows
    threads, long_started = {}, threading.Event()

    def slow(self, texts):  # records where it ran; a long text takes 0.5 s
        long = sum(len(s) for s in texts) > 4000
        threads["long" if long else "short"] = threading.get_ident()
        if long:
            long_started.set()
            time.sleep(0.5)
        return encode(self, texts)

    monkeypatch.setattr(TextTokenizer, "encode_rows", slow)
    long_text = " ".join(WORDS * 20)[:1500]  # 4 rows: 6,000 characters

    async def go():
        c = aio.InferenceServerClient(server.address)
        answered = []

        async def call(name, texts):
            await c.infer("embed", [_text_input(texts)], parameters={"tier": "full"})
            answered.append(name)

        try:
            long = asyncio.ensure_future(call("long", [long_text] * 4))
            assert await asyncio.to_thread(long_started.wait, 10)
            await call("short", ["the model"])
            await long
        finally:
            await c.close()
        return answered

    assert asyncio.run(go()) == ["short", "long"]
    assert threads["short"] == server.thread.ident  # short text: inline, no hop
    assert threads["long"] != server.thread.ident


def test_the_tokenizer_threads_end_when_the_server_stops(repo):
    import threading

    def tokenizer_threads() -> set[threading.Thread]:
        return {t for t in threading.enumerate() if t.name.startswith("tokenize_")}

    others = tokenizer_threads()  # the module's server's
    s = ServerThread({"repository": str(repo[0])}).start()
    try:
        s.call(s.server.plane.infer(_bytes_request([" ".join(WORDS * 20)[:1500]] * 2), None))
        assert tokenizer_threads() - others  # this server's, started by the long text
    finally:
        s.stop()
    assert tokenizer_threads() <= others


def _bytes_request(texts):
    from server.proto_gen import grpc_service_pb2 as pb

    req = pb.ModelInferRequest(model_name="embed")
    req.parameters["tier"].string_param = "full"
    t = req.inputs.add(name="text", datatype="BYTES", shape=[len(texts), 1])
    t.contents.bytes_contents.extend(s.encode() for s in texts)
    return req


def test_ids_and_mask_as_int64_give_the_same_embeddings_as_text(repo, client):
    _, d, _ = repo
    texts = ["the server", "a sentence embedding request"]
    ids, mask = TextTokenizer(d / "tokenizer.json", MAX_LENGTH).encode(texts)
    inputs = []
    for name, a in (("input_ids", ids), ("attention_mask", mask)):
        t = tc.InferInput(name, list(a.shape), "INT64")
        t.set_data_from_numpy(a)
        inputs.append(t)
    r = client.infer("embed", inputs, parameters={"tier": "full"})
    np.testing.assert_allclose(r.as_numpy("embedding"), _embed(client, texts)[0], atol=1e-6)


@pytest.mark.parametrize("width, pad", [(LENGTHS[-1], 0), (2 * LENGTHS[-1] + 5, 0),
                                        (2 * LENGTHS[-1] + 5, 10**6),
                                        (LENGTHS[-1], -100)])  # fmt: skip
def test_ids_padded_to_a_fixed_width_are_planned_at_their_real_length(repo, client, width, pad):
    # A client padding to max_length sent a 4-token sentence as 24 columns: it was planned
    # (lane, sequence_length), counted and run as 24 tokens. Padded beyond the longest lane
    # (HF's padding="max_length" pads to the tokenizer's model_max_length: MiniLM's 512,
    # its lanes end at 256) it was refused, its padding counted as its length; a pad id
    # outside the vocabulary, in columns the padding cut drops, as well.
    _, d, _ = repo
    texts = ["the model", "a small model serves"]  # 4 and 6 tokens
    ids, mask = TextTokenizer(d / "tokenizer.json", MAX_LENGTH).encode(texts)
    ids = np.pad(ids, [(0, 0), (0, width - ids.shape[1])], constant_values=pad)
    mask = np.pad(mask, [(0, 0), (0, width - mask.shape[1])])
    # A sentinel pad id in every padded column, the shorter row's within the longer one's
    # length too: refused there while rows of one length were served (review helper-238).
    ids[mask == 0] = pad
    r = client.infer("embed", [_ids_of("input_ids", ids), _ids_of("attention_mask", mask)],
                     parameters={"tier": "full"})  # fmt: skip
    assert r.get_response().parameters["sequence_length"].int64_param == LENGTHS[0]
    np.testing.assert_allclose(r.as_numpy("embedding"), _embed(client, texts)[0], atol=1e-6)


def test_text_the_tokenizer_makes_no_token_of_is_refused_naming_its_row(server, client):
    # A tokenizer that adds no [CLS]/[SEP] (GPT-2 style) makes nothing of "": sent alone it
    # failed in the engine (INTERNAL, counted as an engine failure and an SLO miss); beside
    # another text it came back as a zero vector.
    from tokenizers import processors

    tok = server.server.plane.models["embed"].served.tokenizer._tok
    before = tok.post_processor
    tok.post_processor = processors.TemplateProcessing(single="$A", special_tokens=[])
    try:
        for texts, row in (([""], 0), (["the model", "   "], 1)):
            with pytest.raises(InferenceServerException,
                               match=rf"text\[{row}\] gives no tokens: model embed's "
                                     "tokenizer makes nothing of it") as e:  # fmt: skip
                client.infer("embed", [_text_input(texts)])
            assert _code(e) == "StatusCode.INVALID_ARGUMENT"
        got, _ = _embed(client, ["the model"])
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    finally:
        tok.post_processor = before


@pytest.mark.parametrize("rows", [1, 4])  # inline, and (4,000 characters) on the threads
def test_a_tokenizer_failure_is_internal_with_its_reason_and_counted_as_failed(
    server, client, rows
):
    # A panic in the tokenizer's library on some characters reached the client as INTERNAL
    # "internal error in ModelInfer; see logs", counted nowhere but gRPC's codes (review 173).
    tok = server.server.plane.models["embed"].served.tokenizer
    real = tok._tok

    class Panicking:
        def __getattr__(self, name):
            return getattr(real, name)

        def encode_batch(self, texts):
            if any("boom" in t for t in texts):
                raise BaseException("index out of bounds")  # as pyo3's PanicException
            return real.encode_batch(texts)

    def failed() -> float:
        get = server.server.metrics.registry.get_sample_value
        labels = {"model": "embed", "tier": "", "outcome": "failed"}
        return get("innfer_requests_total", labels) or 0.0

    before = failed()
    tok._tok = Panicking()
    try:
        with pytest.raises(InferenceServerException,
                           match=r"model embed: the tokenizer failed on these texts "
                                 r"\(BaseException: index out of bounds\)") as e:  # fmt: skip
            client.infer("embed", [_text_input(["boom " + "x" * 995] * rows)])
        assert _code(e) == "StatusCode.INTERNAL"
        got, _ = _embed(client, ["the model"])  # the model serves on
        assert got.shape[0] == 1
    finally:
        tok._tok = real
    assert failed() - before == 1


def test_a_reload_with_another_tokenizer_starts_the_statistics_afresh(repo, tmp_path, caplog):
    # Only the config and the tiers' ONNX were compared: a reload after tokenizer.json
    # changed (every text answer with it) kept the old statistics and build id (review 173).
    import logging
    import shutil

    from runtime.repository.config import ModelConfig

    root = tmp_path / "repo"
    shutil.copytree(repo[0], root)
    d = root / "embed"
    s = ServerThread({"repository": str(root), "model_control": "explicit"}).start()
    c = tc.InferenceServerClient(s.address)

    def count() -> int:
        stats = c.get_inference_statistics("embed", as_json=True)["model_stats"][0]
        return int(stats.get("inference_count", 0))

    try:
        for _ in range(3):
            _embed(c, ["the model"])
        c.load_model("embed")  # nothing changed: the statistics go on
        kept = count()
        config = ModelConfig.load(d / "model.yaml")
        tokenizer = d / config.text.tokenizer
        tokenizer.write_text(json.dumps(json.loads(tokenizer.read_text()), indent=4))
        Repository(root).record_tokenizer("embed", config)  # as a rebuild records it
        with caplog.at_level(logging.INFO, "innfer.dataplane"):
            c.load_model("embed")
        fresh = count()
        _embed(c, ["the model"])  # and it serves
    finally:
        c.close()
        s.stop()
    assert kept >= 3 and fresh == 0
    builds = re.findall(r"model embed ready: .* build ([0-9a-f]{12})", caplog.text)
    assert len(builds) == 1 and builds[0] != Repository(repo[0]).load("embed").build_id


def test_a_typo_in_truncate_is_refused_on_an_ids_request_too(repo, client):
    _, d, _ = repo
    ids, mask = TextTokenizer(d / "tokenizer.json", MAX_LENGTH).encode(["the model"])
    with pytest.raises(InferenceServerException, match="truncate") as e:
        client.infer("embed", [_ids_of("input_ids", ids), _ids_of("attention_mask", mask)],
                     parameters={"truncate": "garbage"})  # fmt: skip
    assert _code(e) == "StatusCode.INVALID_ARGUMENT"


@pytest.mark.parametrize("width", [8, 64])  # within the longest lane (24), and past it
def test_a_left_padded_ids_row_is_said_to_be_left_padded_at_any_width(repo, client, width):
    # Padded left to 64 columns (HF padding_side="left", padding="max_length"), a 4-token
    # sentence was told its sequence length 64 was too long (review 173).
    _, d, _ = repo
    ids, mask = TextTokenizer(d / "tokenizer.json", MAX_LENGTH).encode(["the small model"])
    n = ids.shape[1]
    left_ids = np.zeros((1, width), np.int64)
    left_mask = np.zeros((1, width), np.int64)
    left_ids[0, -n:], left_mask[0, -n:] = ids[0], mask[0]
    with pytest.raises(InferenceServerException,
                       match="row 0 is left-padded, has gaps or has no token") as e:  # fmt: skip
        client.infer("embed", [_ids_of("input_ids", left_ids),
                               _ids_of("attention_mask", left_mask)])  # fmt: skip
    assert _code(e) == "StatusCode.INVALID_ARGUMENT"


def _ids(name, shape, dtype="INT64"):
    t = tc.InferInput(name, shape, dtype)
    t.set_data_from_numpy(np.ones(shape, np.int64 if dtype == "INT64" else np.int32))
    return t


def _ids_of(name, values):
    a = np.asarray(values, np.int64)
    t = tc.InferInput(name, list(a.shape), "INT64")
    t.set_data_from_numpy(a)
    return t


@pytest.mark.parametrize(
    "inputs, message",
    [
        (lambda: [_ids("input_ids", [1, 5], "INT32"), _ids("attention_mask", [1, 5])],
         "datatype 'INT32', expected INT64"),
        # Ids past the vocabulary failed inside the engine (INTERNAL, and every request in
        # the batch with it); negative ones silently read another embedding row.
        (lambda: [_ids_of("input_ids", [[2, 10**6, 3]]), _ids("attention_mask", [1, 3])],
         r"token id 1000000 at \[0, 1\] is outside \[0, "),
        (lambda: [_ids_of("input_ids", [[2, -1]]), _ids("attention_mask", [1, 2])],
         r"token id -1 at \[0, 1\]"),
        (lambda: [_ids("input_ids", [1, 2]), _ids_of("attention_mask", [[1, 2]])],
         "an attention mask holds 0"),
        # Served silently: a left-padded row's embedding was wrong (cosine 0.79 to the
        # right-padded row's), an all-zero row came back as a zero vector.
        (lambda: [_ids("input_ids", [1, 4]), _ids_of("attention_mask", [[0, 0, 1, 1]])],
         "'attention_mask': row 0 is left-padded, has gaps or has no token; send "
         "right-padded rows 1 ... 1 0 ... 0"),
        (lambda: [_ids("input_ids", [2, 4]),
                  _ids_of("attention_mask", [[1, 1, 1, 1], [1, 0, 1, 0]])], "row 1 is left-padded"),
        (lambda: [_ids("input_ids", [3, 3]),
                  _ids_of("attention_mask", [[1, 1, 0], [1, 0, 0], [0, 0, 0]])],
         "row 2 is left-padded, has gaps or has no token"),
        (lambda: [_text_input(["a"], name="texts")],
         "takes text as 'text' .* or token ids as 'input_ids' and 'attention_mask'; "
         "got inputs 'texts'$"),  # each name quoted once (was ["'texts'"])
        (lambda: [_ids("input_ids", [1, 30]), _ids("attention_mask", [1, 30])],
         f"sequence length 30 is outside \\[1, {LENGTHS[-1]}\\]"),
        (lambda: [_ids("input_ids", [1, 5]), _ids("attention_mask", [1, 6])],
         "disagree on the sequence length"),
        (lambda: [_text_input(["a"]), _ids("input_ids", [1, 3])],
         "a text request has one input, 'text'; got 'input_ids', 'text'$"),
        (lambda: [_text_input(["x" * (64 * MAX_LENGTH + 1)])], "split the text"),
    ],
)  # fmt: skip
def test_bad_text_and_id_requests_are_invalid_argument_with_the_reason(client, inputs, message):
    with pytest.raises(InferenceServerException, match=message) as e:
        client.infer("embed", inputs())
    assert _code(e) == "StatusCode.INVALID_ARGUMENT"


def test_ids_wider_than_any_padding_is_cut_from_are_refused_saying_why(server):
    # The refusal named 1,048,576 "the longest profiled length" (the longest lane is 24).
    import grpc
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc as pbg

    req = pb.ModelInferRequest(model_name="embed")
    for name in ("input_ids", "attention_mask"):  # declared 2,000,000 wide, 8 bytes sent
        req.inputs.add(name=name, datatype="INT64", shape=[1, 2_000_000])
    req.raw_input_contents.extend([bytes(8), bytes(8)])
    with grpc.insecure_channel(server.address) as channel, pytest.raises(grpc.RpcError) as e:
        pbg.GRPCInferenceServiceStub(channel).ModelInfer(req, timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "before their padding is cut" in e.value.details()
    assert "profiled" not in e.value.details()


def test_ids_of_the_longest_profiled_length_are_served_and_one_token_more_is_refused(repo, client):
    # The bound was tested only far beyond it (30 tokens): one past the longest profiled
    # length (the position table holds more) was let through unnoticed.
    _, d, model = repo
    longest = LENGTHS[-1]
    tok = TextTokenizer(d / "tokenizer.json", longest)
    ids, mask = tok.encode([" ".join(WORDS[i % len(WORDS)] for i in range(100))])
    assert ids.shape == (1, longest) and mask.all()  # every position a real token
    r = client.infer("embed", [_ids_of("input_ids", ids), _ids_of("attention_mask", mask)],
                     parameters={"tier": "full"})  # fmt: skip
    with torch.no_grad():
        want = model(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    np.testing.assert_allclose(r.as_numpy("embedding"), want, atol=1e-5)
    longer = [_ids("input_ids", [1, longest + 1]), _ids("attention_mask", [1, longest + 1])]
    with pytest.raises(InferenceServerException, match=rf"sequence length {longest + 1} is "
                       rf"outside \[1, {longest}\]") as e:  # fmt: skip
        client.infer("embed", longer)
    assert _code(e) == "StatusCode.INVALID_ARGUMENT"


def test_non_utf8_and_misshaped_text_are_refused(client):
    t = tc.InferInput("text", [1, 1], "BYTES")
    t.set_data_from_numpy(np.array([[b"\xff\xfe bad"]], dtype=object))
    with pytest.raises(InferenceServerException, match="is not UTF-8") as e:
        client.infer("embed", [t])
    assert _code(e) == "StatusCode.INVALID_ARGUMENT"
    t = tc.InferInput("text", [1, 2], "BYTES")
    t.set_data_from_numpy(np.array([[b"a", b"b"]], dtype=object))
    with pytest.raises(InferenceServerException, match=r"expected \[-1, 1\]"):
        client.infer("embed", [t])
    # The server is still up and answering.
    assert _embed(client, ["still here"])[0].shape == (1, 16)


def test_metadata_and_model_config_describe_text_and_dynamic_axes(client):
    meta = client.get_model_metadata("embed", as_json=True)
    inputs = {t["name"]: (t["datatype"], t["shape"]) for t in meta["inputs"]}
    assert inputs == {
        "text": ("BYTES", ["-1", "1"]),
        "input_ids": ("INT64", ["-1", "-1"]),
        "attention_mask": ("INT64", ["-1", "-1"]),
    }
    cfg = client.get_model_config("embed", as_json=True)["config"]
    by_name = {t["name"]: t for t in cfg["input"]}
    assert by_name["text"]["data_type"] == "TYPE_STRING" and by_name["text"]["optional"]
    assert by_name["input_ids"]["dims"] == ["-1"] and by_name["input_ids"]["optional"]
    # Each tier's latency per profiled length; the plain figure is the longest's, says so.
    tiers = json.loads(cfg["parameters"]["tiers"]["string_value"])
    for t in tiers:
        assert t["latency_tokens"] == 24 and list(t["latency_ms_batch1_by_tokens"]) == [
            "8", "16", "24"
        ]  # fmt: skip
        assert t["latency_ms_batch1"] == t["latency_ms_batch1_by_tokens"]["24"] > 0


def test_concurrent_requests_of_mixed_lengths_are_each_answered_with_their_own_embedding(
    repo, server
):
    import tritonclient.grpc.aio as aio

    _, d, model = repo
    texts = [" ".join(WORDS[: 1 + (3 * k) % 19]) for k in range(24)]
    want = _reference(model, d, texts)

    async def go():
        c = aio.InferenceServerClient(server.address)
        try:
            calls = [c.infer("embed", [_text_input([s])], parameters={"tier": "full"})
                     for s in texts]  # fmt: skip
            return await asyncio.gather(*calls)
        finally:
            await c.close()

    results = asyncio.run(go())
    for k, r in enumerate(results):
        np.testing.assert_allclose(r.as_numpy("embedding")[0], want[k], atol=2e-5)


def test_a_batch_padded_across_requests_computes_what_each_request_alone_does(repo):
    _, d, _ = repo
    served = Repository(d.parent).load("embed")
    tok = served.tokenizer
    parts = [tok.encode([s]) for s in ("the model", "a small network serves text fast", "x")]
    alone = [served.engines["full"].run({"input_ids": i, "attention_mask": m}) for i, m in parts]
    feeds = {
        "input_ids": batch_rows([i for i, _ in parts], (0,)),
        "attention_mask": batch_rows([m for _, m in parts], (0,)),
    }
    together = served.engines["full"].run(feeds)["embedding"]
    assert feeds["input_ids"].shape == (3, max(i.shape[1] for i, _ in parts))
    want = np.concatenate([a["embedding"] for a in alone])
    np.testing.assert_allclose(together, want, atol=1e-5)


def test_an_engine_that_prefers_fixed_lengths_gets_batches_padded_to_its_lane(repo):
    # A torch CUDA engine replays one graph per shape: padded to the batch's longest request
    # every length is a new shape (a graph rarely replayed); padded to the lane's length,
    # a profiled one, there are a few. The embeddings are the same (the mask covers it).
    _, d, model = repo
    served = Repository(d.parent).load("embed")
    shapes = []
    for engine in served.engines.values():
        engine.prefers_fixed_lengths = True  # as a torch engine on CUDA says
        run = engine.run
        engine.run = lambda feeds, run=run: shapes.append(feeds["input_ids"].shape) or run(feeds)
    tok = served.tokenizer
    texts = ["the model", " ".join(WORDS[:9]), " ".join(WORDS[:17])]  # 4, 11, 19 tokens

    async def go():
        rt = ModelRuntime(served, Metrics())
        rt.start()
        try:
            calls = []
            for s in texts:
                ids, mask = tok.encode([s])
                calls.append(rt.infer({"input_ids": ids, "attention_mask": mask}, 1, 5.0,
                                      pin="full"))  # fmt: skip
            return await asyncio.gather(*calls)
        finally:
            await rt.stop()

    results = asyncio.run(go())
    lengths = {n for _, n in shapes}
    assert lengths <= set(LENGTHS) and {8, 24} <= lengths
    want = _reference(model, d, texts)
    for k, r in enumerate(results):
        np.testing.assert_allclose(r.outputs["embedding"][0], want[k], atol=2e-5)


def test_a_tokenizer_changed_after_the_build_is_refused_at_load(repo, tmp_path):
    import shutil

    from runtime.repository import RepositoryError

    _, d, _ = repo
    copy = tmp_path / "repo" / "embed"
    shutil.copytree(d, copy)
    tok = json.loads((copy / "tokenizer.json").read_text())
    tok["model"]["vocab"]["zebra"] = len(tok["model"]["vocab"])
    (copy / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(RepositoryError, match="differs from the one the model was built with"):
        Repository(copy.parent).load("embed")


# -- lanes: the scheduler plans a request at its own sequence length ---------------------------
def _scripted_profile(d, ms_per_token: float) -> None:
    """Replace the measured profile by one where a batch costs ``ms_per_token`` x its
    length x its rows (deterministic estimates for the lane tests)."""
    prof = json.loads((d / "profile.json").read_text())
    lengths = {}
    for n in LENGTHS:
        lengths[str(n)] = {
            tier: {str(b): dict.fromkeys(("p50_ms", "p90_ms"), ms_per_token * n * b * scale)
                   for b in (1, 2, 4)}
            for tier, scale in (("full", 1.0), ("half", 0.5))
        }  # fmt: skip
    prof["lengths"], prof["tiers"] = lengths, lengths[str(LENGTHS[-1])]
    (d / "profile.json").write_text(json.dumps(prof))


def test_a_request_is_planned_at_its_own_length_not_the_longest(repo, tmp_path):
    import shutil

    _, d, _ = repo
    root = tmp_path / "repo"
    shutil.copytree(d, root / "embed")
    _scripted_profile(root / "embed", ms_per_token=1.0)  # half at 1 row: 4 / 8 / 12 ms
    served = Repository(root).load("embed")
    now = [0.0]
    metrics = Metrics()
    rt = ModelRuntime(served, metrics, clock=lambda: now[0])
    assert list(rt.lanes) == LENGTHS
    tok = served.tokenizer

    def feeds(words: int):
        ids, mask = tok.encode([" ".join(["the"] * words)])
        return {"input_ids": ids, "attention_mask": mask}

    lengths = [feeds(w)["input_ids"].shape[1] for w in (1, 6, 7, 14, 22)]
    assert [rt._lane(n) for n in lengths] == [8, 8, 16, 16, 24]
    # Each lane estimates with its own length's table: 8 tokens at half width take 4 ms.
    lat = {n: rt.lanes[n].latency.estimate("half", 1) * 1e3 for n in LENGTHS}
    assert lat[8] == pytest.approx(4.0, rel=0.01) and lat[24] == pytest.approx(12.0, rel=0.01)

    async def go():
        rt.start()
        try:
            # 7 ms: the short sentence fits at half width (4 ms; full takes 8); the long one
            # cannot (12 ms at half width).
            short = await rt.infer(feeds(3), 1, budget_s=0.007)
            with pytest.raises(DeadlineExceeded):
                await rt.infer(feeds(20), 1, budget_s=0.007)
            return short
        finally:
            await rt.stop()

    assert asyncio.run(go()).tier == "half"
    # Both requests' lengths are in the token histogram (3 words + [CLS] [SEP]; 22 tokens).
    count = metrics.registry.get_sample_value("innfer_request_tokens_count", {"model": "embed"})
    total = metrics.registry.get_sample_value("innfer_request_tokens_sum", {"model": "embed"})
    assert (count, total) == (2, 5 + 22)
    # and in their lanes' counters: 8 and 24 tokens (the histogram has no bucket at 24)
    sample = metrics.registry.get_sample_value
    labels = {n: {"model": "embed", "lane": str(n)} for n in LENGTHS}
    lanes = {n: sample("innfer_lane_requests_total", labels[n]) for n in LENGTHS}
    assert lanes == {8: 1, 16: 0, 24: 1}


def _lane_runtime(repo, tmp_path, fixed_lengths: bool = False):
    """A runtime of the embedder with the scripted profile (1 ms per token and row at full
    width, half at half) on a scripted clock, and a feeds maker by words."""
    import shutil

    _, d, _ = repo
    root = tmp_path / "repo"
    shutil.copytree(d, root / "embed")
    _scripted_profile(root / "embed", ms_per_token=1.0)
    served = Repository(root).load("embed")
    for engine in served.engines.values():
        engine.prefers_fixed_lengths = fixed_lengths
    rt = ModelRuntime(served, Metrics(), clock=lambda: 0.0)
    tok = served.tokenizer

    def feeds(words: int):
        ids, mask = tok.encode([" ".join(["the"] * words)])
        return {"input_ids": ids, "attention_mask": mask}

    return rt, feeds


def test_a_text_in_the_upper_part_of_a_lane_is_planned_at_its_own_tokens(repo, tmp_path):
    # 18 tokens join the 24 lane. Padded to their own length they take ~9 ms at half width
    # (between the 16 lane's 8 ms and the 24 lane's 12): a 10.5 ms budget (9.5 to plan
    # with) is met. Planned at 24 tokens it was refused as "below the fastest tier"
    # (helper-317: 140-token texts in the 256 lane at 30 ms, on a fresh replica).
    rt, feeds = _lane_runtime(repo, tmp_path)
    assert feeds(16)["input_ids"].shape[1] == 18 and rt._lane(18) == 24

    async def go():
        rt.start()
        try:
            # (refused first: a batch run teaches the lane the tiny engine's real speed)
            with pytest.raises(DeadlineExceeded, match="below the fastest allowed tier"):
                await rt.infer(feeds(21), 1, budget_s=0.0105)  # 23 tokens: ~11.5 ms
            return await rt.infer(feeds(16), 1, budget_s=0.0105)
        finally:
            await rt.stop()

    assert asyncio.run(go()).tier == "half"


def test_a_text_refused_behind_another_is_counted_as_load_not_as_its_budget(repo, tmp_path):
    # A 23-token text runs; an 18-token one at 10.5 ms cannot wait for it. Alone, at its
    # own length, it takes ~9 ms at half width: an idle replica would meet it - load, which
    # the autoscaler scales for. Judged at the lane's length in force (the running text's,
    # 12 ms) it read as the client's own budget (refused_budget).
    rt, feeds = _lane_runtime(repo, tmp_path)

    async def go():
        rt.start()
        try:
            return await asyncio.gather(
                rt.infer(feeds(21), 1, budget_s=1.0),
                rt.infer(feeds(16), 1, budget_s=0.0105),
                return_exceptions=True,
            )
        finally:
            await rt.stop()

    results = asyncio.run(go())
    assert isinstance(results[1], DeadlineExceeded) and not isinstance(results[0], Exception)
    sample = rt.metrics.registry.get_sample_value
    labels = {"model": "embed"}
    assert sample("innfer_deadline_missed_total", {**labels, "reason": "refused_deadline"}) == 1
    assert not sample("innfer_deadline_missed_total", {**labels, "reason": "refused_budget"})


def test_a_text_served_below_the_tier_its_own_tokens_allow_counts_as_degraded(repo, tmp_path):
    # The degraded count asks which tier an idle replica would serve a request at within its
    # budget: for 18 tokens at 20 ms the full tier (~18 ms at its own length), not half
    # (the full tier takes 24 ms at the lane's 24 tokens). Served at half, load took
    # accuracy from it - the autoscaler's signal - rather than its budget.
    from server.scheduling import Request

    rt, _ = _lane_runtime(repo, tmp_path)
    lat = rt.lanes[24].latency
    rt._remember_idle_timing()  # (as a load does)
    text = Request(1, 0.0, 0.020, length=18)
    assert rt._best_in_budget(text, "full", lat) == "full"
    assert rt._best_in_budget(Request(2, 0.0, 0.020, length=24), "full", lat) == "half"
    rt._idle_timing.clear()  # (no timing at load: the latency model's own times)
    lat.set_length(24)
    assert rt._best_in_budget(text, "full", lat) == "full"


def test_an_engine_padding_to_its_lane_plans_every_text_at_the_lanes_length(repo, tmp_path):
    # Batches padded to the lane's length (a CUDA graph per profiled length) take the
    # lane's time whatever the text: 18 tokens are planned as 24 (12 ms) and refused.
    rt, feeds = _lane_runtime(repo, tmp_path, fixed_lengths=True)

    async def go():
        rt.start()
        try:
            with pytest.raises(DeadlineExceeded, match="below the fastest allowed tier"):
                await rt.infer(feeds(16), 1, budget_s=0.0105)
        finally:
            await rt.stop()

    asyncio.run(go())


# -- the BYTES codec, without a server ----------------------------------------------------------
def _text_request(shape, typed=None, raw=None):
    from server.proto_gen import grpc_service_pb2 as pb

    req = pb.ModelInferRequest(raw_input_contents=[raw] if raw is not None else [])
    t = req.inputs.add(name="text", datatype="BYTES", shape=shape)
    if typed is not None:
        t.contents.bytes_contents.extend(typed)
    return req


def _with_raw(req, extra: bytes):
    req.raw_input_contents.append(extra)
    return req


def _prefixed(*items: bytes) -> bytes:
    return b"".join(len(b).to_bytes(4, "little") + b for b in items)


@pytest.mark.parametrize(
    "request_, expected",
    [
        (lambda: _text_request([2, 1], raw=_prefixed(b"a", "é".encode())), ["a", "é"]),
        (lambda: _text_request([2], typed=[b"x", b""]), ["x", ""]),
        (lambda: _text_request([2, 1], typed=[b"a", b"b", b"c"]), "3 strings for 2 rows"),
        (lambda: _text_request([2, 1], raw=_prefixed(b"a", b"b", b"c")), "3 or more strings"),
        (lambda: _text_request([1, 1], raw=(5).to_bytes(4, "little") + b"ab"), "runs past"),
        (lambda: _text_request([1, 1], raw=b"\x01\x00"), "inside a length prefix"),
        (lambda: _text_request([9, 1], typed=[b"a"] * 9), r"batch 9 is outside \[1, 4\]"),
        (
            lambda: _with_raw(_text_request([1, 1], raw=_prefixed(b"a")), b"junk"),
            "raw_input_contents has 2 entries for 1 input",
        ),
    ],
)
def test_bytes_inputs_decode_or_say_what_is_wrong(request_, expected):
    from server.codec import decode_text
    from server.errors import InvalidArgument

    if isinstance(expected, list):
        assert decode_text(request_(), "text", max_batch=4, max_bytes=64) == expected
    else:
        with pytest.raises(InvalidArgument, match=expected):
            decode_text(request_(), "text", max_batch=4, max_bytes=64)


def test_each_lane_learns_its_own_overhead(server, client):
    # One estimate per model let long texts' tokenization shrink every short sentence's
    # budget (demo MiniLM: a 7.2 ms reserve became 11.9 ms after 8 texts of 10k characters).
    import time

    m = server.server.plane.models["embed"]
    assert sorted(m.overheads) == LENGTHS and m.overhead is m.overheads[LENGTHS[-1]]
    before = {n: o.samples for n, o in m.overheads.items()}
    short, long = "the model", " ".join(WORDS)  # 2 and 21 words: lanes 8 and 24
    for text, lane in ((short, 8), (long, 24), (long, 24)):
        _, params = _embed(client, [text])
        assert params["sequence_length"].int64_param == lane
    deadline = time.monotonic() + 5  # observed once gRPC reports each answer sent
    want = {**before, 8: before[8] + 1, 24: before[24] + 2}
    while {n: o.samples for n, o in m.overheads.items()} != want and time.monotonic() < deadline:
        time.sleep(0.01)
    assert {n: o.samples for n, o in m.overheads.items()} == want


def test_a_short_sentence_is_planned_short_by_its_own_lanes_overhead(server, client, monkeypatch):
    from server.dataplane import DataPlane
    from server.overhead import Overhead

    m = server.server.plane.models["embed"]
    monkeypatch.setattr(DataPlane, "_plans_overhead", lambda self, model: True)
    lanes = {8: Overhead(), 16: Overhead(), 24: Overhead()}
    for n, seconds in ((8, 0.001), (16, 0.001), (24, 0.020)):
        for _ in range(64):
            lanes[n].observe(seconds)
    monkeypatch.setattr(m, "overheads", lanes)
    margin_ms = server.server.config.budget_margin_ms
    budget = {}
    for text in ("the model", " ".join(WORDS)):
        _, params = _embed(client, [text], latency_budget_ms=100)
        budget[params["sequence_length"].int64_param] = params["budget_us"].int64_param / 1e3
    assert budget[8] == pytest.approx(100 - margin_ms - 1.0, abs=0.01)
    assert budget[24] == pytest.approx(100 - margin_ms - 20.0, abs=0.01)


def test_a_lane_without_enough_answers_plans_with_the_best_known_overhead(server, monkeypatch):
    # Else a rarely used lane of long texts is planned with no overhead at all.
    from server.overhead import MIN_SAMPLES, Overhead

    m = server.server.plane.models["embed"]
    lanes = {8: Overhead(), 16: Overhead(), 24: Overhead()}
    for n, count in ((8, MIN_SAMPLES + 4), (16, MIN_SAMPLES), (24, MIN_SAMPLES - 1)):
        for _ in range(count):
            lanes[n].observe(0.002)
    monkeypatch.setattr(m, "overheads", lanes)
    assert m.overhead_for(8) is lanes[8] and m.overhead_for(16) is lanes[16]
    assert m.overhead_for(24) is lanes[8]  # 15 answers: the lane with the most instead


def test_a_cancelled_requests_texts_are_not_tokenized():
    # A request cancelled while its long texts wait for the tokenizer threads (its client
    # gave up; its in-flight bytes are released) must not still cost them its encoding:
    # before, all 40 queued encodes ran after their requests were gone.
    import asyncio
    import time
    import types

    from server.dataplane import TOKENIZE_THREADS, DataPlane, DecodeClock
    from server.engine_threads import EngineThreads

    ran = []

    class Slow:
        def encode_rows(self, texts):
            ran.append(len(texts))
            time.sleep(0.05)
            return None

    plane = DataPlane.__new__(DataPlane)  # only its tokenizer threads and margin are used
    plane.tokenizer_threads = EngineThreads(TOKENIZE_THREADS, "tokenize")
    plane.config = types.SimpleNamespace(budget_margin_ms=1.0)
    cancels = []
    m = types.SimpleNamespace(
        name="embed", clock=time.monotonic,
        served=types.SimpleNamespace(tokenizer=Slow()),
        count_cancel=lambda *how: cancels.append(how),
    )  # fmt: skip

    async def main():
        due = time.monotonic() + 10
        tasks = [
            asyncio.ensure_future(plane._tokenize(m, ["x" * 3000], DecodeClock(due, 0.0, 9.0)))
            for _ in range(40)
        ]
        for _ in range(500):  # until the threads took their first texts (a busy machine)
            if ran:
                break
            await asyncio.sleep(0.01)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.sleep(0.5)  # time for ten encodes per thread, had they run

    try:
        asyncio.run(main())
    finally:
        plane.tokenizer_threads.shutdown()
        plane.tokenizer_threads.join()
    # Those already running when the requests went (the test's own model lacked the fields
    # _tokenize reads, so every request failed before its texts were queued: it passed on
    # nothing encoded at all).
    assert 1 <= len(ran) <= TOKENIZE_THREADS
    # Each cancel counted once, as the runtime counts one - the runtime never saw these
    # requests, and nothing counted them (review 161): with 9 s of budget left, "cancelled".
    assert len(cancels) == 40
    assert all(waiting and now < due - 5 for _, due, waiting, now in cancels), cancels[:2]


def test_long_texts_whose_budget_is_already_spent_are_refused_at_once_unencoded():
    """A long text with a budget below the server's margin waited behind the tokenizer
    threads' backlog, was encoded, and only then refused by the scheduler - 94.5 ms to hear
    of a 0.5 ms budget, the threads' time spent for nothing (review helper-250)."""
    import time
    import types

    from server.dataplane import TOKENIZE_THREADS, DataPlane, DecodeClock
    from server.engine_threads import EngineThreads

    ran, counted, traffic = [], [], []
    tokenizer = types.SimpleNamespace(encode_rows=lambda texts: ran.append(texts))
    plane = DataPlane.__new__(DataPlane)
    plane.tokenizer_threads = EngineThreads(TOKENIZE_THREADS, "tokenize")
    m = types.SimpleNamespace(
        name="embed", clock=time.monotonic, served=types.SimpleNamespace(tokenizer=tokenizer),
        count_refused=lambda *how: counted.append(how),
        record_traffic=lambda *args: traffic.append(args),
    )  # fmt: skip

    async def main():
        now = time.monotonic()
        for budget_s in (-0.0005, 0.004):  # 0.5 ms less a 1 ms margin; a parse that took 5 ms
            with pytest.raises(DeadlineExceeded, match="spent before its texts could be"):
                await plane._tokenize(m, ["x" * 3000], DecodeClock(now - 0.001, 0.0, budget_s))

    try:
        asyncio.run(main())
    finally:
        plane.tokenizer_threads.shutdown()
        plane.tokenizer_threads.join()
    assert not ran
    # the first was the client's ask; the second had budget left until its parse: load
    assert counted == [("refused_deadline", "refused_budget"),
                       ("refused_deadline", "refused_deadline")]  # fmt: skip
    assert len(traffic) == 2  # replayed by auto-tiering as sent


def test_a_long_texts_early_refusal_is_said_and_counted_as_the_schedulers_are():
    """Where the call's deadline cut a larger latency_budget_ms, the early refusal said
    "send a larger latency_budget_ms" and counted the client's ask (review helper-259)."""
    import time
    import types

    from server.dataplane import DataPlane, DecodeClock, _with_source

    counted = []
    m = types.SimpleNamespace(
        name="embed", clock=time.monotonic, served=types.SimpleNamespace(tokenizer=None),
        count_refused=lambda *how: counted.append(how), record_traffic=lambda *args: None,
    )  # fmt: skip
    plane = DataPlane.__new__(DataPlane)
    clock = DecodeClock(time.monotonic() - 0.001, 0.0, -0.0005, cut=True)
    with pytest.raises(DeadlineExceeded) as err:
        asyncio.run(plane._tokenize(m, ["x" * 3000], clock))
    assert counted == [("refused_deadline", "refused_deadline")]  # load, not the ask
    said = str(_with_source(err.value, "deadline"))
    assert "send a larger latency_budget_ms" not in said and "raise the deadline" in said


def test_texts_still_queued_for_the_tokenizer_when_their_budget_ends_are_refused_unencoded():
    # Before, a request's long texts waited for the tokenizer threads however long the
    # queue was, and were encoded for an answer already late: under more long text than
    # the threads keep up with, the queue grew without bound behind them.
    import time
    import types

    from server.dataplane import TOKENIZE_THREADS, DataPlane, DecodeClock
    from server.engine_threads import EngineThreads

    ran, refused, traffic, late_due = [], [], [], []

    class Slow:
        def encode_rows(self, texts):
            ran.append(texts[0][0])
            time.sleep(0.6)
            return texts[0][0]

    plane = DataPlane.__new__(DataPlane)  # only its tokenizer threads are used
    plane.tokenizer_threads = EngineThreads(TOKENIZE_THREADS, "tokenize")
    m = types.SimpleNamespace(
        name="embed",
        clock=time.monotonic,
        served=types.SimpleNamespace(tokenizer=Slow()),
        count_refused=lambda outcome, reason: refused.append((outcome, reason)),
        record_traffic=lambda *arrival: traffic.append(arrival),
    )

    async def main():
        now = time.monotonic()

        def tokenize(text, due, budget_s=10.0):
            return asyncio.ensure_future(
                plane._tokenize(m, [text], DecodeClock(due, 0.0, budget_s))
            )

        busy = [tokenize(c * 3000, now + 10) for c in "ab"]
        await asyncio.sleep(0.02)  # both threads encoding for 0.6 s
        late_due.append(time.monotonic() + 0.05)
        late = tokenize("c" * 3000, late_due[0], budget_s=0.07)
        fits = tokenize("d" * 3000, time.monotonic() + 10)
        with pytest.raises(DeadlineExceeded, match=r"waited \d+ ms for the tokenizer threads"):
            await late
        # Refused at its budget's end, not when a thread came free (its client hears at
        # its deadline; its in-flight bytes are released then).
        assert not any(b.done() for b in busy)
        # (a budget spent before its texts were queued: refused at once, the test above)
        return await asyncio.gather(*busy, fits)

    try:
        assert asyncio.run(main()) == ["a", "b", "d"]
    finally:
        plane.tokenizer_threads.shutdown()
        plane.tokenizer_threads.join()
    assert sorted(ran) == ["a", "b", "d"]  # "c" was never encoded
    assert refused == [("refused_deadline", "refused_deadline")]
    # ... but it is traffic: auto-tiering's replay sees it (before, only requests that
    # reached the scheduler were logged), arriving 20 ms before its decode, with its budget.
    [(reached, budget_s, rows)] = traffic
    assert reached == late_due[0] - 0.07 and budget_s == 0.07 and rows == 1


def test_the_time_a_text_spent_with_the_tokenizer_counts_against_its_budget(
    server, client, monkeypatch
):
    # Without plan_overhead the budget counted from the scheduler's stamp, after the
    # decode: a text that took 150 ms to tokenize (the threads busy under load) was still
    # planned with its whole 100 ms and answered 150 ms late, "within budget" by the
    # server's own account.
    import time

    from server.dataplane import DataPlane

    encode = TextTokenizer.encode_rows

    def slow(self, texts):
        if sum(len(s) for s in texts) > 4000:
            time.sleep(0.15)
        return encode(self, texts)

    monkeypatch.setattr(TextTokenizer, "encode_rows", slow)
    monkeypatch.setattr(DataPlane, "_plans_overhead", lambda self, model: False)
    m = server.server.plane.models["embed"]
    before = {r: m._missed[r]._value.get() for r in ("refused_deadline", "refused_budget")}
    long_text = " ".join(WORDS * 20)[:1500]  # 4 rows: 6,000 characters
    with pytest.raises(InferenceServerException) as e:
        _embed(client, [long_text] * 4, latency_budget_ms=100)
    assert _code(e) == "StatusCode.DEADLINE_EXCEEDED"
    # Time spent here is load, not a budget no replica could meet (refused_budget: what
    # the autoscaler leaves out): 100 ms covers the fastest tier on an idle replica.
    after = {r: m._missed[r]._value.get() for r in before}
    assert after == {**before, "refused_deadline": before["refused_deadline"] + 1}
    got, _ = _embed(client, [long_text] * 4, latency_budget_ms=1000)  # the wait fits
    assert got.shape == (4, 16)


def test_with_plan_overhead_a_texts_wait_for_a_thread_counts_against_its_budget(
    server, monkeypatch
):
    # With plan_overhead (the MiniLM demo's setting) the decode was left to the learned
    # reserve - a quantile of past requests, near zero while the threads keep up - so a
    # text that waited 150 ms for a thread was planned as if it had just arrived.
    import threading

    import tritonclient.grpc.aio as aio

    from server.dataplane import DataPlane

    encode = TextTokenizer.encode_rows
    gate = threading.Event()

    def gated(self, texts):
        if texts[0].startswith("hold"):  # occupies both threads until the gate opens
            gate.wait(5)
        return encode(self, texts)

    monkeypatch.setattr(TextTokenizer, "encode_rows", gated)
    monkeypatch.setattr(DataPlane, "_plans_overhead", lambda self, model: True)
    m = server.server.plane.models["embed"]
    infer, waited = m.infer, {}

    async def recording(inputs, rows, budget_s, pin, min_tier, priority, waited_s, **kw):
        waited[pin] = waited_s  # what the scheduler counts as spent before it
        return await infer(inputs, rows, budget_s, pin, min_tier, priority, waited_s, **kw)

    monkeypatch.setattr(m, "infer", recording)
    long_text = " ".join(WORDS * 20)[:1500]

    async def go():
        c = aio.InferenceServerClient(server.address)

        def call(prefix, tier):
            texts = [prefix + long_text] * 2
            return asyncio.ensure_future(
                c.infer("embed", [_text_input(texts)], parameters={"tier": tier})
            )

        try:
            holds = [call("hold ", "full"), call("hold ", "full")]
            await asyncio.sleep(0.05)
            queued = call("", "half")
            await asyncio.sleep(0.5)  # waits behind the holds (from its parse, a little less)
            gate.set()
            await asyncio.gather(*holds, queued)
        finally:
            gate.set()
            await c.close()

    asyncio.run(go())
    # (0.2 s to spare for the client's and the transport's delay before its parse)
    assert waited["half"] >= 0.3 and waited["full"] < 0.14


def test_a_tiers_latency_gauges_and_engine_speed_follow_the_lane_its_traffic_runs(repo):
    # They read the longest lane, which short sentences never reach: with every engine
    # ~20x slower than profiled, lane 8 learned it and the gauges stayed at 1.0 (and a swap
    # started its new tiers from speed 1.0).
    import time

    _, d, _ = repo
    served = Repository(d.parent).load("embed")
    for e in served.engines.values():
        e.run = lambda feeds, run=e.run: (time.sleep(0.005), run(feeds))[1]
    metrics = Metrics()
    ids, mask = served.tokenizer.encode(["the model"])

    async def go():
        rt = ModelRuntime(served, metrics)
        rt.start()
        try:
            for _ in range(30):
                await rt.infer({"input_ids": ids, "attention_mask": mask}, 1, 5.0, pin="full")
            return rt.lanes[LENGTHS[0]].latency.tier_estimate("full").factor, rt.engine_speed()
        finally:
            await rt.stop()

    learned, speed = asyncio.run(go())
    gauge = metrics.registry.get_sample_value(
        "innfer_tier_latency_factor", {"model": "embed", "tier": "full"}
    )
    assert learned > 3.0
    # (within a batch's step: the level is no longer held at 20x, where these engines ~27x
    # their profile sat still, and the gauge is written per batch)
    assert gauge == pytest.approx(learned, rel=0.05) and speed == pytest.approx(learned, rel=0.05)


@pytest.mark.parametrize(
    ("took_ms", "flagged"),
    [
        # getting the GIL back from a busy thread: 5.6 ms median where the encoding took
        # 0.3 - ordinary load moved every text to the threads for good (review 166)
        ([7.0] * 10, False),
        ([20.0] * 2 + [0.3] * 32 + [20.0] * 2, False),  # stalls far apart do not add up
        ([20.0, 0.3, 20.0, 0.3, 20.0], True),  # three of the last 32: a slow tokenizer
        ([60.0], True),  # once past the long bound
    ],
)
def test_the_slow_tokenizer_rule_looks_past_gil_waits_and_back_a_window(
    monkeypatch, took_ms, flagged
):
    import types

    import server.dataplane as dataplane
    from server.dataplane import DataPlane
    from server.tokenizer_pace import TokenizerPace

    ticks = iter(t for ms in took_ms for t in (0.0, ms / 1e3))
    # time.perf_counter is the module's own: scripted for this thread only. Another test's
    # server still up (its pending-queue probe thread reads the clock every 50 ms) took
    # ticks and raised StopIteration in both (a CI run at b5b7988).
    real, this = time.perf_counter, threading.get_ident()
    monkeypatch.setattr(
        dataplane.time, "perf_counter",
        lambda: next(ticks) if threading.get_ident() == this else real(),
    )  # fmt: skip
    tokenizer = types.SimpleNamespace(encode_rows=lambda texts: texts)
    m = types.SimpleNamespace(
        name="embed", clock=lambda: 0.0, tokenizer_pace=TokenizerPace(),
        served=types.SimpleNamespace(tokenizer=tokenizer),
    )  # fmt: skip
    plane = DataPlane.__new__(DataPlane)  # the inline path reads only the model

    async def main():
        for _ in took_ms:
            assert not m.tokenizer_pace.slow  # each of these ran inline
            await plane._tokenize(m, ["a short sentence"])

    asyncio.run(main())
    assert m.tokenizer_pace.slow is flagged


def test_one_stall_moves_texts_to_the_threads_for_a_while_not_for_good():
    """One 60 ms stall of the host (a paused process, CFS throttling) moved a model's texts
    to the tokenizer threads for good: 2-word texts queued behind long ones, 190 of 253
    answered before it, 4 of 262 after (review helper-250)."""
    from server.tokenizer_pace import RETRY_MAX_S, RETRY_S, WINDOW, TokenizerPace

    pace = TokenizerPace()
    assert pace.judge(0.06, 12, now=100.0) is not None  # the stall
    assert not pace.inline(100.0 + RETRY_S - 1)
    assert pace.inline(100.0 + RETRY_S)  # tried inline again
    # slow again at once (a tokenizer that is truly slow): twice as long, and so on
    now = 100.0 + RETRY_S
    waits = []
    for _ in range(8):
        said = pace.judge(0.06, 12, now)
        waits.append(pace.retry_at - now)
        assert "for the next" in said and "the host stalled" in said
        now = pace.retry_at
        assert pace.inline(now)
    assert waits[:3] == [2 * RETRY_S, 4 * RETRY_S, 8 * RETRY_S] and max(waits) == RETRY_MAX_S
    # a whole window of fast encodings since: the next stall costs RETRY_S again
    for _ in range(WINDOW):
        assert pace.judge(0.0001, 12, now) is None
    pace.judge(0.06, 12, now)
    assert pace.retry_at - now == RETRY_S


def test_a_panic_in_the_tokenizer_is_a_tokenizer_error(repo):
    """The tokenizers library's Rust panics arrive as pyo3's PanicException, a
    BaseException: on a tokenizer thread it ended the thread, and the request waited for an
    answer that never came (review 166)."""
    from runtime.repository.tokenizer import TokenizerError

    class PanicException(BaseException):  # as pyo3 defines it
        pass

    tok = TextTokenizer(repo[1] / "tokenizer.json", MAX_LENGTH)

    class Panicking:
        def __getattr__(self, name):
            return getattr(tok._tok, name)

        def encode_batch(self, texts):
            raise PanicException("index out of bounds")

    tok._tok = Panicking()
    with pytest.raises(TokenizerError, match=r"tokenizer failed on these texts .*out of bounds"):
        tok.encode_rows(["a sentence"])
