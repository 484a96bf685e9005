"""Per-request limits: what one request may ask of the server, so that the work it causes
is linear in its size and bounded. No grpc.

Every check that reads a client-controlled count (inputs, outputs, dims, bytes) compares the
count with its limit *before* iterating, so a hostile request costs O(1) to refuse.

Example:
    >>> limits = RequestLimits()
    >>> limits.max_inputs, limits.max_inflight_bytes // 2**20
    (64, 256)
    >>> clip("x" * 100)
    "'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx...' (100 characters)"
"""

from __future__ import annotations

from dataclasses import dataclass

from runtime.configspec import spec

# spec() returns a dataclasses.field() carrying the rules; ruff cannot see that.

# A client string echoed in an error message is cut here: messages stay readable, and a
# status message over gRPC's header limit (about 8-16 KiB) would be replaced by
# "Stream removed" on the client, hiding the real error.
ECHO_CHARS = 48
# The whole status message is capped too (a list of model names can be long).
MESSAGE_CHARS = 1024


@dataclass(frozen=True, kw_only=True)
class RequestLimits:
    """Limits on one ModelInfer request and on all of them together (``limits:`` in the
    server config). Defaults fit any model: a model with more inputs raises them."""

    max_inputs: int = spec(64, lo=1, hi=4096, doc="tensors in one request's inputs")
    max_outputs: int = spec(64, lo=1, hi=4096, doc="names in one request's outputs")
    max_name_bytes: int = spec(255, lo=16, hi=4096, doc="length of a tensor name")
    max_parameters: int = spec(64, lo=4, hi=4096, doc="entries in one request's parameters")
    max_contents_values: int = spec(
        4096, lo=64, hi=2**24,
        doc="values a request's inputs send one by one in their typed contents, all inputs "
        "together: a BYTES string each, a number each where numbers are not packed (packed "
        "numbers and raw_input_contents count once). Each costs the parse a Python object: "
        "3.6 MiB of empty strings beside an FP32 input's values took 45 ms and 60 MiB; the "
        "count stops at the bound (4,096: ~2 ms of the event loop)",
    )  # fmt: skip
    max_id_bytes: int = spec(
        1024, lo=16, hi=2**16,
        doc="bytes of a request's id (its answer echoes it: a longer one could take the answer "
        "past the message limit after the model ran)",
    )  # fmt: skip
    max_inflight_bytes: int = spec(
        256 * 2**20, lo=2**20, hi=2**40,
        doc="request bytes accepted and not yet answered, and stream answer bytes their "
        "clients have not read yet, all models together; more: RESOURCE_EXHAUSTED (keeps "
        "memory bounded under many large requests, and under stream clients that send "
        "without reading)",
    )  # fmt: skip
    max_stream_bytes: int = spec(
        4 * 2**20, lo=2**16, hi=2**40,
        doc="bytes of max_inflight_bytes one ModelStreamInfer stream may hold - its requests "
        "being answered and the answers its client has not read - before it reads no further "
        "request until answers are read (gRPC's flow control then slows the client; nothing "
        "is refused): a few streams that send without reading stall themselves instead of "
        "filling the cap for every client. A stream holding nothing reads any request",
    )  # fmt: skip
    max_health_watches: int = spec(
        1024, lo=1, hi=10**6,
        doc="grpc.health Watch streams open at once, all clients together (the health "
        "service is open without a token; gRPC's client-side health checking opens one per "
        "connection, Kubernetes' probes use Check); more: RESOURCE_EXHAUSTED",
    )  # fmt: skip
    max_shared_memory_regions: int = spec(
        64, lo=1, hi=4096,
        doc="system shared-memory regions registered at once, all clients together (each "
        "keeps its object open until unregistered and its last request answered); more: "
        "RESOURCE_EXHAUSTED",
    )  # fmt: skip
    streams_share: float = spec(
        0.75, lo=0.05, hi=1.0,
        doc="of max_inflight_bytes, what all streams together may hold before those that "
        "hold bytes already read no further request (as at max_stream_bytes; nothing is "
        "refused): many streams that send without reading stall there, and the rest of the "
        "cap stays for unary calls and streams holding nothing. 1: no share of its own",
    )  # fmt: skip


def unservable(limits: RequestLimits, inputs: list[str]) -> str | None:
    """Why no request to a model whose requests carry the input tensors ``inputs`` could
    pass ``limits``, or None where one can. Such a model loaded READY and refused every
    request naming no setting (review 160). Names measured as the request check measures
    them (``codec.decode_inputs``: characters); outputs are not checked there - a request
    may name none and get all (review 162).

    Example:
        >>> unservable(RequestLimits(max_name_bytes=16), ["pixel_values_of_the_image"])
        "input name 'pixel_values_of_the_image' is 25 characters; limits.max_name_bytes is 16"
    """
    if len(inputs) > limits.max_inputs:
        return f"it has {len(inputs)} inputs; limits.max_inputs is {limits.max_inputs}"
    for name in inputs:
        if len(name) > limits.max_name_bytes:
            return (f"input name {name!r} is {len(name)} characters; limits.max_name_bytes "
                    f"is {limits.max_name_bytes}")  # fmt: skip
    return None


def model_unservable(limits, cfg) -> str | None:
    """``unservable`` for a model's config (a ModelConfig): its inputs as clients send them
    (a text model's string input stands for its token inputs)."""
    inputs = [s.name for s in cfg.inputs]
    return unservable(limits, [cfg.text.input] if cfg.text is not None else inputs)


