"""System shared memory: Triton's extension, so a client on the same host passes tensors
through a POSIX shared-memory object instead of the gRPC message (tritonclient's
``register_system_shared_memory``, ``InferInput.set_shared_memory``,
``InferRequestedOutput.set_shared_memory``; perf_analyzer's ``--shared-memory system``).

A client creates the object (``/dev/shm/<key>``), registers a region of it under a name
(key, offset, byte size), and then names the region in a request's input or output
parameters ``shared_memory_region`` / ``shared_memory_byte_size`` /
``shared_memory_offset`` (the offset within the region). Inputs are copied out of the
region when the request is decoded; outputs are written into it when the answer is made,
and the answer's tensor carries the shape and an empty raw entry, as Triton's does.

The region is read and written with positional I/O on the object's open descriptor, not
mapped (Triton maps it): a client that truncates the object after registering it made a
mapped read raise SIGBUS - the server gone, every model with it - where a short read is a
refusal; and a mapping's address space is not free (registered sparse objects of 16 TiB
each took the process's address space in two calls; review 204).

Invariants:
- A region is [offset, offset + byte_size) of its object and nothing else; every slice a
  request names lies inside it (checked at registration and per request).
- A request that names an output region holds a lease on it from admission to its answer:
  an unregister meanwhile takes the name away at once (it may be registered again: Triton
  keeps the name until its requests end) and the descriptor is closed when the last lease
  goes - an accepted request is answered into the object it was accepted with. Such a
  region still counts against the limit until then.
- Keys are single names in /dev/shm (no path, no link, a regular file, not a POSIX
  semaphore's ``sem.*``): a client names a region, it does not open files.

No grpc here: requests' parameters are read as protobuf maps; errors are server.errors.
"""

from __future__ import annotations

import errno
import math
import os
import stat
from dataclasses import dataclass, field

import numpy as np

from server.errors import AlreadyExists, EngineFailed, InvalidArgument, NotFound, ResourceExhausted
from server.limits import clip

SHM_ROOT = "/dev/shm"
PARAMETERS = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")
MAX_KEY_BYTES = 255  # NAME_MAX: one file name in /dev/shm


@dataclass(frozen=True)
class Slice:
    """Where a request's tensor lies: ``byte_size`` bytes at ``offset`` into ``region``."""

    region: str
    offset: int
    byte_size: int


def requested_slice(params, what: str) -> Slice | None:
    """The shared-memory slice a tensor's ``params`` name (None: they name none), checked
    for form: the region a non-empty string, the byte size a positive int64, the offset a
    non-negative int64 (default 0). ``what`` names the tensor in messages ("input 'x'").

    Example:
        >>> from server.proto_gen import grpc_service_pb2 as pb
        >>> t = pb.ModelInferRequest.InferInputTensor(name="x")
        >>> t.parameters["shared_memory_region"].string_param = "in"
        >>> t.parameters["shared_memory_byte_size"].int64_param = 16
        >>> requested_slice(t.parameters, "input 'x'")
        Slice(region='in', offset=0, byte_size=16)
    """
    if not any(k in params for k in PARAMETERS):
        return None
    if "shared_memory_region" not in params:
        given = next(k for k in PARAMETERS if k in params)
        raise InvalidArgument(
            f"{what}: {given} without shared_memory_region; name the region too, or drop "
            "the shared_memory_ parameters"
        )
    region = _param(params, "shared_memory_region", "string_param", what)
    if not region:
        raise InvalidArgument(f"{what}: shared_memory_region is empty; name a registered region")
    if "shared_memory_byte_size" not in params:
        raise InvalidArgument(
            f"{what}: shared_memory_region {clip(region)} without shared_memory_byte_size; "
            "give the tensor's size in bytes"
        )
    size = _param(params, "shared_memory_byte_size", "int64_param", what)
    offset = _param(params, "shared_memory_offset", "int64_param", what, default=0)
    if size < 1 or offset < 0:
        raise InvalidArgument(
            f"{what}: shared_memory_byte_size {size} and shared_memory_offset {offset}; "
            "the size must be positive and the offset at least 0"
        )
    return Slice(region, offset, size)


def _param(params, key: str, kind: str, what: str, default=None):
    """Parameter ``key`` of ``params`` as its ``kind`` (string_param / int64_param)."""
    if key not in params:
        return default
    p = params[key]
    if p.WhichOneof("parameter_choice") != kind:
        type_ = "a string" if kind == "string_param" else "an int64"
        raise InvalidArgument(f"{what}: {key} must be {type_} parameter")
    return getattr(p, kind)


