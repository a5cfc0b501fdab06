"""OAuth2 (XOAUTH2) for IMAP and SMTP, against the real Dovecot with its oauth2 passdb, an aiosmtpd sink that
checks tokens, and a local authorization server (token endpoint, device flow, introspection) that msal and our
Google client talk to over HTTPS."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import socket
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from mailbridge.cli import app as cli
from mailbridge.config import ConfigError, OAuth2Settings, load_settings
from mailbridge.logs import setup_logging
from mailbridge.oauth import (
    SASL_ERROR_ACK,
    OAuthError,
    TokenEndpointError,
    TokenSources,
    device_login,
    sasl_initial_response,
)
from tests.imap_env import count, daemon, make_app, new_user, sample_mail, wait_until, write_config
from tests.support.dovecot import Dovecot, MailUser
from tests.support.oauth_server import OAuthServer
from tests.support.smtp_sink import SmtpSink

pytestmark = pytest.mark.skipif(not Dovecot.available(), reason="dovecot is not installed")

APP_ID, APP_SECRET = "mailbridge-app", "app-secret-value"
PUBLIC_ID = "mailbridge-public"
GOOGLE_ID, GOOGLE_SECRET = "mailbridge-google", "google-secret-value"


@pytest.fixture(scope="module")
def oauth(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OAuthServer]:
    server = OAuthServer(tmp_path_factory.mktemp("oauth")).start()
    server.add_client(PUBLIC_ID)
    server.add_client(GOOGLE_ID, GOOGLE_SECRET)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def dovecot(tmp_path_factory: pytest.TempPathFactory, oauth: OAuthServer) -> Iterator[Dovecot]:
    server = Dovecot.start(tmp_path_factory.mktemp("dovecot-oauth"), oauth2_introspection_url=oauth.introspection_url)
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def normal_lifetimes(oauth: OAuthServer) -> None:
    oauth.set_lifetimes(3600)


def oauth_box(dovecot: Dovecot, user: MailUser, oauth2: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "name": user.name,
        "host": dovecot.host,
        "port": dovecot.port,
        "security": "none",
        "user": user.name,
        "auth": "oauth2",
        "oauth2": oauth2,
        "timeout": 10,
        "acknowledge": False,
        **extra,
    }


def microsoft_app(oauth: OAuthServer, user: MailUser, **extra: Any) -> dict[str, Any]:
    client_id = f"{APP_ID}-{user.name}"
    oauth.add_client(client_id, APP_SECRET, app_user=user.name)  # the app was granted this one mailbox
    return {
        "provider": "microsoft",
        "tenant": "contoso-test",
        "authority": oauth.authority,
        "client_id": client_id,
        "client_secret": APP_SECRET,
        "ca_file": str(oauth.ca_file),
        **extra,
    }


def microsoft_delegated(oauth: OAuthServer, cache: Path, **extra: Any) -> dict[str, Any]:
    return {
        "provider": "microsoft",
        "flow": "refresh_token",
        "authority": oauth.authority,
        "client_id": PUBLIC_ID,
        "token_cache": str(cache),
        "ca_file": str(oauth.ca_file),
        **extra,
    }


def google(oauth: OAuthServer, cache: Path, **extra: Any) -> dict[str, Any]:
    return {
        "provider": "google",
        "client_id": GOOGLE_ID,
        "client_secret": GOOGLE_SECRET,
        "token_url": oauth.token_url,
        "device_url": oauth.device_url,
        "token_cache": str(cache),
        "ca_file": str(oauth.ca_file),
        **extra,
    }


def google_consent(oauth: OAuthServer, user: MailUser, cache: Path) -> str:
    """The token cache as `auth login` leaves it for Google: the refresh token of the user's consent."""
    refresh = oauth.grant_refresh_token(user.name, GOOGLE_ID)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"refresh_token": refresh}))
    cache.chmod(0o600)
    return refresh


