"""A local OAuth2 authorization server for the tests: token endpoint, device-code flow and token introspection.

It speaks enough of both dialects that the real clients work against it unchanged:
- Microsoft's, as msal expects it: `/{tenant}/v2.0/.well-known/openid-configuration`,
  `/{tenant}/oauth2/v2.0/token` and `/{tenant}/oauth2/v2.0/devicecode` (id_token and client_info included,
  so msal keeps an account in its cache);
- Google's: `/token` and `/device/code`.
Clients reach it over HTTPS (msal accepts no other scheme) with a private test CA; Dovecot's oauth2 passdb
and the SMTP sink ask `/introspect` (RFC 7662, form `token=…`) on a second, plain-HTTP port on 127.0.0.1.

Access tokens live `access_seconds` (what the response says); `valid_seconds` may make the server forget them
sooner than it said, like a revocation the client cannot know about.
"""

from __future__ import annotations

import base64
import json
import secrets
import ssl
import threading
import time
import urllib.parse
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tests.support.dovecot import TlsFiles, generate_tls_files

HOST = "127.0.0.1"
TENANT = "contoso-test"
DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"


@dataclass
class Client:
    secret: str | None
    app_user: str | None = None  # client credentials: the mailbox this app was granted (like Exchange's RBAC)


@dataclass
class Issued:
    user: str
    client_id: str
    expires_at: float


@dataclass
class _State:
    clients: dict[str, Client] = field(default_factory=dict)
    refresh_tokens: dict[str, Issued] = field(default_factory=dict)  # token -> user (expires_at unused)
    access_tokens: dict[str, Issued] = field(default_factory=dict)
    devices: dict[str, dict[str, Any]] = field(default_factory=dict)  # device_code -> state
    grants: Counter[str] = field(default_factory=Counter)  # grant type -> tokens issued
    introspected: list[tuple[str, bool]] = field(default_factory=list)  # (user or "", active)
    access_seconds: float = 3600.0
    valid_seconds: float | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


