"""Settings: the only reader of the YAML file and of the environment.

Everything is validated once, at start-up; a typo or a bad value is an error that names the key.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import os
import re
import socket
import ssl
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    SecretStr,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from mailbridge.routing_rules import RoutingSettings
from mailbridge.sla.settings import SlaSettings

CONFIG_ENV = "MAILBRIDGE_CONFIG"
DATA_DIR_ENV = "MAILBRIDGE_DATA_DIR"
# Overrides database.url: keeps a PostgreSQL DSN with its password out of the YAML file.
DATABASE_URL_ENV = "MAILBRIDGE_DATABASE_URL"
DATABASE_BACKENDS = ("sqlite", "postgresql")


class ConfigError(Exception):
    """The configuration file is missing, unreadable or invalid; the message names the key."""


class _Strict(BaseModel):
    # A misspelt key is an error, not silently ignored.
    model_config = ConfigDict(frozen=True, extra="forbid")


class MoveTo(_Strict):
    move: str = Field(default="Processed", min_length=1)


AfterStore = MoveTo | Literal["flag_seen", "delete"]


class ImportSince(_Strict):
    since: date


ExistingMail = Literal["import", "skip"] | ImportSince


def _read_secret(value: SecretStr | None, env: str | None, file: Path | None, key: str) -> SecretStr | None:
    given = [name for name, v in ((key, value), (f"{key}_env", env), (f"{key}_file", file)) if v]
    if len(given) > 1:
        raise ValueError(f"give only one of {', '.join(given)}")
    if env:
        if env not in os.environ:
            raise ValueError(f"{key}_env names the environment variable {env}, which is not set")
        return SecretStr(os.environ[env])
    if file:
        try:
            return SecretStr(file.read_text(encoding="utf-8").strip())
        except OSError as exc:
            raise ValueError(f"{key}_file {file} cannot be read: {exc.strerror}") from None
    return value


MICROSOFT_AUTHORITY = "https://login.microsoftonline.com"
GOOGLE_TOKEN_URL = "https://oauth2.googleapis.com/token"
GOOGLE_DEVICE_URL = "https://oauth2.googleapis.com/device/code"
# Microsoft: app-only access asks for the resource's .default; delegated access names the two permissions.
_DEFAULT_SCOPES = {
    ("microsoft", "client_credentials"): ["https://outlook.office365.com/.default"],
    ("microsoft", "refresh_token"): [
        "https://outlook.office365.com/IMAP.AccessAsUser.All",
        "https://outlook.office365.com/SMTP.Send",
    ],
    ("google", "refresh_token"): ["https://mail.google.com/"],
}


class OAuth2Settings(_Strict):
    """Where the access tokens for XOAUTH2 come from: Microsoft (msal) or Google, and where they are kept."""

    provider: Literal["microsoft", "google"]
    # microsoft: client_credentials (app-only, needs client_secret) or refresh_token (delegated: a user's
    # consent once, `mailbridge auth login`). google: refresh_token only. Default: client_credentials when
    # a Microsoft client secret is given, refresh_token otherwise.
    flow: Literal["client_credentials", "refresh_token"] | None = None
    tenant: str | None = Field(default=None, pattern=r"^[A-Za-z0-9._-]+$")  # microsoft: directory (tenant) id
    client_id: str = Field(min_length=1)
    client_secret: SecretStr | None = None
    client_secret_env: str | None = None
    client_secret_file: Path | None = None
    scopes: list[str] | None = Field(default=None, min_length=1)
    # microsoft: default https://login.microsoftonline.com/<tenant> (sovereign clouds: their own login host)
    authority: str | None = None
    token_url: str | None = None  # google: default https://oauth2.googleapis.com/token
    device_url: str | None = None  # google, for `auth login`: default https://oauth2.googleapis.com/device/code
    # The refresh token (and the current access token), mode 0600. Required for refresh_token; for
    # client_credentials nothing is stored when it is left out.
    token_cache: Path | None = None
    ca_file: Path | None = None  # trust this CA bundle for the token endpoint instead of the system's
    # A token is renewed this long before it expires (msal keeps at least 5 minutes on its own), and an IMAP
    # session logged in with it is renewed then too.
    refresh_margin_seconds: float = Field(default=300.0, ge=0)
    # The SASL mechanism: xoauth2 (Microsoft 365 and Gmail) or oauthbearer (RFC 7628: Gmail, Dovecot, …).
    mechanism: Literal["xoauth2", "oauthbearer"] = "xoauth2"
    timeout: float = Field(default=30.0, gt=0)

    @model_validator(mode="after")
    def _resolve(self) -> OAuth2Settings:
        secret = _read_secret(self.client_secret, self.client_secret_env, self.client_secret_file, "client_secret")
        object.__setattr__(self, "client_secret", secret)
        flow = self.flow or ("client_credentials" if self.provider == "microsoft" and secret else "refresh_token")
        object.__setattr__(self, "flow", flow)
        if self.provider == "microsoft":
            if self.tenant is None and self.authority is None:
                raise ValueError("tenant is required for provider microsoft (the directory id or domain)")
            for key in ("token_url", "device_url"):
                if getattr(self, key) is not None:
                    raise ValueError(f"{key} is for provider google; for microsoft give authority")
            if flow == "client_credentials" and secret is None:
                raise ValueError("flow client_credentials needs client_secret (or client_secret_env/_file)")
            if flow == "refresh_token" and secret is not None:
                # The device-code sign-in is a public-client flow, and Entra ID refuses a secret when such a
                # refresh token is redeemed.
                raise ValueError(
                    "flow refresh_token signs in as a public client: leave out client_secret "
                    "(and allow public client flows in the app registration)"
                )
            authority = self.authority or f"{MICROSOFT_AUTHORITY}/{self.tenant}"
            object.__setattr__(self, "authority", _check_endpoint(authority.rstrip("/"), "authority"))
        else:
            if flow != "refresh_token":
                raise ValueError("provider google supports only flow refresh_token")
            if self.authority is not None or self.tenant is not None:
                raise ValueError("authority and tenant are for provider microsoft; for google give token_url")
            if secret is None:
                raise ValueError("provider google needs client_secret (or client_secret_env/_file)")
            object.__setattr__(self, "token_url", _check_endpoint(self.token_url or GOOGLE_TOKEN_URL, "token_url"))
            object.__setattr__(self, "device_url", _check_endpoint(self.device_url or GOOGLE_DEVICE_URL, "device_url"))
        if flow == "refresh_token" and self.token_cache is None:
            raise ValueError("flow refresh_token needs token_cache: the file that keeps the refresh token")
        if self.scopes is None:
            object.__setattr__(self, "scopes", list(_DEFAULT_SCOPES[(self.provider, flow)]))
        if self.ca_file is not None and not self.ca_file.is_file():
            raise ValueError(f"ca_file {self.ca_file} does not exist")
        return self

    @property
    def secret(self) -> str | None:
        return self.client_secret.get_secret_value() if self.client_secret is not None else None


def _check_endpoint(url: str, key: str) -> str:
    """Tokens and client secrets travel only over https."""
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise ValueError(f"{key} must be an https:// URL with a host, not {url!r}")
    return url


def _resolve_auth(auth: str | None, oauth2: OAuth2Settings | None, has_password: bool, where: str) -> str:
    """auth: password | oauth2; left out, it follows from whether an oauth2 block is given."""
    resolved = auth or ("oauth2" if oauth2 is not None else "password")
    if resolved == "oauth2":
        if has_password:
            raise ValueError(f"auth is oauth2: leave out the password of {where}")
    elif oauth2 is not None:
        raise ValueError("an oauth2 block is given but auth is password: set auth: oauth2")
    return resolved


class SmtpServer(_Strict):
    """Where outgoing mail is handed over (implicit TLS on 465, STARTTLS on 587, or plain on loopback)."""

    host: str = Field(min_length=1)
    port: int | None = Field(default=None, ge=1, le=65535)
    security: Literal["tls", "starttls", "none"] = "starttls"
    ca_file: Path | None = None
    user: str | None = None
    password: SecretStr | None = None
    password_env: str | None = None
    password_file: Path | None = None
    # oauth2: XOAUTH2 with a token; without its own oauth2 block, a mailbox's smtp uses the mailbox's.
    auth: Literal["password", "oauth2"] | None = None
    oauth2: OAuth2Settings | None = None
    timeout: float = Field(default=30.0, gt=0)

    @model_validator(mode="after")
    def _resolve(self) -> SmtpServer:
        _check_plain_text_is_local(self.security, self.host)
        secret = _read_secret(self.password, self.password_env, self.password_file, "password")
        auth = self.auth or ("oauth2" if self.oauth2 is not None else "password")
        object.__setattr__(self, "auth", _resolve_auth(auth, self.oauth2, secret is not None, "the smtp server"))
        if auth == "password" and self.user and secret is None:
            raise ValueError("user is set but no password: give password, password_env or password_file")
        if secret is not None and not self.user:
            raise ValueError("a password is given but no user")
        object.__setattr__(self, "password", secret)
        if self.ca_file is not None and not self.ca_file.is_file():
            raise ValueError(f"ca_file {self.ca_file} does not exist")
        if self.port is None:
            object.__setattr__(self, "port", {"tls": 465, "starttls": 587, "none": 25}[self.security])
        return self

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None)

    @property
    def secret(self) -> str | None:
        return self.password.get_secret_value() if self.password is not None else None


class RateLimit(_Strict):
    """Automatic mails to one address (acknowledgements, status mails): a loop or a flood stops here."""

    per_hour: int = Field(default=3, ge=0)
    per_day: int = Field(default=10, ge=0)


class _Answering(_Strict):
    """What a mailbox sends: from which address, in which language, and when it acknowledges."""

    address: str | None = Field(default=None, pattern=r"^[^@\s<>]+@[^@\s<>]+$")  # default: user if an address
    from_name: str = "Support"
    language: str = Field(default="en", pattern=r"^[a-z]{2}(_[A-Z]{2})?$")
    acknowledge: bool = True
    acknowledge_cc: bool = False  # the customer's Cc's get the acknowledgement too
    acknowledge_backlog: bool = False  # mail already in the mailbox before its first run
    status_mails: bool = False  # tell the customer when an agent changes the ticket's status (or closes it)
    rate_limit: RateLimit = RateLimit()
    smtp: SmtpServer | None = None  # default: the top-level smtp

    @property
    def own_address(self) -> str | None:
        return self.address.lower() if self.address else None


class ImapMailbox(_Answering):
    type: Literal["imap"] = "imap"
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.@-]+$")
    host: str = Field(min_length=1)
    port: int | None = Field(default=None, ge=1, le=65535)
    security: Literal["tls", "starttls", "none"] = "tls"
    ca_file: Path | None = None  # trust this CA bundle instead of the system's (an internal CA)
    user: str = Field(min_length=1)
    password: SecretStr | None = None
    password_env: str | None = None
    password_file: Path | None = None
    auth: Literal["password", "oauth2"] | None = None  # default: oauth2 when an oauth2 block is given
    oauth2: OAuth2Settings | None = None
    folder: str = "INBOX"
    after_store: AfterStore = MoveTo()
    quarantine_folder: str = Field(default="Quarantine", min_length=1)
    poll_interval: float = Field(default=60.0, gt=0)
    idle: bool = True
    existing_mail: ExistingMail = "import"
    timeout: float = Field(default=60.0, gt=0)

    @model_validator(mode="after")
    def _resolve(self) -> ImapMailbox:
        _check_plain_text_is_local(self.security, self.host)
        secret = _read_secret(self.password, self.password_env, self.password_file, "password")
        auth = _resolve_auth(self.auth, self.oauth2, secret is not None, "the mailbox")
        object.__setattr__(self, "auth", auth)
        if auth == "oauth2" and self.oauth2 is None:
            raise ValueError("auth is oauth2 but there is no oauth2 block (provider, client_id, …)")
        if auth == "password" and secret is None:
            raise ValueError("a password is required: give password, password_env or password_file (or auth: oauth2)")
        object.__setattr__(self, "password", secret)
        targets = {"quarantine_folder": self.quarantine_folder}
        if isinstance(self.after_store, MoveTo):
            targets["after_store.move"] = self.after_store.move
        for key, target in targets.items():
            if target.casefold() == self.folder.casefold():
                raise ValueError(f"{key} is the watched folder {self.folder!r}: mail would be imported forever")
        if self.ca_file is not None and not self.ca_file.is_file():
            raise ValueError(f"ca_file {self.ca_file} does not exist")
        if self.port is None:
            object.__setattr__(self, "port", 993 if self.security == "tls" else 143)
        if self.address is None and re.fullmatch(r"[^@\s<>]+@[^@\s<>]+", self.user):
            object.__setattr__(self, "address", self.user)
        return self

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None)

    @property
    def secret(self) -> str:
        assert self.password is not None
        return self.password.get_secret_value()


class MaildirMailbox(_Answering):
    """A local Maildir watched for new files (the demo mailbox, or local delivery by an MTA)."""

    type: Literal["maildir"]
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.@-]+$")
    path: Path
    poll_interval: float = Field(default=0.5, gt=0)


class LmtpMailbox(_Answering):
    """Mail an MTA hands over over LMTP (`lmtp.listen`) for these recipients: no polling, and the MTA keeps
    (and retries) every mail until we answer that it is stored."""

    type: Literal["lmtp"]
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.@-]+$")
    # Addresses (support@example.com) or whole domains (@example.com); default: the mailbox's address.
    recipients: list[Annotated[str, Field(pattern=r"^([^@\s<>]+)?@[^@\s<>]+$")]] = Field(default_factory=list)

    @model_validator(mode="after")
    def _resolve(self) -> LmtpMailbox:
        recipients = [r.lower() for r in self.recipients] or ([self.address.lower()] if self.address else [])
        if not recipients:
            raise ValueError("an lmtp mailbox needs recipients (or an address): which mail it takes")
        object.__setattr__(self, "recipients", recipients)
        return self


MailboxConfig = ImapMailbox | MaildirMailbox | LmtpMailbox


def _mailbox_kind(value: Any) -> str:
    # `type` may be left out: a mailbox is IMAP unless it says otherwise.
    kind = value.get("type", "imap") if isinstance(value, dict) else getattr(value, "type", "imap")
    return kind if kind in ("imap", "maildir", "lmtp") else "imap"


Mailbox = Annotated[
    Annotated[ImapMailbox, Tag("imap")]
    | Annotated[MaildirMailbox, Tag("maildir")]
    | Annotated[LmtpMailbox, Tag("lmtp")],
    Discriminator(_mailbox_kind),
]


class LmtpSettings(_Strict):
    """Where mailbridge listens for LMTP (Postfix `mailbox_transport = lmtp:unix:…`, Exim's lmtp transport)."""

    # unix:/run/mailbridge/lmtp.sock, or HOST:PORT (127.0.0.1:2424, [::1]:2424)
    listen: str = Field(pattern=r"^(unix:/.+|\[[0-9A-Fa-f:.]+\]:\d+|[A-Za-z0-9.-]+:\d+)$")
    socket_mode: str = Field(default="0660", pattern=r"^0?[0-7]{3}$")  # quoted: YAML reads 0660 as a number
    # LMTP has no authentication: anyone who can connect can hand in mail as anyone (even forge the
    # Authentication-Results we trust). A TCP address off this host must be asked for explicitly.
    allow_remote: bool = False
    # A delivery not committed by then is answered 451 (the MTA tries again; the retry is recognised).
    answer_within_seconds: float = Field(default=60.0, gt=0)

    @field_validator("socket_mode", mode="before")
    @classmethod
    def _quoted(cls, value: Any) -> Any:
        if isinstance(value, int):
            raise ValueError("write the mode quoted, e.g. '0660' (YAML reads 0660 as a decimal number)")
        return value

    @model_validator(mode="after")
    def _local_unless_asked(self) -> LmtpSettings:
        address = self.address
        if isinstance(address, tuple) and not self.allow_remote and not _is_loopback(address[0]):
            raise ValueError(
                f"listen on {address[0]} would take mail from the network without authentication; "
                "use a unix socket or a loopback address, or set allow_remote: true"
            )
        return self

    @property
    def address(self) -> Path | tuple[str, int]:
        """A unix socket's path, or (host, port)."""
        if self.listen.startswith("unix:"):
            return Path(self.listen.removeprefix("unix:"))
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]"), int(port)

    @property
    def mode(self) -> int:
        return int(self.socket_mode, 8)


