"""Domain errors of the data plane. Mapped to gRPC status codes in exactly one place
(``server.service.STATUS_OF``); the data plane and the scheduler never import grpc.

Each message says what was wrong and what was expected, e.g.
``input 'input': shape [2, 3] does not match [-1, 1, 28, 28]``.
"""

from __future__ import annotations


class InferError(Exception):
    """Base class: a request could not be served; ``str(err)`` is safe to show a client."""


class InvalidArgument(InferError):
    """Wrong input name, shape, dtype, byte length, parameter or budget."""


class NotFound(InferError):
    """Unknown model, version or tier."""


class UnknownTier(NotFound):
    """A request's ``tier`` or ``min_tier`` names no tier of the model: gRPC's NOT_FOUND
    (documented: an auto-tiered model's names change), but REST's 400 - a 404 on a model's
    infer route reads to clients and gateways as "no such model here" (review helper-307)."""


class ResourceExhausted(InferError):
    """The model's bounded queue is full."""


class TooLarge(ResourceExhausted):
    """A request or its answer larger than this server ever holds (the in-flight cap, the
    message limit): not load - every retry, on every replica, is refused the same way.
    gRPC's RESOURCE_EXHAUSTED still (gRPC's own message-size limit answers so); REST's 413,
    not the 429 that retrying clients and proxies repeat (review helper-307)."""


class DeadlineExceeded(InferError):
    """No tier can meet the budget (refused at once), or the deadline passed in the queue."""


class Unavailable(InferError):
    """The model is loading or the server is draining."""


class FailedPrecondition(InferError):
    """The model exists but cannot be loaded as it is (corrupt or stale files): rebuild it."""


class ModelBroken(FailedPrecondition):
    """A call to a model that failed to load on this server: this server's state, not the
    client's mistake - gRPC's FAILED_PRECONDITION, REST's 503 (a load balancer's cue to try
    another replica, as this model's own /ready route answers; 400 read as the client's
    fault, and 5xx alerts stayed quiet - review helper-307)."""


class Unauthenticated(InferError):
    """Missing or wrong bearer token."""


class PermissionDenied(InferError):
    """A caller the server will not serve whatever it sends: a web page's request (a browser
    on this machine) to a server that trusts its loopback host instead of a token."""


class EngineFailed(InferError):
    """The engine raised on the request's batch (a backend error, e.g. an index out of its
    table's range); the message names the model, the tier and the engine's own reason."""


class TokenizerFailed(InferError):
    """The model's tokenizer raised on the request's texts (a panic in its library on these
    characters): the server's failure, not the client's input; the message says its reason."""


class Unimplemented(InferError):
    """A Triton RPC innfer does not implement (CUDA shared memory, trace and log settings),
    or an option of one it does (a named repository)."""


class AlreadyExists(InferError):
    """A shared-memory region is registered under the name already."""