@pytest.fixture
def debug_logging(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """The daemon's own logging set-up at DEBUG (what an admin hunting a problem turns on), captured; the
    test session's logging is restored afterwards."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    quieted = {name: logging.getLogger(name).level for name in ("aioimaplib", "alembic", "apscheduler", "msal")}
    setup_logging("DEBUG")
    root.addHandler(caplog.handler)
    try:
        yield caplog
    finally:
        root.handlers[:], root.level = saved
        for name, level in quieted.items():
            logging.getLogger(name).setLevel(level)


async def test_microsoft_app_only_login_fetches_mail_into_tickets(
    oauth: OAuthServer, dovecot: Dovecot, tmp_path: Path, debug_logging: pytest.LogCaptureFixture
) -> None:
    caplog = debug_logging
    user = new_user(dovecot)
    for _ in range(3):
        dovecot.append(sample_mail(), user=user.name)
    cache = tmp_path / "tokens" / "app.json"
    app = make_app(tmp_path, [oauth_box(dovecot, user, microsoft_app(oauth, user, token_cache=str(cache)))])
    before = oauth.issued("client_credentials")
    try:
        await app.run_once()
        assert count(app, "select count(*) from tickets") == 3
        assert dovecot.uids("INBOX", user=user.name) == []
        assert oauth.issued("client_credentials") == before + 1
        assert (user.name, True) in oauth.introspections  # Dovecot asked the endpoint, and it said yes
        # The token was kept, readable by us alone; the client secret is not in it.
        assert stat.S_IMODE(cache.stat().st_mode) == 0o600
        assert APP_SECRET not in cache.read_text()
        await app.run_once()  # the cached token serves the next login: no new token
        assert oauth.issued("client_credentials") == before + 1
        assert any(r.levelno == logging.DEBUG for r in caplog.records) and "connected" in caplog.text
        tokens = [token for token in oauth.state.access_tokens if token in caplog.text]
        assert tokens == [] and APP_SECRET not in caplog.text
    finally:
        app.close()


async def test_app_only_without_a_token_cache_stores_nothing(
    oauth: OAuthServer, dovecot: Dovecot, tmp_path: Path
) -> None:
    user = new_user(dovecot)
    dovecot.append(sample_mail(), user=user.name)
    app = make_app(tmp_path, [oauth_box(dovecot, user, microsoft_app(oauth, user))])
    try:
        await app.run_once()
        assert count(app, "select count(*) from tickets") == 1
        written = [p.name for p in tmp_path.rglob("*") if p.is_file() and "token" in p.name]
        assert written == []
    finally:
        app.close()


@pytest.mark.parametrize("mechanism", ["xoauth2", "oauthbearer"])
async def test_google_refresh_token_for_imap_and_smtp(
    mechanism: str, oauth: OAuthServer, dovecot: Dovecot, tmp_path: Path
) -> None:
    user = new_user(dovecot)
    cache = tmp_path / "google.json"
    refresh = google_consent(oauth, user, cache)
    sink = SmtpSink(xoauth2_introspection_url=oauth.introspection_url).start()
    try:
        dovecot.append(sample_mail(), user=user.name)
        smtp = {"host": sink.host, "port": sink.port, "security": "none", "timeout": 5, "auth": "oauth2"}
        box = oauth_box(
            dovecot,
            user,
            google(oauth, cache, mechanism=mechanism),
            acknowledge=True,
            acknowledge_backlog=True,
            address=f"{user.name}@helpdesk.example",
            smtp=smtp,
        )
        app = make_app(tmp_path, [box])
        try:
            await app.run_once()
            assert count(app, "select count(*) from tickets") == 1
            assert count(app, "select count(*) from outbox where status = 'sent'") == 1
        finally:
            app.close()
        [ack] = sink.received
        assert ack.login == user.name  # the sink took the mail only after AUTH with a valid token
        assert sink.oauth_mechanisms == [mechanism.upper()]
        state = json.loads(cache.read_text())
        assert state["refresh_token"] == refresh and state["access_token"].startswith("at-")
        assert stat.S_IMODE(cache.stat().st_mode) == 0o600
        # IMAP (daemon) and SMTP (outbox process) shared the cache: one refresh served both.
        assert sink.tokens_refused == 0
    finally:
        sink.stop()


@pytest.mark.parametrize("mechanism", ["xoauth2", "oauthbearer"])
async def test_a_token_the_servers_stopped_accepting_is_renewed_once(
    mechanism: str, oauth: OAuthServer, dovecot: Dovecot, tmp_path: Path
) -> None:
    """The token says it lives an hour, but the servers stop taking it after a second (revoked): the login
    fails, the token is renewed, the login is tried once more and works."""
    user = new_user(dovecot)
    cache = tmp_path / "google.json"
    google_consent(oauth, user, cache)
    # SMTP with a token cache of its own: with the mailbox's, the outbox's process would read the token that
    # the IMAP login had just renewed, and the renewal at the SMTP server would go untested.
    smtp_cache = tmp_path / "google-smtp.json"
    google_consent(oauth, user, smtp_cache)
    oauth.set_lifetimes(3600, valid_seconds=1.0)
    sink = SmtpSink(xoauth2_introspection_url=oauth.introspection_url).start()
    smtp = {
        "host": sink.host,
        "port": sink.port,
        "security": "none",
        "timeout": 5,
        "user": user.name,
        "oauth2": google(oauth, smtp_cache, mechanism=mechanism),
    }
    box = oauth_box(
        dovecot,
        user,
        google(oauth, cache, mechanism=mechanism),
        acknowledge=True,
        acknowledge_backlog=True,
        address=f"{user.name}@helpdesk.example",
        smtp=smtp,
    )
    app = make_app(tmp_path, [box])
    try:
        dovecot.append(sample_mail(), user=user.name)
        await app.run_once()
        refreshes = oauth.issued("refresh_token")
        await asyncio.sleep(1.5)  # the cached token is dead on the servers, alive by its expiry time
        dovecot.append(sample_mail(), user=user.name)
        await app.run_once()
        assert count(app, "select count(*) from tickets") == 2
        assert count(app, "select count(*) from outbox where status = 'sent'") == 2
        assert (user.name, False) in oauth.introspections  # Dovecot did refuse the old token
        assert sink.tokens_refused >= 1
        assert oauth.issued("refresh_token") > refreshes
        assert len(sink.received) == 2
    finally:
        app.close()
        sink.stop()


@pytest.mark.slow
@pytest.mark.parametrize("provider", ["microsoft", "google"])
async def test_expired_tokens_are_refreshed_mid_run(
    provider: str, oauth: OAuthServer, dovecot: Dovecot, tmp_path: Path
) -> None:
    """Tokens of 3 seconds (Microsoft: delegated, through msal, the refresh token from the device flow;
    Google: its refresh token): the daemon renews token and session before each expires and keeps fetching."""
    user = new_user(dovecot)
    cache = tmp_path / "tokens.json"
    if provider == "microsoft":
        settings = microsoft_delegated(oauth, cache, refresh_margin_seconds=1)
        oauth.approve_device_logins(user.name)
        said: list[str] = []
        signed_in = await device_login(OAuth2Settings.model_validate(settings), user.name, user.name, said.append)
        assert signed_in == user.name and "enter the code" in said[0]
    else:
        settings = google(oauth, cache, refresh_margin_seconds=1)
        google_consent(oauth, user, cache)
    oauth.set_lifetimes(3)
    before = oauth.issued("refresh_token")
    app = make_app(tmp_path, [oauth_box(dovecot, user, settings, poll_interval=600)])
    async with daemon(app):
        await wait_until(lambda: count(app, "select count(*) from mailbox_state where connected") == 1, 15)
        for n in range(1, 9):  # eight mails over about eight seconds: past two token lifetimes
            dovecot.append(sample_mail(), user=user.name)
            await wait_until(lambda n=n: count(app, "select count(*) from tickets") == n, 10)
            await asyncio.sleep(0.5)
    assert oauth.issued("refresh_token") - before >= 3  # renewed again and again, by the refresh token
    assert (user.name, False) not in oauth.introspections  # never a login with an expired token
    assert count(app, "select count(*) from mailbox_state where last_error is not null") == 0


async def test_a_revoked_refresh_token_stops_only_its_mailbox(
    oauth: OAuthServer, dovecot: Dovecot, tmp_path: Path
) -> None:
    revoked, fine = new_user(dovecot), new_user(dovecot)
    refresh = google_consent(oauth, revoked, tmp_path / "revoked.json")
    google_consent(oauth, fine, tmp_path / "fine.json")
    oauth.revoke_refresh_tokens(revoked.name)
    dovecot.append(sample_mail(), user=revoked.name)
    dovecot.append(sample_mail(), user=fine.name)
    boxes = [
        oauth_box(dovecot, revoked, google(oauth, tmp_path / "revoked.json")),
        oauth_box(dovecot, fine, google(oauth, tmp_path / "fine.json")),
    ]
    app = make_app(tmp_path, boxes)
    async with daemon(app):
        await wait_until(lambda: count(app, "select count(*) from tickets") == 1, 15)
        error = f"last_error like '%auth login {revoked.name}%' and last_error like '%invalid_grant%'"
        await wait_until(lambda: count(app, f"select count(*) from mailbox_state where {error}") == 1, 15)
        dovecot.append(sample_mail(), user=fine.name)
        await wait_until(lambda: count(app, "select count(*) from tickets") == 2, 10)
        from sqlalchemy import text

        with app.db.reader() as session:
            last_error = session.execute(
                text("select last_error from mailbox_state where mailbox = :m"), {"m": revoked.name}
            ).scalar_one()
    assert refresh not in last_error and GOOGLE_SECRET not in last_error
    assert dovecot.uids("INBOX", user=revoked.name) != []  # its mail waits on the server


@pytest.mark.parametrize("provider", ["microsoft", "google"])
def test_auth_login_device_flow_stores_the_refresh_token(
    provider: str, oauth: OAuthServer, dovecot: Dovecot, tmp_path: Path
) -> None:
    user = new_user(dovecot)
    cache = tmp_path / "secrets" / "tokens.json"
    block = microsoft_delegated(oauth, cache) if provider == "microsoft" else google(oauth, cache)
    config = write_config(tmp_path, [oauth_box(dovecot, user, block)])
    oauth.approve_device_logins(user.name)
    result = CliRunner().invoke(cli, ["auth", "login", user.name, "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert "enter the code" in result.output and f"signed in as {user.name}" in result.output
    assert stat.S_IMODE(cache.stat().st_mode) == 0o600
    assert GOOGLE_SECRET not in cache.read_text()
    # The daemon now logs in with what the consent left behind.
    dovecot.append(sample_mail(), user=user.name)
    app = make_app(tmp_path, [oauth_box(dovecot, user, block)])
    try:
        asyncio.run(app.run_once())
        assert count(app, "select count(*) from tickets") == 1
    finally:
        app.close()


def test_auth_login_refuses_a_different_account(oauth: OAuthServer, dovecot: Dovecot, tmp_path: Path) -> None:
    user = new_user(dovecot)
    cache = tmp_path / "tokens.json"
    config = write_config(tmp_path, [oauth_box(dovecot, user, microsoft_delegated(oauth, cache))])
    oauth.approve_device_logins("someone-else")
    result = CliRunner().invoke(cli, ["auth", "login", user.name, "--config", str(config)])
    assert result.exit_code == 1
    assert "signed in as someone-else" in result.output and "nothing was stored" in result.output
    assert not cache.exists() or user.name not in cache.read_text()


# ------------------------------------------------------------------------------------ configuration


def _config_error(tmp_path: Path, box: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as caught:
        load_settings(write_config(tmp_path, [box]))
    return str(caught.value)


BASE = {"name": "m365", "host": "outlook.office365.com", "user": "support@example.com", "acknowledge": False}


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    no_block = _config_error(tmp_path, {**BASE, "auth": "oauth2"})
    assert "mailboxes[0] (m365)" in no_block and "no oauth2 block" in no_block
    ms = {"provider": "microsoft", "tenant": "contoso", "client_id": "c"}
    both = _config_error(tmp_path, {**BASE, "password": "x", "oauth2": {**ms, "client_secret": "s"}})
    assert "leave out the password" in both
    delegated = _config_error(tmp_path, {**BASE, "oauth2": ms})
    assert "mailboxes[0] (m365).oauth2" in delegated and "token_cache" in delegated
    plain = _config_error(
        tmp_path, {**BASE, "oauth2": {**ms, "client_secret": "s", "authority": "http://login.example/t"}}
    )
    assert "oauth2" in plain and "https://" in plain
    secret_and_device = _config_error(
        tmp_path, {**BASE, "oauth2": {**ms, "flow": "refresh_token", "client_secret": "s", "token_cache": "t"}}
    )
    assert "public client" in secret_and_device
    gmail = _config_error(tmp_path, {**BASE, "oauth2": {"provider": "google", "client_id": "c", "token_cache": "t"}})
    assert "client_secret" in gmail
    smtp = _config_error(tmp_path, {**BASE, "password": "x", "smtp": {"host": "smtp.example.com", "auth": "oauth2"}})
    assert "(m365).smtp" in smtp and "oauth2" in smtp


def test_a_mailbox_smtp_shares_the_mailbox_oauth2_and_defaults_follow_the_provider(tmp_path: Path) -> None:
    secret = tmp_path / "client.secret"
    secret.write_text("s3cret\n")
    box = {
        **BASE,
        "oauth2": {
            "provider": "microsoft",
            "tenant": "contoso",
            "client_id": "c",
            "client_secret_file": "client.secret",
        },
        "smtp": {"host": "smtp.office365.com", "auth": "oauth2"},
    }
    settings = load_settings(write_config(tmp_path, [box]))
    mailbox = settings.mailboxes[0]
    assert mailbox.auth == "oauth2" and mailbox.oauth2 is not None
    oauth2 = mailbox.oauth2
    assert oauth2.flow == "client_credentials" and oauth2.secret == "s3cret"
    assert oauth2.authority == "https://login.microsoftonline.com/contoso"
    assert oauth2.scopes == ["https://outlook.office365.com/.default"]
    assert mailbox.smtp is not None and mailbox.smtp.oauth2 == oauth2 and mailbox.smtp.user == BASE["user"]
    assert "s3cret" not in repr(settings)


async def test_an_unreachable_token_endpoint_is_an_outage_not_a_refusal(oauth: OAuthServer, tmp_path: Path) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    cache = tmp_path / "google.json"
    cache.write_text(json.dumps({"refresh_token": "rt-anything"}))
    down = OAuth2Settings.model_validate(google(oauth, cache, token_url=f"https://127.0.0.1:{port}/token"))
    with pytest.raises(TokenEndpointError, match="failed"):
        await TokenSources().get(down, "someone", "box").token()
    # A refusal is no outage: the refresh token is unknown at the (reachable) endpoint.
    up = OAuth2Settings.model_validate(google(oauth, cache))
    with pytest.raises(OAuthError, match="auth login box") as refused:
        await TokenSources().get(up, "someone", "box").token()
    assert not isinstance(refused.value, TokenEndpointError) and "rt-anything" not in str(refused.value)


def test_sasl_initial_responses() -> None:
    xoauth2 = base64.b64decode(sasl_initial_response("xoauth2", "a@b.example", "T0K", "imap.example", 993))
    assert xoauth2 == b"user=a@b.example\x01auth=Bearer T0K\x01\x01"
    bearer = base64.b64decode(sasl_initial_response("oauthbearer", "a,b=c@d", "T0K", "imap.example", 993))
    assert bearer == b"n,a=a=2Cb=3Dc@d,\x01host=imap.example\x01port=993\x01auth=Bearer T0K\x01\x01"
    assert base64.b64decode(SASL_ERROR_ACK["oauthbearer"]) == b"\x01" and SASL_ERROR_ACK["xoauth2"] == ""
