"""A small threaded HTTP server for replq's WSGI apps (the metrics exporter, the web GUI).

The standard library's wsgiref server, one thread per request, quiet (no access log on stderr),
on IPv4 or IPv6 by the form of the address.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Any]


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass


def wsgi_server(app: WsgiApp, address: str, port: int) -> WSGIServer:
    """Bound and listening (port 0 picks a free one: `server.server_port`); serve_forever() serves."""

    class Server(ThreadingMixIn, WSGIServer):
        daemon_threads = True
        address_family = socket.AF_INET6 if ":" in address else socket.AF_INET

    return make_server(address, port, app, Server, handler_class=_QuietHandler)


def serve(app: WsgiApp, address: str, port: int, ready: Callable[[str, int], None] | None = None) -> None:
    """Serve until killed; `ready(address, port)` once listening."""
    httpd = wsgi_server(app, address, port)
    if ready is not None:
        ready(address, httpd.server_port)
    try:
        httpd.serve_forever()
    finally:
        httpd.server_close()