@dataclass(eq=False)
class Region:
    """A registered region: ``byte_size`` bytes at ``offset`` of object ``key``, open as
    ``_fd`` (read and written in place: no mapping)."""

    name: str
    key: str
    offset: int
    byte_size: int
    _fd: int = field(repr=False)
    leases: int = 0
    gone: bool = False  # unregistered: closed when its last lease is released

    def read(self, s: Slice, what: str) -> bytes:
        """A copy of the slice's bytes (the client may rewrite the region at once)."""
        data = os.pread(self._fd, s.byte_size, self.offset + s.offset)
        if len(data) != s.byte_size:
            raise InvalidArgument(
                f"{what}: shared memory region {self.name!r} ends {s.byte_size - len(data)} "
                f"bytes short of the slice: its object {self.key!r} was truncated after it "
                "was registered; register it again at its size"
            )
        return data

    def write(self, s: Slice, data: memoryview) -> None:
        """``data`` (at most ``s.byte_size`` bytes: checked at admission) at the slice."""
        try:
            wrote = os.pwrite(self._fd, data, self.offset + s.offset)
        except OSError as exc:  # ENOSPC: a truncated object grown back on a full /dev/shm
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):  # the host's room, not the engine
                raise ResourceExhausted(  # (INTERNAL before, counted as the engine's failure)
                    f"the answer could not be written to shared memory region {self.name!r}: "
                    f"{exc.strerror} (was its object {self.key!r} truncated, on a full "
                    "/dev/shm?); the tensors were computed but not delivered"
                ) from None
            wrote, why = -1, exc.strerror
        else:
            why = f"{wrote} of {len(data)} bytes written"
        if wrote != len(data):  # (a short write delivered a cut tensor, unsaid)
            raise EngineFailed(
                f"the answer could not be written to shared memory region {self.name!r} "
                f"({why}); the tensors were computed but not delivered"
            )

    def close(self) -> None:
        os.close(self._fd)


@dataclass(eq=False)
class Lease:
    """An output's region held from admission to the answer (``SharedMemory.lease``)."""

    region: Region
    slice: Slice


