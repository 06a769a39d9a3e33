"""Blob uploads: start (monolithic with `?digest=`, or cross-repository mount with `?mount=`
and `from=`, falling back to a new upload), status, streamed or chunked `PATCH`, closing `PUT`
and cancel. The bodies are streamed by transfer.py into the upload store."""

from __future__ import annotations

import asyncio

from aiohttp import web

from dockyard.registry import paths as p
from dockyard.registry.handlers import Context
from dockyard.registry.notifications import blob_target
from dockyard.registry.transfer import content_range, digest_param, stream_into


class UploadHandlers:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def _upload_headers(self, name: str, upload_id: str, size: int) -> dict[str, str]:
        return {
            "Location": f"/v2/{name}/blobs/uploads/{upload_id}",
            "Range": f"0-{max(size - 1, 0)}",
            "Docker-Upload-UUID": upload_id,
        }

    async def start(self, request: web.Request, params: dict[str, str]) -> web.StreamResponse:
        name = params["name"]
        mount, source = request.query.get("mount"), request.query.get("from")
        if mount is not None:
            digest = p.parse_digest(mount)
            if source is not None:
                p.validate_name(source)
                if self.ctx.registry.linked.mount_blob(name, source, digest):
                    if self.ctx.notifier is not None:
                        size = self.ctx.registry.linked.repo_blob_size(name, digest)
                        target = blob_target(request, name, str(digest), size, source)
                        self.ctx.notifier.emit(request, "mount", target)
                    return self._created(name, digest)
        status = self.ctx.registry.uploads.start(name)
        if "digest" in request.query:
            digest = digest_param(request.query.get("digest"))
            await stream_into(request, self.ctx.registry.uploads, name, status.upload_id)
            await self._finish(request, name, status.upload_id, digest)
            return self._created(name, digest)
        return web.Response(status=202, headers=self._upload_headers(name, status.upload_id, 0))

    def _created(self, name: str, digest: p.Digest) -> web.Response:
        return web.Response(
            status=201,
            headers={
                "Location": f"/v2/{name}/blobs/{digest}",
                "Docker-Content-Digest": str(digest),
            },
        )

    async def status(self, request: web.Request, params: dict[str, str]) -> web.StreamResponse:
        p.validate_upload_id(params["upload"])
        status = self.ctx.registry.uploads.status(params["name"], params["upload"])
        return web.Response(
            status=204, headers=self._upload_headers(status.name, status.upload_id, status.size)
        )

    async def patch(self, request: web.Request, params: dict[str, str]) -> web.StreamResponse:
        name, upload_id = params["name"], p.validate_upload_id(params["upload"])
        start, end = content_range(request.headers.get("Content-Range"))
        size = await stream_into(request, self.ctx.registry.uploads, name, upload_id, start, end)
        return web.Response(status=202, headers=self._upload_headers(name, upload_id, size))

    async def put(self, request: web.Request, params: dict[str, str]) -> web.StreamResponse:
        name, upload_id = params["name"], p.validate_upload_id(params["upload"])
        digest = digest_param(request.query.get("digest"))
        if request.can_read_body:
            start, end = content_range(request.headers.get("Content-Range"))
            await stream_into(request, self.ctx.registry.uploads, name, upload_id, start, end)
        await self._finish(request, name, upload_id, digest)
        return self._created(name, digest)

    async def _finish(
        self, request: web.Request, name: str, upload_id: str, digest: p.Digest
    ) -> None:
        """Commit the upload; with notifications, a push event (the blob's size read in the
        same thread hop)."""
        registry, notifier = self.ctx.registry, self.ctx.notifier

        def finish() -> int:
            registry.uploads.finish(name, upload_id, digest)
            return registry.blobs.size(digest) if notifier is not None else 0

        size = await asyncio.to_thread(finish)
        if notifier is not None:
            notifier.emit(request, "push", blob_target(request, name, str(digest), size))

    async def cancel(self, request: web.Request, params: dict[str, str]) -> web.StreamResponse:
        upload_id = p.validate_upload_id(params["upload"])
        self.ctx.registry.uploads.cancel(params["name"], upload_id)
        return web.Response(status=204)
