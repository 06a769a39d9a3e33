"""The uncompressed tar stream of a layer, as `tarsafe` reads it: headers through `read`/`seek`
(tarfile's random-access mode, forward only but for the few bytes tarfile steps back), member data
straight into the file being written (`copy_to`), and the two digests of the layer (compressed and
uncompressed) taken on the way, each byte hashed once.

Two shapes, chosen from the source:
- an uncompressed layer in a regular file (the layer store's blobs): member data goes from file
  to file inside the kernel (`copy_file_range`, falling back to `pread`/`pwrite`), and a second
  thread hashes the file meanwhile; the compressed and uncompressed digests are the same;
- anything else (gzip, zstd, a pipe): a second thread reads, hashes and decompresses the layer
  into a short bounded queue of chunks, and the applying thread hashes the chunks it takes.
hashlib, zlib, zstd and the file system calls release the GIL, so on two cores the hashing and
the decompression run beside the tar parsing and the writes.

Bounds: the uncompressed stream is at most `limit` bytes (`LayerTooLarge`), a decompressed chunk
is at most `CHUNK` bytes whatever the ratio, and one header read (a pax or GNU long-name header)
at most `MAX_HEADER_READ` bytes, as Go's archive/tar (containerd, Docker) refuses past 1 MiB."""

from __future__ import annotations

import errno
import hashlib
import os
import queue
import stat
import threading
import time
import zlib
from typing import IO, Any, Callable, Optional

# Bytes per read, per decompressed chunk and per copy step.
CHUNK = 1024 * 1024
# Decompressed chunks the reading thread may run ahead of the applying thread.
QUEUE_DEPTH = 4
# Seconds a failed apply waits for its reading thread to stop.
CLOSE_WAIT = 30
# The longest single header read (pax extended header, GNU long name or link).
MAX_HEADER_READ = 1024 * 1024
# The first bytes of a zstd frame and of a gzip member: how a layer's compression is told.
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
GZIP_MAGIC = b"\x1f\x8b"
# copy_file_range answers meaning "not between these two files": copy through user space instead.
_NO_COPY_RANGE = (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF)


class InputError(Exception):
    """The layer's stream is corrupt, truncated or unsafe to read; the message says which."""


class InputTooLarge(InputError):
    """The uncompressed stream is longer than the bound it is read with."""


def _too_large(limit: int) -> InputTooLarge:
    return InputTooLarge(
        f"the layer is larger than {limit} bytes uncompressed (max_uncompressed); refusing it"
    )


def _truncated() -> InputError:
    return InputError("corrupt or truncated layer: the stream ends early")


class LayerInput:
    """What the applier reads: the tar stream's bytes by position, and the digests at the end."""

    compression = "none"
    position = 0  # in the uncompressed tar stream

    def read(self, size: int = -1) -> bytes:
        raise NotImplementedError

    def seek(self, position: int, whence: int = 0) -> int:
        raise NotImplementedError

    def tell(self) -> int:
        return self.position

    def copy_to(self, fd: int, offset: int, length: int) -> None:
        """`length` bytes from the current position into `fd` at `offset`; the position moves on."""
        raise NotImplementedError

    def finish(self) -> tuple[str, str, int]:
        """(uncompressed digest, compressed digest, uncompressed size), once the whole stream is
        read: what the tar did not use (its end blocks, padding) is read and hashed too."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    @staticmethod
    def _check_read(size: int) -> None:
        if size < 0 or size > MAX_HEADER_READ:
            raise InputError(
                f"corrupt layer: a tar header of {size} bytes (at most {MAX_HEADER_READ})"
            )


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """All of `data` into `fd` at `offset` (pwrite may write less than asked)."""
    while data:
        written = os.pwrite(fd, data, offset)
        offset += written
        data = data[written:]


class _Hasher(threading.Thread):
    """Hashes [start, end) of a regular file with pread, beside the applier's copies."""

    def __init__(self, fd: int, start: int, end: int) -> None:
        super().__init__(name="layer-hash", daemon=True)
        self.fd, self.start_at, self.end = fd, start, end
        self.hasher = hashlib.sha256()
        self.stop = False
        self.error: Optional[BaseException] = None

    def run(self) -> None:
        try:
            position = self.start_at
            buffer = bytearray(CHUNK)
            view = memoryview(buffer)
            while position < self.end and not self.stop:
                n = os.preadv(self.fd, [view[: min(CHUNK, self.end - position)]], position)
                if n <= 0:
                    raise _truncated()
                self.hasher.update(view[:n])
                position += n
        except BaseException as exc:  # noqa: BLE001 (handed to the applying thread)
            self.error = exc