def _check_plain_text_is_local(security: str, host: str) -> None:
    if security == "none" and not _is_loopback(host):
        raise ValueError("security: none is only allowed for 127.0.0.1 / localhost (passwords in clear)")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class DatabaseSettings(_Strict):
    # default: SQLite under data_dir; or postgresql+psycopg://user:password@host:5432/name
    url: str | None = None

    @field_validator("url")
    @classmethod
    def _known_backend(cls, url: str | None) -> str | None:
        if url is None:
            return None
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        # The URL may hold a password: the messages never repeat it.
        try:
            parsed = make_url(url)
        except ArgumentError:
            raise ValueError(
                "not a database URL: use sqlite:////path/to/mailbridge.db or postgresql+psycopg://user@host/name"
            ) from None
        backend = parsed.get_backend_name()
        if backend not in DATABASE_BACKENDS:
            raise ValueError(f"database {backend!r} is not supported: use sqlite or postgresql")
        if backend == "postgresql":
            if parsed.drivername == "postgresql":  # SQLAlchemy would pick psycopg2; we ship with psycopg 3
                parsed = parsed.set(drivername="postgresql+psycopg")
                url = parsed.render_as_string(hide_password=False)
            if parsed.drivername == "postgresql+psycopg" and importlib.util.find_spec("psycopg") is None:
                raise ValueError("PostgreSQL needs psycopg: pip install 'mailbridge[postgresql]'")
        return url


