"""Request bodies and byte ranges: bodies read whole up to a limit or streamed into an upload
(small ones on the event loop, larger ones hashed and written by a worker thread while the next
batch arrives), never waiting more than BODY_STALL_SECONDS for a byte, and the Range and
Content-Range headers parsed into offsets. The sending side is download.py."""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Optional

from aiohttp import web

from dockyard.registry import paths as p
from dockyard.registry.connection import Connection
from dockyard.registry.errors import (
    BlobUploadInvalid,
    DigestInvalid,
    RangeInvalid,
    RangeNotSatisfiable,
    RegistryError,
    SizeInvalid,
    TooLarge,
)
from dockyard.registry.listener import BODY_PROGRESS, BodyProgress
from dockyard.registry.uploadstore import UploadAppender, UploadStore

log = logging.getLogger("dockyard.registry")

# Bytes handed to the writer per step while streaming an upload body.
STREAM_CHUNK = 1024 * 1024
# Request bodies up to this size are hashed and written on the event loop (see stream_into).
INLINE_BODY_MAX = 2 * 1024 * 1024
# Seconds a request body may go without a byte arriving: the request is then refused (400, the
# route's spec code; a chunk is taken back) and its connection closed (nginx's
# client_body_timeout is 60 s; aiohttp has no read timeout of its own).
BODY_STALL_SECONDS = 30.0
# Key of a request whose body the registry stopped reading: its answer closes the connection.
BODY_REFUSED = "dockyard.body_refused"
# Request key: body bytes received so far (the metrics' bytes in).
BODY_BYTES = "dockyard.body_bytes"


class BodyStalled(Exception):
    """No byte of a request body came for BODY_STALL_SECONDS."""

    def __init__(self) -> None:
        super().__init__(f"no body bytes for {BODY_STALL_SECONDS:.0f} s")


async def next_piece(request: web.Request) -> bytes:
    """The next bytes of the request body (b"" at its end), waiting at most BODY_STALL_SECONDS
    for them: BodyStalled then, and the answer will close the connection (aiohttp would
    otherwise keep reading the rest for a while). ConnectionResetError when the connection is
    gone (closed to free descriptors before the handler began: aiohttp's RuntimeError). What
    comes is told to the request's BodyProgress, which the shedder reads."""
    progress: Optional[BodyProgress] = request.get(BODY_PROGRESS)
    if progress is not None:
        progress.reading(asyncio.get_running_loop().time())
    try:
        # wait_for, not asyncio.timeout: hosts run Python 3.9 (bullseye), where the latter and
        # TimeoutError as asyncio's timeout do not exist
        chunk = await asyncio.wait_for(request.content.readany(), BODY_STALL_SECONDS)
    except asyncio.TimeoutError as exc:
        request[BODY_REFUSED] = True
        protocol = request.protocol
        if isinstance(protocol, Connection):
            protocol.refuse_body()
        raise BodyStalled() from exc
    except RuntimeError as exc:
        if request.protocol.transport is not None:
            raise  # not aiohttp's "Connection closed.": a bug, let it show
        raise ConnectionResetError("the connection was closed") from exc
    finally:
        if progress is not None:
            progress.waiting = False
    if progress is not None:
        progress.read(len(chunk))
    request[BODY_BYTES] = request.get(BODY_BYTES, 0) + len(chunk)
    return chunk


def body_failure(exc: Exception) -> str:
    """What became of a body that was not read to its end, for the error's detail."""
    return str(exc)[:200] or type(exc).__name__


async def read_body(request: web.Request, limit: int, invalid: type[RegistryError]) -> bytes:
    """The whole request body, however many reads it arrives in (a slow client, TLS records),
    up to `limit` bytes: TooLarge beyond, `invalid` when the client breaks it off, its chunked
    encoding is broken, or no byte comes for BODY_STALL_SECONDS."""
    declared = request.content_length
    if declared is not None and declared > limit:
        raise TooLarge({"size": declared, "limit": limit})
    chunks: list[bytes] = []
    size = 0
    try:
        while chunk := await next_piece(request):
            size += len(chunk)
            if size > limit:
                raise TooLarge({"limit": limit})
            chunks.append(chunk)
    except (ConnectionResetError, BodyStalled, web.RequestPayloadError) as exc:
        log.info(
            "%s %s: request body not read whole: %s",
            request.remote,
            request.path[:200],
            body_failure(exc),
        )
        raise invalid({"reason": body_failure(exc)}, message="request body was cut short") from exc
    return b"".join(chunks)


