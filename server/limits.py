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
    max_inflight_bytes: int = spec(
        256 * 2**20, lo=2**20, hi=2**40,
        doc="request bytes accepted and not yet answered, all models together; more: "
        "RESOURCE_EXHAUSTED (keeps memory bounded under many large requests)",
    )  # fmt: skip


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


def request_bytes(max_batch: int, inputs) -> int:
    """Raw tensor bytes of the largest valid request: a full batch of every input.

    Example:
        >>> from runtime.repository.config import TensorConfig
        >>> request_bytes(8, [TensorConfig(name="x", dtype="float32", shape=(1, 28, 28))])
        25088
    """
    import numpy as np

    return max_batch * sum(int(np.prod(t.shape)) * np.dtype(t.dtype).itemsize for t in inputs)


def message_limit(largest_request: int) -> int:
    """The gRPC message limit for servers whose largest valid request is that many bytes."""
    return min(max(2 * largest_request, MIN_MESSAGE_BYTES), 2**31 - 1)
