"""Settings: the only reader of the YAML file and of the environment.

Everything is validated once, at start-up; a typo or a bad value is an error that names the key.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import ssl
from datetime import date
from pathlib import Path
from typing import Annotated, Any, Literal

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
    timeout: float = Field(default=30.0, gt=0)

    @model_validator(mode="after")
    def _resolve(self) -> SmtpServer:
        _check_plain_text_is_local(self.security, self.host)
        secret = _read_secret(self.password, self.password_env, self.password_file, "password")
        if self.user and secret is None:
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
        if secret is None:
            raise ValueError("a password is required: give password, password_env or password_file")
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


MailboxConfig = ImapMailbox | MaildirMailbox


def _mailbox_kind(value: Any) -> str:
    # `type` may be left out: a mailbox is IMAP unless it says otherwise.
    kind = value.get("type", "imap") if isinstance(value, dict) else getattr(value, "type", "imap")
    return kind if kind in ("imap", "maildir") else "imap"


Mailbox = Annotated[
    Annotated[ImapMailbox, Tag("imap")] | Annotated[MaildirMailbox, Tag("maildir")],
    Discriminator(_mailbox_kind),
]


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
    url: str | None = None  # default: SQLite under data_dir


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
    claim_seconds: float = Field(default=120.0, ge=10)


def _default_domain() -> str:
    name = socket.getfqdn()
    return name if re.fullmatch(r"[A-Za-z0-9.-]+", name) and "." in name else "mailbridge.invalid"


class InstanceSettings(_Strict):
    """Several daemons on one database: each mailbox is fetched by one of them at a time, under a lease."""

    # How this daemon is named in the leases and in `mailbridge status`; default: host:pid:random.
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
    shutdown_grace_seconds: float = Field(default=10.0, gt=0)
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
    def _can_answer(self) -> Settings:
        for box in self.mailboxes:
            if box.acknowledge and box.address is None and self.can_send(box):
                raise ValueError(
                    f"mailbox {box.name}: acknowledge is on but the mailbox has no address to send from: "
                    "set address (or acknowledge: false)"
                )
        return self

    def smtp_for(self, box: ImapMailbox | MaildirMailbox) -> SmtpServer | None:
        return box.smtp or self.smtp

    def can_send(self, box: ImapMailbox | MaildirMailbox) -> bool:
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
        loc = [p for p in err["loc"] if p not in ("imap", "maildir") and not str(p).startswith("function-")]
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
        return Settings()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the configuration: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys (data_dir, database, mailboxes …)")
    base = path.parent.resolve()
    _resolve_relative_paths(data, base)
    _include_rules_file(data, path)
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, str(path), data)) from None


def _include_rules_file(data: dict[str, Any], path: Path) -> None:
    """routing.rules_file: its rules come after the inline ones, validated (and named in errors) with them."""
    routing = data.get("routing")
    if not isinstance(routing, dict) or not routing.get("rules_file"):
        return
    rules_path = Path(routing["rules_file"])
    try:
        extra = yaml.safe_load(rules_path.read_text(encoding="utf-8")) or []
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
            smtp_sections.append(box.get("smtp"))
    for smtp in smtp_sections:
        if isinstance(smtp, dict):
            fix(smtp, "password_file")
            fix(smtp, "ca_file")