class StorageSettings(_Strict):
    path: Path | None = None  # default: data_dir/storage
    fsync: bool = True  # a stored mail survives a power cut, not just a crash


class TicketSettings(_Strict):
    number_prefix: str = Field(default="MB", pattern=r"^[A-Za-z][A-Za-z0-9]{0,9}$")
    number_digits: int = Field(default=6, ge=1, le=12)
    # How a ticket is named in the subjects of our mails; replies are threaded by it.
    reference_format: str = Field(default="[{number}]", pattern=r"^[^{}]*\{number\}[^{}]*$")

    def reference(self, number: str) -> str:
        return self.reference_format.replace("{number}", number)


class ParsingSettings(_Strict):
    timeout_seconds: float = Field(default=30.0, gt=0)
    workers: int = Field(default_factory=lambda: max(1, os.cpu_count() or 1), ge=1, le=64)
    max_message_bytes: int = Field(default=64 * 1024 * 1024, gt=0)


class FetchSettings(_Strict):
    batch_size: int = Field(default=50, ge=1, le=1000)
    batch_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    reconnect_max_seconds: float = Field(default=60.0, gt=0)


class OutboxSettings(_Strict):
    retry_for_hours: float = Field(default=48.0, gt=0)  # then the mail is marked failed
    first_retry_seconds: float = Field(default=30.0, gt=0)
    max_retry_seconds: float = Field(default=3600.0, gt=0)
    connections: int = Field(default=4, ge=1, le=32)  # SMTP sessions kept open and used at once
    poll_seconds: float = Field(default=5.0, gt=0)
    # Our Message-IDs end in this domain, and X-Loop names it, so our own mail coming back is recognised.
    domain: str = Field(default_factory=lambda: _default_domain(), pattern=r"^[A-Za-z0-9.-]+$")
    # Instead of SMTP, write each outgoing mail as a file here (the demo; or a dry run before going live).
    deliver_to_directory: Path | None = None
    # A sender claims the mails it is about to deliver for this long; another instance's sender takes a mail
    # over only after that (its holder died). No mail is started in the second half of its claim, so a send
    # (at most the SMTP timeout) ends before anyone else may claim the mail.
    claim_seconds: float = Field(default=120.0, ge=30)  # half of it to start a send, the rest to finish it


