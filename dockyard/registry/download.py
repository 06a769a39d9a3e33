"""Downloads: a blob's bytes copied to the client on the event loop, never by a thread waiting
for the client — sendfile(2) driven by writability on plain HTTP, SEND_BUFFER steps read by a
blob-read thread and written as the connection drains under TLS (or from a reader with no
descriptor, as the in-memory driver's) — and a client that reads nothing for SEND_STALL_MS
dropped with a reset."""

from __future__ import annotations

import asyncio
import io
import os
import socket
import struct
from concurrent.futures import Executor
from typing import BinaryIO, Callable

from aiohttp import web

# Milliseconds a download may go without the client reading a byte before it is dropped.
SEND_STALL_MS = 120_000
# Bytes per read/write step of a download under TLS (send_steps; plain HTTP uses sendfile(2)):
# a stalled TLS client holds two (one in its connection's buffer, one read ahead) in memory
# until SEND_STALL_MS drops it.
SEND_BUFFER = 1024 * 1024
# Threads that read blob files for TLS downloads. A read never waits for a client (the socket
# side is the event loop's, non-blocking), so slow clients cannot hold these threads.
BLOB_READ_THREADS = 8


class ClientStalled(ConnectionError):
    """A download's client read nothing for SEND_STALL_MS."""

    def __init__(self) -> None:
        super().__init__(f"the client read nothing for {SEND_STALL_MS // 1000} s")


async def write_or_stall(
    transport: asyncio.Transport, response: web.StreamResponse, chunk: bytes
) -> None:
    """Write one step of a download, waiting (on the event loop, holding no thread) until the
    connection's buffer has room again. ClientStalled once the client has read nothing for
    SEND_STALL_MS: the buffer is looked at every SEND_STALL_MS, and only one found exactly as
    full as at the look before is a stall (it shrinks when the client reads; nothing is added
    to it meanwhile)."""
    write = asyncio.ensure_future(response.write(chunk))
    await asyncio.sleep(0)  # the write's first step runs: the buffer now holds the chunk
    pending = transport.get_write_buffer_size()
    try:
        while True:
            done, _ = await asyncio.wait((write,), timeout=SEND_STALL_MS / 1000)
            if done:
                write.result()
                return
            now = transport.get_write_buffer_size()
            if now == pending:
                raise ClientStalled()
            pending = now
    finally:
        if not write.done():
            write.cancel()


async def writable(fd: int) -> None:
    """Wait until the socket `fd` takes bytes again; ClientStalled after SEND_STALL_MS."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():  # the selector may fire again before the waiting task runs
            ready.set_result(None)

    loop.add_writer(fd, wake)
    try:
        await asyncio.wait_for(ready, SEND_STALL_MS / 1000)
    except asyncio.TimeoutError:
        raise ClientStalled() from None
    finally:
        loop.remove_writer(fd)


async def sendfile(sock_fd: int, file_fd: int, offset: int, count: int) -> None:
    """Copy `count` bytes of a file from `offset` to a plain TCP socket on the event loop: the
    kernel moves them (sendfile(2), no copy through Python), as many as the socket buffer takes
    at a time, and the loop waits for writability in between, so no thread waits for a client.
    A duplicate of the descriptor is used (the transport owns the original; a transport's fd
    cannot be watched for writing apart from it), and the loop keeps reading the connection."""
    fd = os.dup(sock_fd)
    try:
        while count > 0:
            try:
                sent = os.sendfile(fd, file_fd, offset, count)
            except BlockingIOError:
                await writable(fd)
                continue
            if sent == 0:
                raise ConnectionError("blob file ended early")  # truncated under us
            offset += sent
            count -= sent
    finally:
        os.close(fd)


def drop(transport: asyncio.Transport) -> None:
    """Close a stalled download's connection now, with a reset: a plain close would keep the
    socket (and the unread bytes in its buffer) until the client read them, which it won't."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


async def send_blob(
    request: web.Request,
    response: web.StreamResponse,
    blob: Callable[[], BinaryIO],
    start: int,
    length: int,
    reads: Executor,
) -> None:
    """Copy `length` bytes from `start` of the blob `blob()` opens to the client, on the event
    loop, holding no thread while the client reads. Plain HTTP: sendfile(2) driven by
    writability (sendfile). TLS: each SEND_BUFFER step is read by a `reads` thread (the next
    one while this one is sent), then written to the connection, whose buffer must drain before
    the next step (write_or_stall). A client that stops reading holds its socket buffer, at
    most two steps of memory under TLS, and its descriptors, until SEND_STALL_MS drops it;
    other downloads go on meanwhile."""
    transport = request.transport
    if transport is None:
        raise ConnectionError("the client went away")
    with blob() as f:
        try:
            fd = f.fileno()
        except io.UnsupportedOperation:  # a reader of bytes in memory
            fd = -1
        sock = transport.get_extra_info("socket")
        try:
            if (
                fd >= 0
                and sock is not None
                and transport.get_extra_info("sslcontext") is None
                and transport.get_write_buffer_size() == 0  # the headers are on the wire
            ):
                await sendfile(sock.fileno(), fd, start, length)
            else:
                read = _pread(fd) if fd >= 0 else _seek_read(f)
                await send_steps(transport, response, read, start, length, reads)
        except ClientStalled:
            drop(transport)
            raise


def _pread(fd: int) -> Callable[[int, int], bytes]:
    return lambda size, offset: os.pread(fd, size, offset)


def _seek_read(f: BinaryIO) -> Callable[[int, int], bytes]:
    def read(size: int, offset: int) -> bytes:
        f.seek(offset)
        return f.read(size)

    return read


async def send_steps(
    transport: asyncio.Transport,
    response: web.StreamResponse,
    read: Callable[[int, int], bytes],
    start: int,
    length: int,
    reads: Executor,
) -> None:
    """Send `length` bytes from `start` in SEND_BUFFER steps, each read by `read(size, offset)`
    on a `reads` thread (TLS, or a reader without a descriptor)."""
    loop = asyncio.get_running_loop()
    end = start + length

    def step(offset: int) -> asyncio.Future[bytes]:
        return loop.run_in_executor(reads, read, min(SEND_BUFFER, end - offset), offset)

    offset = start
    reading = step(offset)
    try:
        while True:
            chunk = await reading
            if not chunk:
                raise ConnectionError("blob file ended early")  # truncated under us
            offset += len(chunk)
            if offset < end:
                reading = step(offset)  # the next step is read while this one is sent
            await write_or_stall(transport, response, chunk)
            if offset >= end:
                return
    finally:
        reading.cancel()