def stream_limits_warning(limits: RequestLimits) -> str | None:
    """What is off in how the stream bounds fit the cap (None: nothing). Not an error: the
    limits still hold, the share simply binds before one stream's window does.

    Example:
        >>> stream_limits_warning(RequestLimits()) is None
        True
        >>> stream_limits_warning(RequestLimits(max_inflight_bytes=2**21))[:40]
        'limits.max_stream_bytes (4.0 MiB) is abo'
    """
    share = int(limits.max_inflight_bytes * limits.streams_share)
    if limits.max_stream_bytes <= share:
        return None
    return (
        f"limits.max_stream_bytes ({limits.max_stream_bytes / 2**20:.1f} MiB) is above the "
        f"streams' share of the in-flight cap ({share / 2**20:.2f} MiB: streams_share "
        f"{limits.streams_share:g} x max_inflight_bytes "
        f"{limits.max_inflight_bytes / 2**20:.1f} MiB): one stream that never reads fills "
        "the whole share before its own window stops it, and every other stream then goes "
        "one request at a time. Lower max_stream_bytes (the share over the streams you "
        "expect at once) or raise max_inflight_bytes"
    )


# Fields one input or output of a valid ModelInferRequest holds: its name, datatype, shape
# (one packed field), contents and up to two parameters (binary_data, classification), with
# room for an unpacked shape's dims. A request's tensors may hold max_parameters more in all.
TENSOR_FIELDS = 8
# Top-level fields of a request other than ModelInfer's beside its parameters: a name, a
# version, a flag - and room for fields added to the protocol.
OTHER_FIELDS = 16


def request_fields(limits: RequestLimits) -> int:
    """The most top-level fields a valid ModelInferRequest holds: name, version, id, one per
    parameter, input, output and raw tensor, and room for fields added to the protocol.

    Example:
        >>> request_fields(RequestLimits())
        275
    """
    return 3 + limits.max_parameters + 2 * limits.max_inputs + limits.max_outputs + 16


def tensor_fields(limits: RequestLimits) -> int:
    """The most fields a valid ModelInferRequest's inputs and outputs hold together
    (``TENSOR_FIELDS`` each, and ``max_parameters`` more parameters in all).

    Example:
        >>> tensor_fields(RequestLimits())
        1088
    """
    return TENSOR_FIELDS * (limits.max_inputs + limits.max_outputs) + limits.max_parameters


def clip(text: str, limit: int = ECHO_CHARS) -> str:
    """``repr`` of a client string, cut to ``limit`` characters with its length said."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}"[:-1] + f"...' ({len(text)} characters)"


def clip_message(text: str) -> str:
    """A status message no longer than ``MESSAGE_CHARS``."""
    if len(text) <= MESSAGE_CHARS:
        return text
    return text[: MESSAGE_CHARS - 20] + f"... ({len(text)} chars)"


# The automatic gRPC message limit: twice the largest valid request (typed contents and
# parameters take some room beyond the raw tensor bytes), and never below this.
MIN_MESSAGE_BYTES = 4 * 2**20
# What an answer holds besides its tensors (names, shapes, parameters), at most: the room
# the data plane leaves in the message limit for it.
ANSWER_FRAME_BYTES = 64 * 2**10


# Bytes a text may have per token of the model's max_length: room for any UTF-8 text the
# model can read in full (a token is rarely more than a few characters); a longer text is
# refused rather than tokenized only to be truncated.
TEXT_BYTES_PER_TOKEN = 64


def text_bytes(config) -> int:
    """The most bytes one text of a text model may have (``TEXT_BYTES_PER_TOKEN`` per token
    of its ``max_length``)."""
    return TEXT_BYTES_PER_TOKEN * config.text.max_length


def request_bytes(config) -> int:
    """Raw bytes of the largest valid request of the model ``config`` (a ModelConfig): a full
    batch of every input at the longest sequence, or of the longest texts.

    Example:
        >>> from runtime.repository.config import ModelConfig
        >>> cfg = ModelConfig.from_dict({"inputs": [{"name": "x", "shape": [1, 28, 28]}],
        ...     "outputs": [{"name": "y", "shape": [10]}], "tiers": [{"name": "a", "width": 1}]})
        >>> request_bytes(cfg)
        25088
    """
    import numpy as np

    length = config.sequence_lengths[-1] if config.sequence_lengths else 1
    tensors = sum(
        int(np.prod(t.concrete(length))) * np.dtype(t.dtype).itemsize for t in config.inputs
    )
    text = text_bytes(config) + 4 if config.text is not None else 0  # + the length prefix
    return config.max_batch * max(tensors, text)


def response_bytes(config) -> int:
    """Raw bytes of the largest answer of the model ``config``: a full batch of every output
    (outputs have fixed shapes). The message limit covers answers too - gRPC applies its
    send limit to them, and a larger one failed (on a stream, the whole stream).

    Example:
        >>> from runtime.repository.config import ModelConfig
        >>> cfg = ModelConfig.from_dict({"inputs": [{"name": "x", "shape": [4]}],
        ...     "outputs": [{"name": "y", "shape": [4, 256, 256]}], "max_batch": 8,
        ...     "tiers": [{"name": "a", "width": 1}]})
        >>> response_bytes(cfg) // 2**20
        8
    """
    import numpy as np

    return config.max_batch * sum(
        int(np.prod(t.shape)) * np.dtype(t.dtype).itemsize for t in config.outputs
    )


def message_limit(largest_request: int) -> int:
    """The gRPC message limit for servers whose largest valid request (or answer) is that
    many bytes."""
    return min(max(2 * largest_request, MIN_MESSAGE_BYTES), 2**31 - 1)