class OAuthServer:
    def __init__(self, directory: Path) -> None:
        self.state = _State()
        self.tls: TlsFiles = generate_tls_files(directory / "oauth-tls", common_name="mailbridge test OAuth CA")
        handler = _handler(self.state)
        self._https = ThreadingHTTPServer((HOST, 0), handler)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(str(self.tls.cert_file), str(self.tls.key_file))
        self._https.socket = context.wrap_socket(self._https.socket, server_side=True)
        self._http = ThreadingHTTPServer((HOST, 0), handler)
        self._threads = [
            threading.Thread(target=server.serve_forever, daemon=True, kwargs={"poll_interval": 0.05})
            for server in (self._https, self._http)
        ]

    def start(self) -> OAuthServer:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        for server in (self._https, self._http):
            server.shutdown()
            server.server_close()

    # ---------------------------------------------------------------------------------------- addresses

    @property
    def base_url(self) -> str:
        return f"https://{HOST}:{self._https.server_address[1]}"

    @property
    def authority(self) -> str:
        return f"{self.base_url}/{TENANT}"

    @property
    def token_url(self) -> str:
        return f"{self.base_url}/token"

    @property
    def device_url(self) -> str:
        return f"{self.base_url}/device/code"

    @property
    def introspection_url(self) -> str:
        return f"http://{HOST}:{self._http.server_address[1]}/introspect"

    @property
    def ca_file(self) -> Path:
        return self.tls.ca_file

    # ------------------------------------------------------------------------------------ what tests do

    def add_client(self, client_id: str, secret: str | None = None, *, app_user: str | None = None) -> None:
        with self.state.lock:
            self.state.clients[client_id] = Client(secret, app_user)

    def grant_refresh_token(self, user: str, client_id: str) -> str:
        """A refresh token as a user's consent would have produced it."""
        token = "rt-" + secrets.token_urlsafe(16)
        with self.state.lock:
            self.state.refresh_tokens[token] = Issued(user, client_id, float("inf"))
        return token

    def revoke_refresh_tokens(self, user: str) -> None:
        with self.state.lock:
            for token in [t for t, issued in self.state.refresh_tokens.items() if issued.user == user]:
                del self.state.refresh_tokens[token]

    def set_lifetimes(self, access_seconds: float, valid_seconds: float | None = None) -> None:
        """Tokens issued from now on: their stated lifetime, and how long the server really accepts them."""
        with self.state.lock:
            self.state.access_seconds = access_seconds
            self.state.valid_seconds = valid_seconds

    def approve_device_logins(self, user: str) -> None:
        """Every pending and future device login is approved for `user` (as if they typed the code)."""
        with self.state.lock:
            self.state.devices["*"] = {"user": user}

    def issued(self, grant: str) -> int:
        with self.state.lock:
            return self.state.grants[grant]

    @property
    def introspections(self) -> list[tuple[str, bool]]:
        with self.state.lock:
            return list(self.state.introspected)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _handler(state: _State) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # quiet: pytest shows failures
            return

        def _reply(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(data)

        def _form(self) -> dict[str, str]:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length).decode()
            return {k: v[0] for k, v in urllib.parse.parse_qs(body).items()}

        def do_GET(self) -> None:
            path = urllib.parse.urlsplit(self.path).path
            if path == f"/{TENANT}/v2.0/.well-known/openid-configuration":
                base = f"https://{self.headers['Host']}/{TENANT}"
                self._reply(
                    200,
                    {
                        "issuer": f"{base}/v2.0",
                        "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
                        "token_endpoint": f"{base}/oauth2/v2.0/token",
                        "device_authorization_endpoint": f"{base}/oauth2/v2.0/devicecode",
                    },
                )
                return
            self._reply(404, {"error": "not_found"})

        def do_POST(self) -> None:
            path = urllib.parse.urlsplit(self.path).path
            form = self._form()
            if path == "/introspect":
                self._reply(200, self._introspect(form.get("token", "")))
            elif path in (f"/{TENANT}/oauth2/v2.0/token", "/token"):
                status, body = self._token(form, microsoft=path != "/token")
                self._reply(status, body)
            elif path in (f"/{TENANT}/oauth2/v2.0/devicecode", "/device/code"):
                self._reply(*self._device_code(form))
            else:
                self._reply(404, {"error": "not_found"})

        def _introspect(self, token: str) -> dict[str, Any]:
            with state.lock:
                issued = state.access_tokens.get(token)
                active = issued is not None and issued.expires_at > time.time()
                state.introspected.append((issued.user if issued else "", active))
            if not active or issued is None:
                return {"active": False}
            return {"active": True, "username": issued.user, "client_id": issued.client_id}

        def _client(self, form: dict[str, str], *, need_secret: bool) -> Client | None:
            client = state.clients.get(form.get("client_id", ""))
            if client is None:
                return None
            if (need_secret or client.secret is not None) and form.get("client_secret") != client.secret:
                return None
            return client

        def _token(self, form: dict[str, str], *, microsoft: bool) -> tuple[int, dict[str, Any]]:
            grant = form.get("grant_type", "")
            with state.lock:
                client = self._client(form, need_secret=grant == "client_credentials")
                if client is None:
                    return 401, {"error": "invalid_client", "error_description": "unknown client or wrong secret"}
                client_id = form["client_id"]
                refresh: str | None = None
                if grant == "client_credentials":
                    if client.app_user is None:
                        return 400, {"error": "unauthorized_client", "error_description": "no app access granted"}
                    user = client.app_user
                elif grant == "refresh_token":
                    issued = state.refresh_tokens.get(form.get("refresh_token", ""))
                    if issued is None or issued.client_id != client_id:
                        return 400, {
                            "error": "invalid_grant",
                            "error_description": "AADSTS70008: The refresh token has been revoked or has expired.",
                        }
                    user, refresh = issued.user, form["refresh_token"]
                elif grant in (DEVICE_GRANT, "device_code"):
                    device = state.devices.get(form.get("device_code", ""))
                    if device is None:
                        return 400, {"error": "expired_token", "error_description": "unknown device code"}
                    device["polls"] += 1
                    approved = state.devices.get("*")
                    if approved is None or device["polls"] < 2:  # the first poll is always too early
                        return 400, {"error": "authorization_pending", "error_description": "waiting for the user"}
                    user = approved["user"]
                    del state.devices[form["device_code"]]
                    refresh = "rt-" + secrets.token_urlsafe(16)
                    state.refresh_tokens[refresh] = Issued(user, client_id, float("inf"))
                else:
                    return 400, {"error": "unsupported_grant_type", "error_description": grant}
                access = "at-" + secrets.token_urlsafe(24)
                now = time.time()
                valid = state.valid_seconds if state.valid_seconds is not None else state.access_seconds
                state.access_tokens[access] = Issued(user, client_id, now + valid)
                state.grants["device_code" if grant == DEVICE_GRANT else grant] += 1
                body: dict[str, Any] = {
                    "token_type": "Bearer",
                    "access_token": access,
                    "expires_in": int(state.access_seconds),
                    "scope": form.get("scope", ""),
                }
            if refresh is not None:
                body["refresh_token"] = refresh
                if microsoft:
                    body.update(_identity(self.headers["Host"], client_id, user, now))
            return 200, body

        def _device_code(self, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
            with state.lock:
                if form.get("client_id", "") not in state.clients:
                    return 400, {"error": "invalid_client", "error_description": "unknown client"}
                device_code, user_code = secrets.token_urlsafe(16), secrets.token_hex(4).upper()
                state.devices[device_code] = {"polls": 0}
            url = f"https://{self.headers['Host']}/device"
            return 200, {
                "device_code": device_code,
                "user_code": user_code,
                "verification_uri": url,
                "verification_url": url,  # Google's spelling
                "expires_in": 60,
                "interval": 1,
                "message": f"To sign in, open {url} and enter the code {user_code}.",
            }

    return Handler


def _identity(host: str, client_id: str, user: str, now: float) -> dict[str, str]:
    """What Microsoft adds to a delegated token response: msal builds its cached account from these."""
    oid, tid = f"oid-{user}", "tid-" + TENANT
    claims = {
        "iss": f"https://{host}/{TENANT}/v2.0",
        "sub": f"sub-{user}",
        "aud": client_id,
        "iat": int(now),
        "exp": int(now) + 3600,
        "oid": oid,
        "tid": tid,
        "preferred_username": user,
    }
    id_token = ".".join(
        [_b64url(json.dumps({"alg": "none", "typ": "JWT"}).encode()), _b64url(json.dumps(claims).encode()), ""]
    )
    return {"id_token": id_token, "client_info": _b64url(json.dumps({"uid": oid, "utid": tid}).encode())}
