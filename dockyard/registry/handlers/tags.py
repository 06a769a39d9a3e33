"""Listings: `_catalog` (every repository) and `tags/list` (a repository's tags), both paged
with `n` and `last` and a `Link` to the next page."""

from __future__ import annotations

import asyncio
import re
from typing import Optional
from urllib.parse import urlencode

from aiohttp import web

from dockyard.registry.connection import json_response
from dockyard.registry.errors import PaginationInvalid
from dockyard.registry.handlers import Context

# Catalog page size when the client gives no n, and the most it may ask for.
CATALOG_DEFAULT, CATALOG_MAX = 100, 1000
# Most tags one page may list.
TAGS_MAX = 10_000


def paginate(items: list[str], request: web.Request, default: Optional[int], cap: int) -> tuple:
    """Apply n/last pagination; returns (page, Link header or None)."""
    raw_n = request.query.get("n")
    last = request.query.get("last")
    if raw_n is None:
        n = default
    else:
        if not re.fullmatch(r"\d{1,9}", raw_n):
            raise PaginationInvalid({"n": raw_n[:50]})
        n = min(int(raw_n), cap)
    if n == 0:
        return [], None  # a Link to the same empty page would send a client round forever
    if last:
        items = [i for i in items if i > last]
    if n is None or len(items) <= n:
        return items[: n if n is not None else len(items)], None
    page = items[:n]
    query = urlencode({"n": n, "last": page[-1]}) if page else urlencode({"n": n})
    return page, f'<{request.path}?{query}>; rel="next"'


class ListingHandlers:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    async def catalog(self, request: web.Request, params: dict[str, str]) -> web.StreamResponse:
        repos = await asyncio.to_thread(self.ctx.registry.linked.catalog)
        page, link = paginate(repos, request, CATALOG_DEFAULT, CATALOG_MAX)
        return json_response({"repositories": page}, headers={"Link": link} if link else None)

    async def tags(self, request: web.Request, params: dict[str, str]) -> web.StreamResponse:
        name = params["name"]
        tags = await asyncio.to_thread(self.ctx.registry.manifests.tags, name)
        page, link = paginate(tags, request, None, TAGS_MAX)
        return json_response({"name": name, "tags": page}, headers={"Link": link} if link else None)
