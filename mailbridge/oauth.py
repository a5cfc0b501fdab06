"""OAuth2 access tokens for XOAUTH2 logins (IMAP and SMTP): Microsoft through msal, Google's token endpoint over
HTTP (aiohttp).

A token is handed out from the cache while it has more than `refresh_margin_seconds` left and renewed
otherwise; `force_refresh` renews it at once (a server refused it). The refresh token and the current access
token live only in `token_cache` (mode 0600, written whole); the daemon and its outbox process share that file
under an exclusive lock, so one of them refreshes and the other reads the result. No token or secret is ever
put into a log line or an error message.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import json
import logging
import os
import ssl
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from mailbridge.config import MICROSOFT_AUTHORITY, OAuth2Settings

log = logging.getLogger("mailbridge.oauth")

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
# Errors that mean the user's consent is gone (revoked, expired, password changed): only a new login helps.
_CONSENT_GONE = {"invalid_grant", "interaction_required", "consent_required"}


class OAuthError(Exception):
    """No token to be had; the message names the mailbox, the reason and what to do."""


class TokenEndpointError(OAuthError):
    """The authority could not be reached or failed on its side: worth another try soon, unlike a refusal."""


@dataclass(frozen=True, slots=True)
class AccessToken:
    value: str = field(repr=False)
    expires_at: float  # time.time() seconds


def sasl_initial_response(mechanism: str, user: str, token: str, host: str, port: int) -> str:
    """The base64 initial response of AUTHENTICATE / AUTH: XOAUTH2 (Google's and Microsoft's format) or
    OAUTHBEARER (RFC 7628: a GS2 header naming the user, then host, port and the bearer token)."""
    if mechanism == "oauthbearer":
        authzid = user.replace("=", "=3D").replace(",", "=2C")  # RFC 5801 saslname
        text = f"n,a={authzid},\x01host={host}\x01port={port}\x01auth=Bearer {token}\x01\x01"
    else:
        text = f"user={user}\x01auth=Bearer {token}\x01\x01"
    return base64.b64encode(text.encode()).decode("ascii")


# What a client answers to the server's error challenge before the server says NO / 535: XOAUTH2 an empty
# line, OAUTHBEARER a single %x01 (RFC 7628 3.2.3), base64-encoded.
SASL_ERROR_ACK = {"xoauth2": "", "oauthbearer": base64.b64encode(b"\x01").decode("ascii")}


class TokenSource(Protocol):
    async def token(self, *, force_refresh: bool = False) -> AccessToken: ...


class TokenSources:
    """One source per account and client in a process, shared by the mailbox's IMAP and SMTP logins."""

    def __init__(self) -> None:
        self._sources: dict[tuple[object, ...], TokenSource] = {}

    def get(self, oauth: OAuth2Settings, user: str, mailbox: str) -> TokenSource:
        key: tuple[object, ...] = (oauth.provider, oauth.flow, oauth.authority, oauth.token_url, oauth.client_id)
        key += (oauth.token_cache, user)
        key += tuple(oauth.scopes or ())
        if key not in self._sources:
            kind = MicrosoftTokens if oauth.provider == "microsoft" else GoogleTokens
            self._sources[key] = kind(oauth, user, mailbox)
        return self._sources[key]


class _CacheFile:
    """The token cache on disk, read and rewritten under an exclusive lock (flock on a `.lock` file beside it)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def lock(self) -> int:
        """Blocks until this process holds the lock; returns the descriptor to pass to `unlock`."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        descriptor = os.open(self.path.with_name(self.path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
        except BaseException:
            os.close(descriptor)
            raise
        return descriptor

    def unlock(self, descriptor: int) -> None:
        os.close(descriptor)  # closing releases the lock

    @contextlib.contextmanager
    def locked(self) -> Iterator[_CacheFile]:
        descriptor = self.lock()
        try:
            yield self
        finally:
            self.unlock(descriptor)

    def read(self) -> str | None:
        try:
            return self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None

    def write(self, text: str) -> None:
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        descriptor = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o600)  # an older file of another mode must not lend it its permissions
        os.replace(tmp, self.path)


