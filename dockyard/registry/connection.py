"""The registry's aiohttp plumbing below the handlers: the connection class that answers the
errors aiohttp makes by itself (its HTTP parser's, an exception no handler caught) with the
registry's JSON error, the runner that uses it and never decompresses a request body, and the
one function that turns a registry error into its HTTP answer (status from errors.py's table)."""

from __future__ import annotations

from typing import Any, Optional

from aiohttp import web
from aiohttp.web_request import BaseRequest

from dockyard.registry.errors import (
    RangeNotSatisfiable,
    RegistryError,
    TooManyRequests,
    Unauthorized,
    error_for_status,
    status_for,
)

# The header every answer carries: the registry speaks distribution's API v2.
API_VERSION = ("Docker-Distribution-Api-Version", "registry/2.0")


def json_response(
    body: Any, status: int = 200, headers: Optional[dict[str, str]] = None
) -> web.Response:
    return web.json_response(body, status=status, headers=headers)


def error_response(error: RegistryError) -> web.Response:
    """The HTTP answer to a registry error: its status from ERROR_STATUS, the spec's JSON body
    and the headers the error's kind asks for."""
    status = status_for(error)
    headers = {}
    if isinstance(error, Unauthorized) and error.detail and "realm" in error.detail:
        headers["WWW-Authenticate"] = f'Basic realm="{error.detail["realm"]}"'
    if isinstance(error, RangeNotSatisfiable) and error.detail and "size" in error.detail:
        headers["Content-Range"] = f"bytes */{error.detail['size']}"  # RFC 9110, 15.5.17
    if isinstance(error, TooManyRequests) and error.detail and "retry_after" in error.detail:
        headers["Retry-After"] = str(error.detail["retry_after"])
    return json_response(error.body(), status=status, headers=headers)


class Connection(web.RequestHandler):
    """aiohttp's handler of one client connection, answering the errors aiohttp makes without
    any handler or middleware seeing the request (a request line or header its HTTP parser
    refuses, an exception no handler caught) with the registry's JSON error, as all others."""

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: Optional[BaseException] = None,
        message: Optional[str] = None,
    ) -> web.StreamResponse:
        # aiohttp's own logs the error, and raises ConnectionError once an answer has started
        super().handle_error(request, status, exc, message)
        response = error_response(error_for_status(status, message if status < 500 else None))
        response.headers[API_VERSION[0]] = API_VERSION[1]
        response.force_close()
        return response

    def refuse_body(self) -> None:
        """The rest of the current request's body will not be read: once the answer is out the
        connection closes, without aiohttp's lingering read of what is left (lingering_time)."""
        self._lingering_time = 0.0


class _Server(web.Server):
    """aiohttp's protocol factory, making `Connection`s."""

    def __call__(self) -> web.RequestHandler:
        return Connection(self, loop=self._loop, **self._kwargs)


class Runner(web.AppRunner):
    """web.AppRunner whose connections answer aiohttp's own errors as the registry's (see
    Connection) and never decompress a request body (`Content-Encoding: gzip` included: a
    registry stores and hashes the bytes it is sent, as distribution does). aiohttp has no
    setting for the connection class (handler_args are only its keyword arguments, and
    request_factory and middlewares never see what the parser refused), so the server the
    runner made is turned into a _Server: the same object, one more method."""

    def __init__(self, app: web.Application, **kwargs: Any) -> None:
        super().__init__(app, auto_decompress=False, **kwargs)

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _Server
        return server
