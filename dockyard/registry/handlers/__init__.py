"""The registry's HTTP handlers, one module per resource of the OCI Distribution Spec (blobs,
uploads, manifests, tags and catalog, referrers). A handler takes the request and the route's
parameters (the repository name already validated), calls the stores with validated values and
answers; it never builds a storage path and never catches a driver error (the stores translate
those, app.py turns the store's errors into answers)."""

from __future__ import annotations

import re
from collections.abc import Awaitable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Callable, Optional

from aiohttp import web

from dockyard.registry.notifications import Notifier
from dockyard.registry.store import Registry

Handler = Callable[[web.Request, dict[str, str]], Awaitable[web.StreamResponse]]


@dataclass
class Route:
    """A path pattern (its named groups are the handler's parameters) and a handler per method."""

    pattern: re.Pattern[str]
    methods: dict[str, Handler]
    # the route's template, as the metrics name it (never the raw path)
    template: str = ""


@dataclass
class Context:
    """What every handler works with: the stores, and the threads that read blobs for
        downloads (apart from the ones uploads and manifest writes run on; they only ever wait for
        the disk, never for a client), and the notifier that handlers give their events to once the
    action succeeded."""

    registry: Registry
    blob_reads: Executor
    # the notifications of events (None: no endpoint is configured)
    notifier: Optional[Notifier] = None