async def body_piece(request: web.Request) -> bytes:
    """The next piece of an upload's body, b"" at its end; BlobUploadInvalid when the client
    breaks it off, its chunked encoding is broken, or no byte comes for BODY_STALL_SECONDS."""
    try:
        return await next_piece(request)
    except (
        ConnectionResetError,
        BodyStalled,
        asyncio.IncompleteReadError,
        web.RequestPayloadError,
    ) as exc:
        log.info(
            "%s %s: upload body not read whole: %s",
            request.remote,
            request.path[:200],
            body_failure(exc),
        )
        raise BlobUploadInvalid(
            {"reason": body_failure(exc)}, message="upload body was cut short"
        ) from exc


def digest_param(value: Optional[str]) -> p.Digest:
    if value is None:
        raise DigestInvalid(message="digest parameter is required")
    return p.parse_digest(value)


def content_range(header: Optional[str]) -> tuple[Optional[int], Optional[int]]:
    if not header:
        return None, None
    match = re.fullmatch(r"(?:bytes[ =])?(\d{1,19})-(\d{1,19})", header.strip())
    if not match or int(match.group(2)) < int(match.group(1)):
        raise RangeInvalid({"Content-Range": header[:100]})
    return int(match.group(1)), int(match.group(2))


def byte_range(header: Optional[str], size: int) -> Optional[tuple[int, int]]:
    """(start, end inclusive) of a Range header, None for the whole blob; 416 when invalid."""
    if header is None:
        return None
    match = re.fullmatch(r"bytes=(\d{0,19})-(\d{0,19})", header.strip())
    if not match or (match.group(1) == "" and match.group(2) == ""):
        raise RangeNotSatisfiable({"Range": header[:100], "size": size})
    if match.group(1) == "":
        length = int(match.group(2))
        if length == 0:
            raise RangeNotSatisfiable({"Range": header[:100], "size": size})
        return max(0, size - length), size - 1
    start = int(match.group(1))
    end = int(match.group(2)) if match.group(2) else size - 1
    if start >= size or end < start:
        raise RangeNotSatisfiable({"Range": header[:100], "size": size})
    return start, min(end, size - 1)


def ensure_upload_offsets(start: Optional[int], end: Optional[int], length: int) -> None:
    """A Content-Range must match the body's length."""
    if start is not None and end is not None and end - start + 1 != length:
        raise BlobUploadInvalid(
            {"range": f"{start}-{end}", "length": length},
            message="Content-Range does not match the body length",
        )


def _check_length(request: web.Request, received: int) -> None:
    declared = request.headers.get("Content-Length")
    if declared is not None and declared.isdigit() and int(declared) != received:
        raise SizeInvalid({"declared": int(declared), "received": received})


async def stream_into(
    request: web.Request,
    uploads: UploadStore,
    name: str,
    upload_id: str,
    start: Optional[int] = None,
    end: Optional[int] = None,
) -> int:
    """Append the request body to an upload as one chunk; the upload's size after. A chunk is
    whole or not at all: one whose length differs from its Content-Range (`start`-`end`) or
    Content-Length, or whose body is cut short, is refused and leaves the upload as it was
    (UploadStore.append); a mismatch of the two headers is refused before the body is read.
    The upload is locked from the body's first byte on, not while the headers wait for it: a
    body that comes once the upload has finished is refused as unknown."""
    declared = request.content_length
    if declared is not None:
        ensure_upload_offsets(start, end, declared)
    status = uploads.expect_offset(name, upload_id, start)
    chunk = await body_piece(request)
    if not chunk:
        ensure_upload_offsets(start, end, 0)
        _check_length(request, 0)
        return status.size
    with uploads.append(name, upload_id, start) as appender:
        before = appender.size
        if declared is not None and declared <= INLINE_BODY_MAX:
            # A small body: each piece hashed and written as it arrives, overlapping the
            # client's sending, with no thread hop.
            while chunk:
                appender.write(chunk)
                chunk = await body_piece(request)
        else:
            await _pipeline(request, appender, chunk)
        # Checked inside the block: a refusal here takes the chunk back.
        received = appender.size - before
        ensure_upload_offsets(start, end, received)
        _check_length(request, received)
        return appender.size


async def _pipeline(request: web.Request, appender: UploadAppender, chunk: bytes) -> None:
    """Write the body from `chunk` on: a worker thread hashes and writes one batch (hashlib and
    file writes release the GIL) while the event loop receives the next one."""
    loop = asyncio.get_running_loop()
    writing: Optional[asyncio.Future[None]] = None
    batch: list[bytes] = []
    batched = 0
    try:
        while True:
            if chunk:
                batch.append(chunk)
                batched += len(chunk)
            if batched >= STREAM_CHUNK or (not chunk and batch):
                if writing is not None:
                    await writing
                if not chunk and writing is None:
                    # A small body in one batch: no thread hop for it.
                    appender.write_many(batch)
                else:
                    writing = loop.run_in_executor(None, appender.write_many, batch)
                batch, batched = [], 0
            if not chunk:
                break
            chunk = await body_piece(request)
    finally:
        if writing is not None:
            await writing
