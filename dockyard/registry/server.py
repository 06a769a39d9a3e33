"""Run the registry: TLS context (1.2 minimum, optional client certificates), logging, and the
aiohttp server on `http.addr`."""

from __future__ import annotations

import logging
import ssl
import sys
from typing import Optional

from aiohttp import web

from dockyard.registry.app import RegistryApp
from dockyard.registry.config import RegistryConfig

_LEVELS = {
    "error": logging.ERROR,
    "warn": logging.WARNING,
    "info": logging.INFO,
    "debug": logging.DEBUG,
}


def tls_context(config: RegistryConfig) -> Optional[ssl.SSLContext]:
    """Server TLS context: never below TLS 1.2; client certificates required with clientcas."""
    if config.tls is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = (
        ssl.TLSVersion.TLSv1_3 if config.tls.minimum == "tls1.3" else ssl.TLSVersion.TLSv1_2
    )
    context.load_cert_chain(config.tls.certificate, config.tls.key)
    if config.tls.clientcas:
        for ca in config.tls.clientcas:
            context.load_verify_locations(cafile=ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def serve(config: RegistryConfig) -> None:
    logging.basicConfig(
        level=_LEVELS[config.log_level],
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    app = RegistryApp(config).build()
    host, port = config.host_port
    scheme = "https" if config.tls else "http"
    logging.getLogger("dockyard.registry").warning(
        "listening on %s://%s:%d, storage %s", scheme, host, port, config.rootdirectory
    )
    web.run_app(
        app,
        host=host,
        port=port,
        ssl_context=tls_context(config),
        print=None,
        access_log=None,
        handle_signals=True,
    )
