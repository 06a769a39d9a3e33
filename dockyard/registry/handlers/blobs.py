"""Blob downloads (`GET`/`HEAD` with `Range`) and deletion, per repository."""

from __future__ import annotations

import functools
import logging

from aiohttp import web

from dockyard.mediatypes import OCTET_STREAM
from dockyard.registry import paths as p
from dockyard.registry.download import send_blob
from dockyard.registry.errors import Unsupported
from dockyard.registry.handlers import Context
from dockyard.registry.notifications import blob_target, delete_target
from dockyard.registry.transfer import byte_range

log = logging.getLogger("dockyard.registry")


def refuse_unless_delete_enabled(ctx: Context) -> None:
    if not ctx.registry.delete_enabled:
        raise Unsupported(message="deletion is disabled (storage.delete.enabled)")


class BlobHandlers:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    async def get(self, request: web.Request, params: dict[str, str]) -> web.StreamResponse:
        registry = self.ctx.registry
        name, digest = params["name"], p.parse_digest(params["digest"])
        size = registry.linked.repo_blob_size(name, digest)
        headers = {
            "Docker-Content-Digest": str(digest),
            "ETag": f'"{digest}"',
            "Content-Type": OCTET_STREAM,
            "Accept-Ranges": "bytes",
            "Cache-Control": "max-age=31536000",
        }
        wanted = byte_range(request.headers.get("Range"), size)
        start, end = wanted if wanted else (0, size - 1)
        length = end - start + 1 if size else 0
        status = 206 if wanted else 200
        if wanted:
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        if request.method == "HEAD":
            headers["Content-Length"] = str(length)
            self._pulled(request, name, str(digest), size)  # distribution: HEAD is a pull too
            return web.Response(status=status, headers=headers)
        response = web.StreamResponse(status=status, headers=headers)
        response.content_length = length
        await response.prepare(request)
        try:
            if length:
                blob = functools.partial(registry.blobs.open, digest)
                await send_blob(request, response, blob, start, length, self.ctx.blob_reads)
            await response.write_eof()
            self._pulled(request, name, str(digest), size)
        except (ConnectionError, BrokenPipeError) as exc:
            # The client went away mid-download: nothing to answer, close the connection.
            log.info("download of %s cut short: %s", digest, exc)
            if request.transport is not None:
                request.transport.close()
        return response

    def _pulled(self, request: web.Request, name: str, digest: str, size: int) -> None:
        if self.ctx.notifier is not None:
            self.ctx.notifier.emit(request, "pull", blob_target(request, name, digest, size))

    async def delete(self, request: web.Request, params: dict[str, str]) -> web.StreamResponse:
        refuse_unless_delete_enabled(self.ctx)
        digest = p.parse_digest(params["digest"])
        self.ctx.registry.linked.unlink_blob(params["name"], digest)
        if self.ctx.notifier is not None:
            self.ctx.notifier.emit(request, "delete", delete_target(params["name"], str(digest)))
        return web.Response(status=202, headers={"Docker-Content-Digest": str(digest)})
