"""The referrers API: `/v2/<name>/referrers/<digest>`, an OCI index of the manifests whose
subject is the digest, filtered by `artifactType` (with `OCI-Filters-Applied`)."""

from __future__ import annotations

import asyncio
import json

from aiohttp import web

from dockyard.mediatypes import OCI_INDEX
from dockyard.registry import paths as p
from dockyard.registry.handlers import Context


class ReferrerHandlers:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    async def get(self, request: web.Request, params: dict[str, str]) -> web.StreamResponse:
        subject = p.parse_digest(params["digest"])
        descriptors = await asyncio.to_thread(
            self.ctx.registry.manifests.referrers, params["name"], subject
        )
        headers: dict[str, str] = {}
        artifact = request.query.get("artifactType")
        if artifact:
            descriptors = [d for d in descriptors if d.get("artifactType") == artifact]
            headers["OCI-Filters-Applied"] = "artifactType"
        body = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": descriptors}
        return web.Response(text=json.dumps(body), content_type=OCI_INDEX, headers=headers)

    # ---- background --------------------------------------------------------------------
