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

# A client string echoed in an error message is cut here: messages stay readable, and a
# status message over gRPC's header limit (about 8-16 KiB) would be replaced by
# "Stream removed" on the client, hiding the real error.
ECHO_CHARS = 48
# The whole status message is capped too (a list of model names can be long).
MESSAGE_CHARS = 1024


@dataclass(frozen=True)
class RequestLimits:
    """Limits on one ModelInfer request and on all of them together."""

    max_inputs: int = 64  # tensors in request.inputs (the demo models have one)
    max_outputs: int = 64  # names in request.outputs
    max_name_bytes: int = 255  # a tensor, model, tier or parameter name
    max_parameters: int = 64  # entries in request.parameters
    max_inflight_bytes: int = 256 * 2**20  # request bytes accepted and not yet answered


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