def _default_domain() -> str:
    name = socket.getfqdn()
    return name if re.fullmatch(r"[A-Za-z0-9.-]+", name) and "." in name else "mailbridge.invalid"


class InstanceSettings(_Strict):
    """Several daemons on one database: each mailbox is fetched by one of them at a time, under a lease."""

    # How this daemon is named in the leases and in `mailbridge status`; default: host:data directory
    # (one daemon per data directory, so a restarted daemon takes its leases back at once).
    name: str | None = Field(default=None, min_length=1, max_length=120)
    # A lease not renewed for this long is taken over by another instance (its holder died).
    lease_seconds: float = Field(default=30.0, ge=3, le=600)
    renew_seconds: float = Field(default=10.0, gt=0)

    @model_validator(mode="after")
    def _renew_in_time(self) -> InstanceSettings:
        if self.renew_seconds * 2 > self.lease_seconds:
            raise ValueError(
                "renew_seconds must be at most half of lease_seconds (one missed renewal must not lose the lease)"
            )
        return self


class ThreadingSettings(_Strict):
    """Replies onto their tickets, and no stranger into someone else's ticket."""

    # Signs our Message-IDs (<mb.TICKET.NONCE.HMAC@domain>): a reply naming one proves its sender got our
    # mail. Default: a random secret made on first start and kept in <data_dir>/threading.secret.
    secret: SecretStr | None = None
    secret_env: str | None = None
    secret_file: Path | None = None
    # A reply to a closed ticket within this many days reopens it; later, it opens a new, linked ticket.
    reopen_days: float = Field(default=14.0, ge=0)
    # Authentication-Results from these authserv-ids (your own receiving servers) are believed: a sender
    # whose DMARC failed there counts as a stranger. Results from anyone else are ignored (forgeable).
    trusted_authserv_ids: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _resolve(self) -> ThreadingSettings:
        secret = _read_secret(self.secret, self.secret_env, self.secret_file, "secret")
        if secret is not None and len(secret.get_secret_value()) < 16:
            raise ValueError("secret must be at least 16 characters")
        object.__setattr__(self, "secret", secret)
        return self