class SharedMemory:
    """The system shared-memory regions registered with this server.

    Example:
        >>> import tempfile, pathlib
        >>> root = tempfile.mkdtemp()
        >>> _ = pathlib.Path(root, "obj").write_bytes(bytes(range(16)))
        >>> shm = SharedMemory(max_regions=4, root=root)
        >>> shm.register("in", "/obj", offset=4, byte_size=8)
        >>> shm.read(Slice("in", 0, 4), "input 'x'")
        b'\\x04\\x05\\x06\\x07'
        >>> [r.name for r in shm.status("")]
        ['in']
        >>> shm.unregister("")
    """

    def __init__(self, max_regions: int, root: str = SHM_ROOT, enabled: bool = True) -> None:
        self.max_regions = max_regions
        self.root = root
        self.enabled = enabled
        self._regions: dict[str, Region] = {}
        self._leaving = 0  # unregistered regions still leased: they count against the limit

    # -- the RPCs --------------------------------------------------------------------------
    def register(self, name: str, key: str, offset: int, byte_size: int) -> None:
        """Register ``byte_size`` bytes at ``offset`` of object ``key`` as region ``name``
        (the object opened and kept open)."""
        self._check_enabled()
        if not name:
            raise InvalidArgument("a region needs a name (SystemSharedMemoryRegister's name)")
        if len(name.encode()) > MAX_KEY_BYTES:
            raise InvalidArgument(f"region name {clip(name)} is over {MAX_KEY_BYTES} bytes")
        # The call's own mistakes first: at the region limit a malformed call was told
        # RESOURCE_EXHAUSTED, which clients retry, never to succeed (review helper-218).
        if byte_size < 1 or offset < 0:
            raise InvalidArgument(
                f"region {name!r}: byte_size {byte_size} and offset {offset}; the size must be "
                "positive and the offset at least 0"
            )
        file = _file_name(key)
        if name in self._regions:
            raise AlreadyExists(
                f"shared memory region {name!r} is registered already; unregister it first, "
                "or register under another name"
            )
        if len(self._regions) + self._leaving >= self.max_regions:
            raise ResourceExhausted(
                f"{len(self._regions)} shared memory regions are registered (and "
                f"{self._leaving} unregistered ones still written to by requests), the most "
                "this server keeps (limits.max_shared_memory_regions); unregister ones no "
                "longer used"
            )
        fd = self._open(file, key)
        size = os.fstat(fd).st_size
        if offset + byte_size > size:
            os.close(fd)
            raise InvalidArgument(
                f"region {name!r}: offset {offset} + byte_size {byte_size} runs past the end "
                f"of shared memory object {clip(key)} ({size} bytes)"
            )
        self._regions[name] = Region(name, key, offset, byte_size, fd)

    def unregister(self, name: str) -> None:
        """Forget region ``name`` ("": every region); an unknown name is no error (as
        Triton; so also where shared memory is off - nothing is registered: a client's
        clean-up at its start or end must not fail). A region leased by requests in flight
        is closed when they are answered."""
        names = list(self._regions) if not name else [name] if name in self._regions else []
        for n in names:
            self._forget(n)

    def status(self, name: str) -> list[Region]:
        """Region ``name`` ("": all of them, by name - none where shared memory is off);
        NotFound where it is not registered."""
        if not name:
            return [self._regions[n] for n in sorted(self._regions)]
        if name not in self._regions:
            off = "" if self.enabled else " (system shared memory is off on this server)"
            raise NotFound(f"no shared memory region {clip(name)} is registered{off}")
        return [self._regions[name]]

    # -- requests --------------------------------------------------------------------------
    def read(self, s: Slice, what: str) -> bytes:
        """A copy of input slice ``s``."""
        return self._region(s, what).read(s, what)

    def input_bytes(self, request) -> int:
        """The bytes ``request``'s inputs name in shared memory (what their decode copies
        out and the in-flight cap counts), each at most its region's size and its declared
        shape's (a slice larger than its tensor is refused at the decode, not counted as a
        request over the cap or as load); 0 for a slice of no registered region or whose
        parameters are malformed - the decode refuses it before any copy. Free while no
        region is registered."""
        if not self._regions:
            return 0
        from server.codec import DATATYPES  # (codec imports this module)

        total = 0
        for t in request.inputs:
            if t.parameters and "shared_memory_region" in t.parameters:
                region = self._regions.get(t.parameters["shared_memory_region"].string_param)
                p = t.parameters.get("shared_memory_byte_size")
                if region is not None and p is not None and p.HasField("int64_param"):
                    size = min(max(p.int64_param, 0), region.byte_size)
                    if t.datatype in DATATYPES:  # (BYTES: no fixed size per element)
                        count = math.prod(max(d, 0) for d in t.shape)
                        size = min(size, count * np.dtype(DATATYPES[t.datatype][0]).itemsize)
                    total += size
        return total

    def lease(self, s: Slice, what: str, needs: int) -> Lease:
        """Hold output slice ``s`` (at least ``needs`` bytes) until ``release``."""
        region = self._region(s, what)
        if s.byte_size < needs:
            raise InvalidArgument(
                f"{what}: shared_memory_byte_size {s.byte_size} cannot hold the result "
                f"({needs} bytes for these rows); give a larger slice of region {s.region!r}"
            )
        region.leases += 1
        return Lease(region, s)

    def release(self, leases) -> None:
        """Give back ``leases``; a region unregistered meanwhile closes with its last one."""
        for lease in leases:
            region = lease.region
            region.leases -= 1
            if region.gone and not region.leases:
                region.close()
                self._leaving -= 1

    def close(self) -> None:
        """Unregister every region (the server stopped): closed now, or - leased by a
        request still in flight past the grace period - when it is answered."""
        for name in list(self._regions):
            self._forget(name)

    def _forget(self, name: str) -> None:
        """Take region ``name`` away; its object closed now, or with its last lease."""
        region = self._regions.pop(name)
        region.gone = True
        if region.leases:
            self._leaving += 1
        else:
            region.close()

    # -- helpers ---------------------------------------------------------------------------
    def _check_enabled(self) -> None:
        if not self.enabled:
            raise InvalidArgument(
                "system shared memory is off on this server (system_shared_memory: false in "
                "its server.yaml): send the tensors in the request"
            )

    def _region(self, s: Slice, what: str) -> Region:
        self._check_enabled()
        region = self._regions.get(s.region)
        if region is None:
            raise NotFound(
                f"{what}: no shared memory region {clip(s.region)} is registered; register "
                "it first (SystemSharedMemoryRegister)"
            )
        if s.offset + s.byte_size > region.byte_size:
            raise InvalidArgument(
                f"{what}: shared_memory_offset {s.offset} + shared_memory_byte_size "
                f"{s.byte_size} runs past the end of region {s.region!r} ({region.byte_size} "
                "bytes)"
            )
        return region

    def _open(self, file: str, key: str) -> int:
        path = os.path.join(self.root, file)
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise InvalidArgument(
                f"no shared memory object {clip(key)} ({path}): create it first, on this "
                "host (tritonclient.utils.shared_memory.create_shared_memory_region)"
            ) from None
        except OSError as exc:  # ELOOP: a link; EACCES: not the server's to write
            if exc.errno in (errno.EMFILE, errno.ENFILE):  # the server's limit, not the call's
                raise ResourceExhausted(
                    f"shared memory object {clip(key)} cannot be opened: this server is out of "
                    "file descriptors (each region holds one); unregister regions no longer "
                    "used, or lower limits.max_shared_memory_regions / raise the open-file "
                    "limit (ulimit -n)"
                ) from None
            raise InvalidArgument(
                f"shared memory object {clip(key)} cannot be opened for reading and writing "
                f"({exc.strerror}): it must be a file in {self.root} the server may write"
            ) from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise InvalidArgument(f"shared memory object {clip(key)} is not a regular file")
        return fd


def _file_name(key: str) -> str:
    """Key "/name" (or "name") -> "name": one file name, not a path, not a semaphore."""
    file = key.lstrip("/")
    if (
        not file
        or "/" in file
        or "\0" in file
        or file in (".", "..")
        or file.startswith("sem.")
        or len(file.encode()) > MAX_KEY_BYTES
    ):
        raise InvalidArgument(
            f"shared memory key {clip(key)} is not a shared memory object's name; give "
            "'/name' as shm_open takes it (one name, no further '/')"
        )
    return file