def _refused(mailbox: str, provider: str, body: dict[str, Any]) -> OAuthError:
    error = str(body.get("error") or "unknown_error")
    # Microsoft's descriptions carry trace and correlation ids on further lines; the first line says it.
    description = str(body.get("error_description") or "").strip().splitlines()
    reason = f"{error}: {description[0]}" if description else error
    if error in _CONSENT_GONE:
        return OAuthError(
            f"mailbox {mailbox}: {provider} refused the refresh token ({reason}); "
            f"sign in again with `mailbridge auth login {mailbox}`"
        )
    if error in ("invalid_client", "unauthorized_client"):
        return OAuthError(f"mailbox {mailbox}: {provider} refused the client ({reason}); check client_id and secret")
    if error in ("temporarily_unavailable", "server_error"):
        return TokenEndpointError(f"mailbox {mailbox}: {provider} gave no token for now ({reason})")
    return OAuthError(f"mailbox {mailbox}: {provider} gave no token ({reason})")


def _access_token(body: dict[str, Any], mailbox: str, provider: str) -> AccessToken:
    if "access_token" not in body:
        raise _refused(mailbox, provider, body)
    return AccessToken(str(body["access_token"]), time.time() + float(body.get("expires_in") or 0))


class MicrosoftTokens:
    """msal: app-only (client credentials) or delegated (the refresh token from `auth login`)."""

    def __init__(self, oauth: OAuth2Settings, user: str, mailbox: str) -> None:
        import msal

        self.oauth, self.user, self.mailbox = oauth, user, mailbox
        self.cache = msal.SerializableTokenCache()
        self._file = _CacheFile(oauth.token_cache) if oauth.token_cache else None
        self._app: Any = None
        self._lock = asyncio.Lock()

    async def token(self, *, force_refresh: bool = False) -> AccessToken:
        async with self._lock:  # msal is synchronous (requests): on a thread, one request at a time
            return await asyncio.to_thread(self._acquire, force_refresh)

    def application(self) -> Any:
        """Built on first use: msal reads the authority's OpenID configuration over the network."""
        if self._app is None:
            import msal

            oauth = self.oauth
            assert oauth.authority is not None
            options: dict[str, Any] = {"authority": oauth.authority, "token_cache": self.cache}
            options["timeout"] = oauth.timeout
            if oauth.ca_file is not None:
                options["http_client"] = _session_trusting(oauth.ca_file, oauth.timeout)
            if not oauth.authority.startswith(MICROSOFT_AUTHORITY + "/"):
                # A sovereign cloud or a test authority: msal's instance discovery asks Microsoft's public
                # cloud about it; the operator named it on purpose.
                options["instance_discovery"] = False
            try:
                if oauth.secret is not None:
                    self._app = msal.ConfidentialClientApplication(
                        oauth.client_id, client_credential=oauth.secret, **options
                    )
                else:
                    self._app = msal.PublicClientApplication(oauth.client_id, **options)
            except (OSError, ValueError) as exc:  # requests' errors are OSErrors
                raise TokenEndpointError(
                    f"mailbox {self.mailbox}: cannot use the Microsoft authority {oauth.authority}: "
                    f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                ) from None
        return self._app

    @contextlib.contextmanager
    def cached(self) -> Iterator[None]:
        """The token cache as the file has it now, written back if msal changed it."""
        if self._file is None:
            yield
            return
        with self._file.locked() as file:
            text = file.read()
            if text:
                self.cache.deserialize(text)
            yield
            if self.cache.has_state_changed:
                file.write(self.cache.serialize())
                self.cache.has_state_changed = False

    def _acquire(self, force_refresh: bool) -> AccessToken:
        with self.cached():
            app = self.application()
            result = self._request(app, force_refresh)
            token = _access_token(result, self.mailbox, "Microsoft")
            if not force_refresh and token.expires_at - time.time() < self.oauth.refresh_margin_seconds:
                # msal renews on its own only in the last 5 minutes; our margin may be wider.
                token = _access_token(self._request(app, True), self.mailbox, "Microsoft")
        return token

    def _request(self, app: Any, force_refresh: bool) -> dict[str, Any]:
        scopes = list(self.oauth.scopes or ())
        try:
            if self.oauth.flow == "client_credentials":
                if force_refresh:
                    app.remove_tokens_for_client()
                return dict(app.acquire_token_for_client(scopes))
            accounts = app.get_accounts(username=self.user)
            if not accounts:
                raise OAuthError(
                    f"mailbox {self.mailbox}: no sign-in of {self.user} in {self.oauth.token_cache}; "
                    f"run `mailbridge auth login {self.mailbox}` once"
                )
            result = app.acquire_token_silent_with_error(scopes, accounts[0], force_refresh=force_refresh)
        except (OSError, ValueError) as exc:
            raise TokenEndpointError(
                f"mailbox {self.mailbox}: the Microsoft token endpoint failed: {type(exc).__name__}"
            ) from None
        if result is None:
            raise OAuthError(
                f"mailbox {self.mailbox}: no refresh token for {self.user} in {self.oauth.token_cache}; "
                f"run `mailbridge auth login {self.mailbox}`"
            )
        return dict(result)

    def device_login(self, say: Callable[[str], None]) -> str:
        """The one-time consent (device-code flow); returns the account that signed in."""
        with self.cached():
            app = self.application()
            if self.oauth.flow == "client_credentials":
                token = _access_token(self._request(app, True), self.mailbox, "Microsoft")
                say(f"app-only access works: a token valid for {token.expires_at - time.time():.0f} s was issued")
                return self.user
            flow = app.initiate_device_flow(scopes=list(self.oauth.scopes or ()))
            if "user_code" not in flow:
                raise _refused(self.mailbox, "Microsoft", flow)
            say(str(flow["message"]))
            result = app.acquire_token_by_device_flow(flow)
            if "access_token" not in result:
                raise _refused(self.mailbox, "Microsoft", result)
            signed_in = str((result.get("id_token_claims") or {}).get("preferred_username") or "")
            if signed_in.lower() != self.user.lower():
                self.cache.has_state_changed = False  # keep the cache as it was
                raise OAuthError(
                    f"mailbox {self.mailbox}: signed in as {signed_in or 'an unknown account'}, but the mailbox "
                    f"user is {self.user}; nothing was stored"
                )
        return signed_in


