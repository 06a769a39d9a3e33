"""Manifests by tag or digest: `GET`/`HEAD`, `PUT` (read whole, at most MANIFEST_MAX bytes,
validated and stored by the manifest store; `OCI-Subject` answered for a referrer) and
`DELETE`."""

from __future__ import annotations

import asyncio

from aiohttp import web

from dockyard.registry.errors import ManifestInvalid
from dockyard.registry.handlers import Context
from dockyard.registry.handlers.blobs import refuse_unless_delete_enabled
from dockyard.registry.manifeststore import MANIFEST_MAX
from dockyard.registry.notifications import delete_target, manifest_target
from dockyard.registry.transfer import read_body


class ManifestHandlers:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    async def get(self, request: web.Request, params: dict[str, str]) -> web.StreamResponse:
        digest, raw, media = await asyncio.to_thread(
            self.ctx.registry.manifests.get, params["name"], params["reference"]
        )
        headers = {
            "Docker-Content-Digest": str(digest),
            "ETag": f'"{digest}"',
            "Content-Type": media,
        }
        if self.ctx.notifier is not None:  # distribution: a HEAD is a pull too
            name, reference = params["name"], params["reference"]
            tag = "" if ":" in reference else reference
            target = manifest_target(request, name, str(digest), len(raw), media, tag)
            self.ctx.notifier.emit(request, "pull", target)
        if request.method == "HEAD":
            headers["Content-Length"] = str(len(raw))
            return web.Response(status=200, headers=headers)
        return web.Response(status=200, body=raw, headers=headers)

    async def put(self, request: web.Request, params: dict[str, str]) -> web.StreamResponse:
        name, reference = params["name"], params["reference"]
        raw = await read_body(request, MANIFEST_MAX, ManifestInvalid)
        digest, manifest = await asyncio.to_thread(
            self.ctx.registry.manifests.put, name, reference, raw, request.content_type
        )
        headers = {
            "Location": f"/v2/{name}/manifests/{digest}",
            "Docker-Content-Digest": str(digest),
        }
        if manifest.subject is not None:
            headers["OCI-Subject"] = str(manifest.subject)
        if self.ctx.notifier is not None:
            media = manifest.media_type or request.content_type
            tag = "" if ":" in reference else reference
            target = manifest_target(request, name, str(digest), len(raw), media, tag)
            self.ctx.notifier.emit(request, "push", target)
        return web.Response(status=201, headers=headers)

    async def delete(self, request: web.Request, params: dict[str, str]) -> web.StreamResponse:
        refuse_unless_delete_enabled(self.ctx)
        name, reference = params["name"], params["reference"]
        await asyncio.to_thread(self.ctx.registry.manifests.delete, name, reference)
        if self.ctx.notifier is not None:
            # by digest: the manifest (digest and repository); by tag: the tag, as distribution
            # 3 tells a tag's deletion (repository and tag)
            if ":" in reference:
                target = delete_target(name, digest=reference)
            else:
                target = delete_target(name, tag=reference)
            self.ctx.notifier.emit(request, "delete", target)
        return web.Response(status=202)