class FileInput(LayerInput):
    """An uncompressed layer in a regular file, read by position (never through the file's own
    offset), its data copied file to file, hashed by a second thread."""

    def __init__(self, fd: int, start: int, limit: int) -> None:
        self.fd = fd
        self.start = start
        self.end = os.fstat(fd).st_size
        if self.end - start > limit:
            raise _too_large(limit)
        self.position = 0
        self.hasher = _Hasher(fd, start, self.end)
        self.hasher.start()

    def read(self, size: int = -1) -> bytes:
        self._check_read(size)
        data = os.pread(self.fd, size, self.start + self.position)
        self.position += len(data)
        return data

    def seek(self, position: int, whence: int = 0) -> int:
        if whence != 0 or position < 0:
            raise InputError("corrupt layer: a seek outside the tar stream")
        self.position = position
        return position

    def copy_to(self, fd: int, offset: int, length: int) -> None:
        source = self.start + self.position
        if source + length > self.end:
            raise _truncated()
        done = 0
        try:
            while done < length:
                n = os.copy_file_range(
                    self.fd, fd, length - done, offset_src=source + done, offset_dst=offset + done
                )
                if n <= 0:
                    raise _truncated()
                done += n
        except OSError as exc:
            if exc.errno not in _NO_COPY_RANGE:
                raise
            self._copy_plain(fd, source + done, offset + done, length - done)
        self.position += length

    def _copy_plain(self, fd: int, source: int, offset: int, length: int) -> None:
        buffer = bytearray(min(CHUNK, length) or 1)
        view = memoryview(buffer)
        while length:
            n = os.preadv(self.fd, [view[: min(len(buffer), length)]], source)
            if n <= 0:
                raise _truncated()
            _pwrite_all(fd, view[:n], offset)
            offset += n
            source += n
            length -= n

    def finish(self) -> tuple[str, str, int]:
        self.hasher.join()
        if self.hasher.error is not None:
            raise self.hasher.error
        digest = "sha256:" + self.hasher.hasher.hexdigest()
        return digest, digest, self.end - self.start

    def close(self) -> None:
        self.hasher.stop = True
        self.hasher.join()


_END = object()


class _Reader(threading.Thread):
    """Reads the raw layer, hashes it and decompresses it into `chunks` (bounded), ending with
    `_END` or the exception that stopped it."""

    def __init__(self, read_raw: Callable[[int], bytes], first: bytes, compression: str) -> None:
        super().__init__(name="layer-read", daemon=True)
        self.read_raw = read_raw
        self.first = first
        self.compression = compression
        # the uncompressed stream is the raw one: hashed once, by the applying thread
        self.hasher = None if compression == "none" else hashlib.sha256()
        self.chunks: queue.Queue[Any] = queue.Queue(QUEUE_DEPTH)
        self.stop = False

    def _raw(self, size: int) -> bytes:
        if self.first:
            data, self.first = self.first, b""
        else:
            data = self.read_raw(size)
        if self.hasher is not None:
            self.hasher.update(data)
        return data

    def _emit(self, data: bytes) -> None:
        while not self.stop:
            try:
                self.chunks.put(data, timeout=0.5)
                return
            except queue.Full:
                continue
        raise _Stopped()

    def run(self) -> None:
        try:
            if self.compression == "gzip":
                self._gunzip()
            elif self.compression == "zstd":
                self._unzstd()
            else:
                while True:
                    data = self._raw(CHUNK)
                    if not data:
                        break
                    self._emit(data)
            self._emit(_END)  # type: ignore[arg-type]
        except _Stopped:
            return
        except BaseException as exc:  # noqa: BLE001 (handed to the applying thread)
            try:
                self._emit(exc)  # type: ignore[arg-type]
            except _Stopped:
                return

    def _gunzip(self) -> None:
        """Every gzip member in turn (multi-member gzip is valid), zeros between members allowed
        as gzip(1) allows them; each member's CRC and length are checked by zlib."""
        inflater: Optional[Any] = None
        pending = b""
        while True:
            if not pending:
                pending = self._raw(CHUNK)
                if not pending:
                    break
            if inflater is None:
                pending = pending.lstrip(b"\0")
                if not pending:
                    continue
                inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
            data = pending
            while True:
                out = inflater.decompress(data, CHUNK)
                if out:
                    self._emit(out)
                data = inflater.unconsumed_tail
                if inflater.eof or (not data and len(out) < CHUNK):
                    break
            if inflater.eof:
                pending = inflater.unused_data
                inflater = None
            else:
                pending = b""
        if inflater is not None:
            raise InputError("corrupt or truncated layer: the gzip stream ends inside a member")

    def _unzstd(self) -> None:
        try:
            import zstandard  # type: ignore[import-not-found]
        except ImportError as exc:
            raise InputError(
                "the layer is zstd-compressed; install the zstd extra (pip install zstandard)"
            ) from exc
        reader = zstandard.ZstdDecompressor().stream_reader(_RawFile(self._raw))  # type: ignore[arg-type]
        while True:
            out = reader.read(CHUNK)  # at most CHUNK, whatever the ratio
            if not out:
                break
            self._emit(out)