class Agent(_Strict):
    address: str = Field(pattern=r"^[^@\s<>]+@[^@\s<>]+$")
    name: str = ""
    queues: list[str] = Field(default_factory=list)


class TemplateSettings(_Strict):
    directory: Path | None = None  # templates here override the shipped ones, file by file


class LoggingSettings(_Strict):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["text", "json"] = "text"  # json: one object per line (time, level, logger, message, …)


class HttpSettings(_Strict):
    """`mailbridge run` serves /healthz and /metrics here (off unless the section is present)."""

    listen: str = "127.0.0.1:9478"  # HOST:PORT; [::1]:PORT for IPv6. No authentication: keep it local.
    # A mailbox that cannot connect (or keeps failing) for this long makes /healthz answer 503.
    mailbox_failing_seconds: float = Field(default=300.0, gt=0)
    # The oldest unsent mail in the outbox queued longer ago than this: the outbox is stuck.
    outbox_stuck_seconds: float = Field(default=900.0, gt=0)
    # The database check (a read on a connection of its own) gives up after this.
    database_timeout_seconds: float = Field(default=5.0, gt=0)

    @field_validator("listen")
    @classmethod
    def _host_and_port(cls, value: str) -> str:
        _split_listen(value)
        return value

    @property
    def host(self) -> str:
        return _split_listen(self.listen)[0]

    @property
    def port(self) -> int:
        return _split_listen(self.listen)[1]

    @property
    def local(self) -> bool:
        return _is_loopback(self.host)


