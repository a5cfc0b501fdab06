"""A real HTTP server standing in for a CRM: the stdlib's ThreadingHTTPServer on 127.0.0.1 in its own thread.
It answers GET /customers?email=ADDRESS (or /domains/DOMAIN) with JSON from `customers`, 404 for others, and
records every request (path and headers). It can be told to be slow, to fail with an HTTP status, to answer
something that is not JSON, and to run a check of the caller's choosing while a request is in hand."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit


@dataclass(frozen=True)
class Request:
    path: str
    headers: dict[str, str]


@dataclass
class CrmServer:
    customers: dict[str, Any] = field(default_factory=dict)  # by address or domain (lower-case)
    everyone: Callable[[str], Any] | None = None  # the answer for a key not in `customers` (default: 404)
    delay_seconds: float = 0.0
    status: int = 200  # anything else: every request fails with it
    body: bytes | None = None  # answer these bytes instead of the customer's JSON
    during_request: Callable[[], None] | None = None
    listen_port: int = 0  # 0: any free port; a given one to come back on after an outage
    requests: list[Request] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.server_address[1])

    def url(self, template: str = "/customers?email={address}") -> str:
        return f"http://127.0.0.1:{self.port}{template}"

    def start(self) -> CrmServer:
        crm = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as a real CRM behind a proxy would

            def do_GET(self) -> None:
                crm.requests.append(Request(self.path, {k.lower(): v for k, v in self.headers.items()}))
                if crm.during_request is not None:
                    crm.during_request()
                if crm.delay_seconds:
                    time.sleep(crm.delay_seconds)
                if crm.status != 200:
                    self._send(crm.status, b'{"error": "unavailable"}')
                    return
                if crm.body is not None:
                    self._send(200, crm.body)
                    return
                parts = urlsplit(self.path)
                key = parse_qs(parts.query).get("email", [""])[0] or unquote(parts.path.rpartition("/")[2])
                customer = crm.customers.get(key.lower())
                if customer is None and crm.everyone is not None:
                    customer = crm.everyone(key.lower())
                if customer is None:
                    self._send(404, b'{"error": "not found"}')
                else:
                    self._send(200, json.dumps(customer).encode())

            def _send(self, status: int, body: bytes) -> None:
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up waiting (its timeout)
                    pass

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = _Server(("127.0.0.1", self.listen_port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="crm-server", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


class _Server(ThreadingHTTPServer):
    request_queue_size = 128  # the default 5 would leave a batch's concurrent lookups waiting to be accepted


@contextmanager
def crm_server(**options: Any) -> Iterator[CrmServer]:
    server = CrmServer(**options).start()
    try:
        yield server
    finally:
        server.stop()