class _Stopped(Exception):
    """The applying thread is done with the reader (it failed, or it has all it needs)."""


class _RawFile:
    """A read() view of the reader's raw side, for zstandard's stream_reader."""

    def __init__(self, read: Callable[[int], bytes]) -> None:
        self.read = read


class StreamInput(LayerInput):
    """Any layer stream: read, hashed and decompressed by a second thread, taken here chunk by
    chunk. Positions go forward; tarfile's one-byte look back stays inside the current chunk."""

    def __init__(
        self, read_raw: Callable[[int], bytes], first: bytes, compression: str, limit: int
    ) -> None:
        self.compression = compression
        self.limit = limit
        self.hasher = hashlib.sha256()
        self.count = 0  # uncompressed bytes taken from the reader
        self.buffer = b""  # the current chunk
        self.buffer_start = 0  # its position in the stream
        self.position = 0
        self.ended = False
        self.reader = _Reader(read_raw, first, compression)
        self.reader.start()

    def _pull(self) -> bool:
        """The next chunk into the buffer; False at the end of the stream."""
        if self.ended:
            return False
        item = self.reader.chunks.get()
        if item is _END:
            self.ended = True
            return False
        if isinstance(item, BaseException):
            self.ended = True
            raise item
        self.hasher.update(item)
        self.count += len(item)
        if self.count > self.limit:
            raise _too_large(self.limit)
        self.buffer_start += len(self.buffer)
        self.buffer = item
        return True

    def _available(self) -> int:
        """Bytes of the current chunk at and after the position (pulling chunks as needed);
        0 at the end of the stream."""
        while self.position >= self.buffer_start + len(self.buffer):
            if not self._pull():
                return 0
        return self.buffer_start + len(self.buffer) - self.position

    def read(self, size: int = -1) -> bytes:
        self._check_read(size)
        parts = []
        while size:
            available = self._available()
            if not available:
                break
            at = self.position - self.buffer_start
            n = min(available, size)
            parts.append(self.buffer[at : at + n])
            self.position += n
            size -= n
        return b"".join(parts)

    def seek(self, position: int, whence: int = 0) -> int:
        if whence != 0 or position < self.buffer_start:
            raise InputError("corrupt layer: the tar stream would have to be read backwards")
        self.position = position
        return position

    def copy_to(self, fd: int, offset: int, length: int) -> None:
        while length:
            available = self._available()
            if not available:
                raise _truncated()
            at = self.position - self.buffer_start
            n = min(available, length)
            _pwrite_all(fd, memoryview(self.buffer)[at : at + n], offset)
            offset += n
            self.position += n
            length -= n

    def finish(self) -> tuple[str, str, int]:
        while self._pull():
            pass
        self.reader.join()
        digest = "sha256:" + self.hasher.hexdigest()
        raw = self.reader.hasher
        return digest, digest if raw is None else "sha256:" + raw.hexdigest(), self.count

    def close(self) -> None:
        """Stop the reader: it ends at its next chunk (a source that never answers again leaves
        it blocked in its read, as a daemon thread, after CLOSE_WAIT seconds)."""
        self.reader.stop = True
        deadline = time.monotonic() + CLOSE_WAIT
        while self.reader.is_alive() and time.monotonic() < deadline:
            try:
                self.reader.chunks.get(timeout=0.1)
            except queue.Empty:
                pass


def open_input(source: IO[bytes], limit: int) -> LayerInput:
    """The layer input for `source`: `FileInput` for an uncompressed regular file, else
    `StreamInput` with the compression told from the first bytes."""
    fd: Optional[int] = None
    read_raw: Callable[[int], bytes]
    try:
        fd = source.fileno()
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            fd = None
    except (AttributeError, OSError, ValueError):
        fd = None
    if fd is not None:
        start = source.tell()
        head = os.pread(fd, 4, start)
        if not head.startswith(GZIP_MAGIC) and head != ZSTD_MAGIC:
            return FileInput(fd, start, limit)
        position = [start]

        def read_file(size: int) -> bytes:
            data = os.pread(fd, size, position[0])
            position[0] += len(data)
            return data

        read_raw = read_file

        first = b""
    else:
        read_raw = source.read
        first = b""
        while len(first) < 4:  # short reads from a pipe: enough to tell the compression
            more = source.read(CHUNK)
            if not more:
                break
            first += more
        head = first[:4]
    if head.startswith(GZIP_MAGIC):
        compression = "gzip"
    elif head == ZSTD_MAGIC:
        compression = "zstd"
    else:
        compression = "none"
    return StreamInput(read_raw, first, compression, limit)