def _split_listen(value: str) -> tuple[str, int]:
    host, colon, port = value.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("must be HOST:PORT, e.g. 127.0.0.1:9478 or [::1]:9478")
    return host, int(port)


class Settings(_Strict):
    data_dir: Path = Field(default_factory=lambda: default_data_dir())
    database: DatabaseSettings = DatabaseSettings()
    storage: StorageSettings = StorageSettings()
    tickets: TicketSettings = TicketSettings()
    parsing: ParsingSettings = ParsingSettings()
    fetch: FetchSettings = FetchSettings()
    logging: LoggingSettings = LoggingSettings()
    smtp: SmtpServer | None = None  # for every mailbox without its own smtp
    outbox: OutboxSettings = OutboxSettings()
    templates: TemplateSettings = TemplateSettings()
    threading: ThreadingSettings = ThreadingSettings()
    agents: list[Agent] = Field(default_factory=list)
    routing: RoutingSettings = RoutingSettings()
    sla: SlaSettings = SlaSettings()
    http: HttpSettings | None = None  # /healthz and /metrics; off unless configured
    shutdown_grace_seconds: float = Field(default=10.0, gt=0)
    lmtp: LmtpSettings | None = None
    instances: InstanceSettings = InstanceSettings()
    mailboxes: list[Mailbox] = Field(default_factory=list)

    @field_validator("mailboxes")
    @classmethod
    def _unique_names(cls, boxes: list[Any]) -> list[Any]:
        names = [box.name for box in boxes]
        doubled = sorted({n for n in names if names.count(n) > 1})
        if doubled:
            raise ValueError(f"mailbox names must be unique; repeated: {', '.join(doubled)}")
        return boxes

    @model_validator(mode="after")
    def _smtp_tokens(self) -> Settings:
        """An smtp with auth: oauth2 and no oauth2 block of its own uses its mailbox's (one consent for both)."""
        if self.smtp is not None and self.smtp.auth == "oauth2":
            if self.smtp.oauth2 is None:
                raise ValueError("smtp: auth is oauth2 but there is no smtp.oauth2 block (provider, client_id, …)")
            if not self.smtp.user:
                raise ValueError("smtp: auth is oauth2 but there is no user (the account the token is for)")
        for index, box in enumerate(self.mailboxes):
            smtp = box.smtp
            if smtp is None or smtp.auth != "oauth2":
                continue
            if smtp.oauth2 is not None and smtp.user:
                continue
            if not isinstance(box, ImapMailbox) or box.oauth2 is None:
                raise ValueError(
                    f"mailboxes[{index}] ({box.name}).smtp: auth is oauth2 but there is no smtp.oauth2 block "
                    "(and the mailbox has none to share)"
                )
            update = {"oauth2": smtp.oauth2 or box.oauth2, "user": smtp.user or box.user}
            object.__setattr__(box, "smtp", smtp.model_copy(update=update))
        return self

    @model_validator(mode="after")
    def _can_answer(self) -> Settings:
        for box in self.mailboxes:
            if box.acknowledge and box.address is None and self.can_send(box):
                raise ValueError(
                    f"mailbox {box.name}: acknowledge is on but the mailbox has no address to send from: "
                    "set address (or acknowledge: false)"
                )
        return self

    @model_validator(mode="after")
    def _lmtp_wired(self) -> Settings:
        boxes = [box for box in self.mailboxes if isinstance(box, LmtpMailbox)]
        if boxes and self.lmtp is None:
            raise ValueError(f"mailbox {boxes[0].name} is type lmtp, but there is no lmtp section (lmtp.listen)")
        if self.lmtp is not None and not boxes:
            raise ValueError("lmtp.listen is set, but no mailbox is type lmtp: nothing would take the mail")
        owner: dict[str, str] = {}
        for box in boxes:
            for recipient in box.recipients:
                if recipient in owner and owner[recipient] != box.name:
                    raise ValueError(
                        f"recipient {recipient} is in the lmtp mailboxes {owner[recipient]} and {box.name}"
                    )
                owner[recipient] = box.name
        return self

    def smtp_for(self, box: MailboxConfig) -> SmtpServer | None:
        return box.smtp or self.smtp

    def can_send(self, box: MailboxConfig) -> bool:
        """Without an SMTP server (or a delivery directory) a mailbox only takes mail in."""
        return self.outbox.deliver_to_directory is not None or self.smtp_for(box) is not None

    @property
    def database_url(self) -> str:
        return self.database.url or f"sqlite:///{self.data_dir / 'mailbridge.db'}"

    @property
    def storage_path(self) -> Path:
        return self.storage.path or self.data_dir / "storage"