def _session_trusting(ca_file: Path, timeout: float) -> Any:
    """A requests session for msal that trusts `ca_file`. Set on the session alone, the CA would lose to
    REQUESTS_CA_BUNDLE in the environment (psf/requests#3829); given with each request, it wins."""
    import requests

    class Session(requests.Session):
        def request(self, method: str, url: str | bytes, *args: Any, **kwargs: Any) -> requests.Response:
            kwargs.setdefault("verify", str(ca_file))
            kwargs.setdefault("timeout", timeout)
            return super().request(method, url, *args, **kwargs)

    return Session()


class GoogleTokens:
    """Google: the refresh token from `auth login`, exchanged at the token endpoint for access tokens."""

    def __init__(self, oauth: OAuth2Settings, user: str, mailbox: str) -> None:
        assert oauth.token_cache is not None and oauth.secret is not None
        self.oauth, self.user, self.mailbox = oauth, user, mailbox
        self._file = _CacheFile(oauth.token_cache)
        self._lock = asyncio.Lock()

    async def token(self, *, force_refresh: bool = False) -> AccessToken:
        async with self._lock, self._locked() as state:
            cached = state.get("access_token")
            if cached and not force_refresh and state["expires_at"] - time.time() > self.oauth.refresh_margin_seconds:
                return AccessToken(cached, float(state["expires_at"]))
            if not state.get("refresh_token"):
                raise OAuthError(
                    f"mailbox {self.mailbox}: no refresh token in {self.oauth.token_cache}; "
                    f"run `mailbridge auth login {self.mailbox}` once"
                )
            _, body = await self._post(
                str(self.oauth.token_url),
                {
                    "grant_type": "refresh_token",
                    "refresh_token": state["refresh_token"],
                    "client_id": self.oauth.client_id,
                    "client_secret": self.oauth.secret or "",
                },
            )
            token = _access_token(body, self.mailbox, "Google")
            state.update(access_token=token.value, expires_at=token.expires_at)
            if body.get("refresh_token"):  # Google keeps the old one; a rotated one replaces it
                state["refresh_token"] = body["refresh_token"]
            return token

    @contextlib.asynccontextmanager
    async def _locked(self) -> AsyncIterator[dict[str, Any]]:
        """The cache's content under the file lock; written back (whole) when it changed."""
        descriptor = await asyncio.to_thread(self._file.lock)  # another process may hold it while refreshing
        try:
            text = self._file.read()
            try:
                state: dict[str, Any] = json.loads(text) if text else {}
            except ValueError:
                raise OAuthError(f"mailbox {self.mailbox}: {self.oauth.token_cache} is not a token cache") from None
            before = dict(state)
            yield state
            if state != before:
                self._file.write(json.dumps(state))
        finally:
            self._file.unlock(descriptor)

    async def _post(self, url: str, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        import aiohttp  # here: a second of start-up for every daemon that has no Google mailbox

        context = ssl.create_default_context(cafile=str(self.oauth.ca_file) if self.oauth.ca_file else None)
        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.oauth.timeout)) as session,
                session.post(url, data=form, ssl=context) as response,
            ):
                body = await response.json(content_type=None)
                return response.status, body if isinstance(body, dict) else {}
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise TokenEndpointError(
                f"mailbox {self.mailbox}: Google's token endpoint {url} failed: {type(exc).__name__}"
            ) from None

    async def device_login(self, say: Callable[[str], None]) -> str:
        """RFC 8628 device authorization against Google; stores the refresh token."""
        _, start = await self._post(
            str(self.oauth.device_url), {"client_id": self.oauth.client_id, "scope": " ".join(self.oauth.scopes or ())}
        )
        if "device_code" not in start:
            raise _refused(self.mailbox, "Google", start)
        url = start.get("verification_url") or start.get("verification_uri")
        say(f"To sign in as {self.user}, open {url} and enter the code {start['user_code']}")
        interval = float(start.get("interval") or 5)
        deadline = time.monotonic() + float(start.get("expires_in") or 900)
        while time.monotonic() < deadline:
            await asyncio.sleep(interval)
            _, body = await self._post(
                str(self.oauth.token_url),
                {
                    "grant_type": DEVICE_GRANT,
                    "device_code": start["device_code"],
                    "client_id": self.oauth.client_id,
                    "client_secret": self.oauth.secret or "",
                },
            )
            error = body.get("error")
            if error == "authorization_pending":
                continue
            if error == "slow_down":
                interval += 5
                continue
            token = _access_token(body, self.mailbox, "Google")
            if not body.get("refresh_token"):
                raise OAuthError(f"mailbox {self.mailbox}: Google sent no refresh token (was offline access refused?)")
            async with self._locked() as state:
                state.clear()
                state.update(refresh_token=body["refresh_token"], access_token=token.value, expires_at=token.expires_at)
            return self.user
        raise OAuthError(f"mailbox {self.mailbox}: the code was not entered in time; run the login again")


async def device_login(oauth: OAuth2Settings, user: str, mailbox: str, say: Callable[[str], None]) -> str:
    """`mailbridge auth login`: the one-time consent; returns the account that signed in."""
    source = TokenSources().get(oauth, user, mailbox)
    if isinstance(source, MicrosoftTokens):
        return await asyncio.to_thread(source.device_login, say)
    assert isinstance(source, GoogleTokens)
    return await source.device_login(say)