def default_data_dir() -> Path:
    if env := os.environ.get(DATA_DIR_ENV):
        return Path(env)
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "mailbridge"


_UNION_HINTS = {
    "after_store": "must be {move: FOLDER}, flag_seen or delete",
    "existing_mail": "must be import, skip or {since: YYYY-MM-DD}",
}


def format_validation_error(exc: ValidationError, source: str, data: Any = None) -> str:
    lines: list[str] = []
    for err in exc.errors():
        raw_loc = err["loc"]
        loc = [
            p
            for i, p in enumerate(raw_loc)
            # the mailbox kind pydantic puts after the list index (mailboxes.0.imap.port); not the lmtp section
            if not (p in ("imap", "maildir", "lmtp") and i > 0 and isinstance(raw_loc[i - 1], int))
            and not str(p).startswith("function-")
        ]
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (misspelt, or in the wrong section?)"
        for key, hint in _UNION_HINTS.items():
            if key in loc:  # a union: pydantic reports every branch; one sentence says it better
                loc, msg = loc[: loc.index(key) + 1], hint
        lines.append(f"  {_describe_location(loc, data) or '(top level)'}: {msg}")
    unique = list(dict.fromkeys(lines))
    return "\n".join([f"{source}: {len(unique)} error(s) in the configuration", *unique])


def _describe_location(loc: list[Any], data: Any) -> str:
    """mailboxes.0.port -> mailboxes[0] (support).port, so the admin sees which mailbox is meant."""
    parts: list[str] = []
    node = data
    for item in loc:
        if isinstance(item, int):
            name = (
                node[item].get("name")
                if isinstance(node, list) and len(node) > item and isinstance(node[item], dict)
                else None
            )
            parts[-1] += f"[{item}]" + (f" ({name})" if name else "")
            node = node[item] if isinstance(node, list) and len(node) > item else None
        else:
            parts.append(str(item))
            node = node.get(item) if isinstance(node, dict) else None
    return ".".join(parts)


def load_settings(path: Path | None = None) -> Settings:
    """Read and validate the YAML config; without a file, the embedded defaults."""
    if path is None and (env := os.environ.get(CONFIG_ENV)):
        path = Path(env)
    if path is None:
        return _validate(_override_from_environment({}), "the default configuration")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the configuration: {exc.strerror}") from None
    try:
        data = _load_yaml(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys (data_dir, database, mailboxes …)")
    base = path.parent.resolve()
    _resolve_relative_paths(data, base)
    _include_rules_file(data, path)
    return _validate(_override_from_environment(data), str(path))


def _load_yaml(text: str) -> Any:
    """`yaml.safe_load`, parsed by libyaml where PyYAML has it: the same data (the constructor is the same),
    eight times faster, which a rules file of a few hundred rules notices at every start."""
    return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def _validate(data: dict[str, Any], source: str) -> Settings:
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        message = format_validation_error(exc, source, data)
        if os.environ.get(DATABASE_URL_ENV):
            message = message.replace("  database.url:", f"  database.url (from {DATABASE_URL_ENV}):")
        raise ConfigError(message) from None


def _override_from_environment(data: dict[str, Any]) -> dict[str, Any]:
    """MAILBRIDGE_DATABASE_URL wins over database.url (an operator keeps the DSN and its password in the
    service's environment, e.g. a systemd EnvironmentFile, not in the YAML)."""
    url = os.environ.get(DATABASE_URL_ENV)
    if url:
        database = data.get("database")
        data["database"] = {**(database if isinstance(database, dict) else {}), "url": url}
    return data


def _include_rules_file(data: dict[str, Any], path: Path) -> None:
    """routing.rules_file: its rules come after the inline ones, validated (and named in errors) with them."""
    routing = data.get("routing")
    if not isinstance(routing, dict) or not routing.get("rules_file"):
        return
    rules_path = Path(routing["rules_file"])
    try:
        extra = _load_yaml(rules_path.read_text(encoding="utf-8")) or []
    except OSError as exc:
        raise ConfigError(f"{path}: routing.rules_file {rules_path} cannot be read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{rules_path}: not valid YAML: {exc}") from None
    if not isinstance(extra, list):
        raise ConfigError(f"{rules_path}: must be a list of rules (- name: … when: … then: …)")
    routing["rules"] = [*(routing.get("rules") or []), *extra]


def _resolve_relative_paths(data: dict[str, Any], base: Path) -> None:
    """Relative paths in a config file are relative to the file, not to wherever the daemon starts."""

    def fix(holder: dict[str, Any], key: str) -> None:
        value = holder.get(key)
        if isinstance(value, str) and value and not Path(value).is_absolute():
            holder[key] = str(base / value)

    fix(data, "data_dir")
    sections = (
        ("storage", "path"),
        ("outbox", "deliver_to_directory"),
        ("templates", "directory"),
        ("threading", "secret_file"),
        ("routing", "rules_file"),
    )
    customers = (data.get("routing") or {}).get("customers") if isinstance(data.get("routing"), dict) else None
    if isinstance(customers, dict):
        fix(customers, "directory")
        if isinstance(customers.get("crm"), dict):
            fix(customers["crm"], "token_file")
            fix(customers["crm"], "ca_file")
    for section, key in sections:
        if isinstance(data.get(section), dict):
            fix(data[section], key)
    smtp_sections = [data.get("smtp")]
    boxes = data.get("mailboxes")
    for box in boxes if isinstance(boxes, list) else []:
        if isinstance(box, dict):
            fix(box, "path")
            fix(box, "password_file")
            fix(box, "ca_file")
            _fix_oauth2_paths(box.get("oauth2"), fix)
            smtp_sections.append(box.get("smtp"))
    for smtp in smtp_sections:
        if isinstance(smtp, dict):
            fix(smtp, "password_file")
            fix(smtp, "ca_file")
            _fix_oauth2_paths(smtp.get("oauth2"), fix)


def _fix_oauth2_paths(section: Any, fix: Callable[[dict[str, Any], str], None]) -> None:
    if isinstance(section, dict):
        for key in ("client_secret_file", "token_cache", "ca_file"):
            fix(section, key)
