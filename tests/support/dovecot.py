"""A private, throw-away Dovecot 2.3 IMAP server for integration tests.

The test-suite starts the server itself: no systemd, nothing under /etc/dovecot or /run/dovecot is
read or written.  Everything (config, passwd-file, logs, runtime sockets, Maildirs) lives below the
``base_dir`` handed to :meth:`Dovecot.start`; the server listens on 127.0.0.1 only, on a free port.

Typical use::

    server = Dovecot.start(tmp_path)
    try:
        uid = server.append(b"Subject: hi\\r\\n\\r\\nbody\\r\\n")
        ...  # point the daemon at server.host / server.port / server.user / server.password
    finally:
        server.stop()

Running unprivileged vs. as root
--------------------------------
* As a normal user every Dovecot process (master, auth, login, imap) runs as that user; the login
  and anvil chroots are switched off because only root can chroot.
* Dovecot refuses two things as root: ``imap-login`` aborts with "This process must not be run as
  root" and ``imap`` aborts with "Mail access not allowed for root".  So as root the login processes
  run as ``dovenull`` (created by the Debian package; ``nobody`` as fallback), and the mail
  processes run as ``nobody`` and are chrooted into ``<base_dir>/mail`` (``mail_chroot``).  The
  chroot lets an unprivileged user reach the Maildirs even though pytest's ``tmp_path`` parents are
  mode 0700.  In that mode the files in :attr:`Dovecot.mail_dir` belong to ``nobody``; files that
  tests put there directly must be chowned to :attr:`Dovecot.mail_uid` / :attr:`Dovecot.mail_gid`.

TLS
---
``Dovecot.start(base_dir, tls=True)`` additionally turns on TLS: a private CA and a server
certificate for ``127.0.0.1`` / ``localhost`` are generated below ``base_dir`` (once per instance,
with the ``openssl`` command line tool, or with the ``cryptography`` package if there is no
``openssl``), the plain IMAP port offers STARTTLS and an implicit-TLS (IMAPS) listener is added on
:attr:`Dovecot.tls_port`.  Clients must trust :attr:`Dovecot.ca_file`, e.g. via
:meth:`Dovecot.ssl_context`.  Plaintext logins on the plain port keep working
(``disable_plaintext_auth = no``), so all helpers below still use unencrypted IMAP.

Only Dovecot 2.3 is supported (2.4 changed the configuration syntax); see
:meth:`Dovecot.unavailable_reason`.
"""

import atexit
import base64
import contextlib
import functools
import grp
import imaplib
import ipaddress
import os
import pwd
import re
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Self

HOST = "127.0.0.1"
DEFAULT_USER = "support"
DEFAULT_PASSWORD = "secret"

START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0
IMAP_TIMEOUT = 10.0

# Unix socket paths are limited to 107 bytes; the longest socket Dovecot creates below base_dir is
# about 25 characters ("token-login/tokenlogin", "replication-notify-fifo"), so keep a margin.
_MAX_RUN_DIR_LEN = 70
# Paths end up unquoted in dovecot.conf and in passdb args; '%' and '$' would be expanded there.
_SAFE_PATH = re.compile(r"^[A-Za-z0-9/._+-]+$")
_SAFE_USER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

# Dovecot 2.3.19's post-login capability list; only used if probing the real one fails.
_FALLBACK_CAPABILITIES = (
    "IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE SORT SORT=DISPLAY THREAD=REFERENCES THREAD=REFS "
    "THREAD=ORDEREDSUBJECT MULTIAPPEND URL-PARTIAL CATENATE UNSELECT CHILDREN NAMESPACE UIDPLUS "
    "LIST-EXTENDED I18NLEVEL=1 CONDSTORE QRESYNC ESEARCH ESORT SEARCHRES WITHIN CONTEXT=SEARCH "
    "LIST-STATUS BINARY MOVE SNIPPET=FUZZY PREVIEW=FUZZY PREVIEW STATUS=SIZE SAVEDATE LITERAL+ NOTIFY"
)
# Validity of the generated test certificates.
_CA_DAYS = 3650
_CERT_DAYS = 825
# The server certificate is valid for these names (what a client may pass as server_hostname).
TLS_IP_NAMES = ("127.0.0.1",)
TLS_DNS_NAMES = ("localhost",)
# Dovecot 2.3 logs "service(imap-login): listen(127.0.0.1, 993) failed: Address already in use".
_PORT_IN_USE = re.compile(r"\w+\([^,]*, (\d+)\) failed: Address already in use")

# Removed from the capability list for idle=False.  NOTIFY (RFC 5465) is push as well.
_PUSH_CAPABILITIES = frozenset({"IDLE", "NOTIFY"})


class DovecotError(RuntimeError):
    """The test Dovecot could not be started/stopped, or an IMAP helper command failed."""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now (racy, like all such helpers)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


# --------------------------------------------------------------------------------------------------
# modified UTF-7 (RFC 3501 section 5.1.3) for mailbox names


def imap_utf7_encode(name: str) -> str:
    """Encode a mailbox name to IMAP modified UTF-7 (what goes on the wire and on disk)."""
    out: list[str] = []
    pending: list[str] = []

    def flush() -> None:
        if pending:
            raw = "".join(pending).encode("utf-16-be")
            out.append("&" + base64.b64encode(raw).decode("ascii").rstrip("=").replace("/", ",") + "-")
            pending.clear()

    for char in name:
        if 0x20 <= ord(char) <= 0x7E:
            flush()
            out.append("&-" if char == "&" else char)
        else:
            pending.append(char)
    flush()
    return "".join(out)


def imap_utf7_decode(name: str) -> str:
    """Decode an IMAP modified UTF-7 mailbox name."""

    def repl(match: re.Match[str]) -> str:
        chunk = match.group(1)
        if not chunk:
            return "&"
        chunk = chunk.replace(",", "/")
        chunk += "=" * (-len(chunk) % 4)
        return base64.b64decode(chunk).decode("utf-16-be")

    return re.sub(r"&([^-]*)-", repl, name)


def _quote_mailbox(name: str) -> str:
    encoded = imap_utf7_encode(name)
    return '"' + encoded.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _unquote(value: bytes) -> bytes:
    if value.startswith(b'"') and value.endswith(b'"') and len(value) >= 2:
        return re.sub(rb"\\(.)", rb"\1", value[1:-1])
    return value


def _check(result: tuple[str, Sequence[Any]], what: str) -> Sequence[Any]:
    typ, data = result
    if typ != "OK":
        raise DovecotError(f"{what} failed: {typ} {data!r}")
    return data


# --------------------------------------------------------------------------------------------------
# locating the binaries


def _find_binary(name: str, *candidates: str) -> str | None:
    for candidate in candidates:
        if os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which(name)
    if found:
        return found
    for directory in ("/usr/sbin", "/usr/local/sbin", "/usr/bin", "/usr/local/bin"):
        path = os.path.join(directory, name)
        if os.access(path, os.X_OK):
            return path
    return None


def _dovecot_binary() -> str | None:
    return _find_binary("dovecot", "/usr/sbin/dovecot")


def _doveadm_binary() -> str | None:
    return _find_binary("doveadm", "/usr/bin/doveadm")


@functools.cache
def _dovecot_version() -> str | None:
    binary = _dovecot_binary()
    if binary is None:
        return None
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.split()[0] if out.stdout.split() else None


@functools.cache
def _unavailable_reason() -> str | None:
    binary = _dovecot_binary()
    if binary is None:
        return "dovecot is not installed (run scripts/install-test-deps.sh)"
    version = _dovecot_version()
    if version is None:
        return f"could not determine the version of {binary}"
    if not version.startswith("2.3."):
        return f"dovecot {version} found, but the test harness only supports Dovecot 2.3"
    if _doveadm_binary() is None:
        return "doveadm not found (package dovecot-core)"
    doveconf = _find_binary("doveconf", "/usr/bin/doveconf")
    libexec = "/usr/lib/dovecot"
    if doveconf is not None:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [doveconf, "-c", "/dev/null", "-h", "libexec_dir"],
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            )
            libexec = out.stdout.strip() or libexec
    for program in ("imap", "imap-login"):
        if not os.access(os.path.join(libexec, program), os.X_OK):
            return f"{libexec}/{program} missing: install dovecot-imapd (scripts/install-test-deps.sh)"
    return None


# --------------------------------------------------------------------------------------------------
# TLS test certificates


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of a generated test PKI: CA certificate, server certificate and server key."""

    ca_file: Path
    cert_file: Path
    key_file: Path


_OPENSSL_CNF = """\
# Generated by tests/support/dovecot.py; keeps the system openssl.cnf out of the way.
[req]
distinguished_name = req_dn
[req_dn]
[ca_ext]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[server_ext]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = {san}
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
"""


def _openssl_binary() -> str | None:
    return _find_binary("openssl", "/usr/bin/openssl")


def _have_cryptography() -> bool:
    try:
        import cryptography.x509  # noqa: F401
    except ImportError:
        return False
    return True


def generate_tls_files(
    directory: Path, *, common_name: str = "mailbridge test CA", backend: str | None = None
) -> TlsFiles:
    """Create a private CA and a server certificate for 127.0.0.1 / localhost in ``directory``.

    Keys are ECDSA P-256 (fast to generate).  ``backend`` is ``"openssl"`` (the command line tool),
    ``"cryptography"`` (the Python package) or None: openssl if installed, else cryptography.
    """
    if backend is None:
        backend = "openssl" if _openssl_binary() is not None else "cryptography"
    directory.mkdir(parents=True, exist_ok=True)
    files = TlsFiles(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    if backend == "openssl":
        _generate_with_openssl(directory, files, common_name)
    elif backend == "cryptography":
        if not _have_cryptography():
            raise DovecotError("tls=True needs the openssl command line tool or the Python package cryptography")
        _generate_with_cryptography(files, common_name)
    else:
        raise ValueError(f"unknown TLS backend {backend!r}")
    files.key_file.chmod(0o600)
    return files


def _generate_with_openssl(directory: Path, files: TlsFiles, common_name: str) -> None:
    openssl = _openssl_binary()
    if openssl is None:
        raise DovecotError("openssl command line tool not found")
    san = ", ".join([f"IP:{ip}" for ip in TLS_IP_NAMES] + [f"DNS:{name}" for name in TLS_DNS_NAMES])
    cnf = directory / "openssl.cnf"
    cnf.write_text(_OPENSSL_CNF.format(san=san))
    ca_key = directory / "ca.key"
    csr = directory / "server.csr"
    env = dict(os.environ, OPENSSL_CONF=str(cnf))
    ec_key = ["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out"]
    ca_cert = ["req", "-new", "-x509", "-config", str(cnf), "-key", str(ca_key), "-subj", f"/CN={common_name}"]
    ca_cert += ["-days", str(_CA_DAYS), "-sha256", "-extensions", "ca_ext", "-out", str(files.ca_file)]
    request = ["req", "-new", "-config", str(cnf), "-key", str(files.key_file), "-subj", f"/CN={TLS_DNS_NAMES[0]}"]
    request += ["-sha256", "-out", str(csr)]
    sign = ["x509", "-req", "-in", str(csr), "-CA", str(files.ca_file), "-CAkey", str(ca_key), "-sha256"]
    sign += ["-set_serial", f"0x{uuid.uuid4().hex[:16]}", "-days", str(_CERT_DAYS)]
    sign += ["-extfile", str(cnf), "-extensions", "server_ext", "-out", str(files.cert_file)]
    old_umask = os.umask(0o077)  # keys are created with mode 0600
    try:
        for args in ([*ec_key, str(ca_key)], ca_cert, [*ec_key, str(files.key_file)], request, sign):
            try:
                subprocess.run([openssl, *args], capture_output=True, text=True, timeout=30, env=env, check=True)
            except subprocess.CalledProcessError as exc:
                raise DovecotError(f"openssl {args[0]} failed: {exc.stderr}") from exc
    finally:
        os.umask(old_umask)
    csr.unlink()
    ca_key.unlink()  # like the cryptography backend: nothing else is ever signed with it


def _generate_with_cryptography(files: TlsFiles, common_name: str) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.now(UTC)
    not_before = now - timedelta(minutes=5)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(now + timedelta(days=_CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    san: list[x509.GeneralName] = [x509.IPAddress(ipaddress.ip_address(ip)) for ip in TLS_IP_NAMES]
    san += [x509.DNSName(name) for name in TLS_DNS_NAMES]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, TLS_DNS_NAMES[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(now + timedelta(days=_CERT_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    files.ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    fd = os.open(files.key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    # The CA key is not kept: nothing else is ever signed with it.


# --------------------------------------------------------------------------------------------------
# processes


def _proc_info(pid: int) -> tuple[bytes, int, int] | None:
    """(argv[0]-ish cmdline, ppid, pgid) of a process, or None if it is gone / a zombie."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] == "Z":
        return None
    return cmdline, int(fields[1]), int(fields[2])


def _alive(pid: int) -> bool:
    return _proc_info(pid) is not None


@dataclass(frozen=True)
class MailUser:
    """One IMAP account on the test server."""

    name: str
    password: str
    home: Path
    mail_dir: Path


class Dovecot:
    """A private Dovecot instance; create it with :meth:`start`."""

    host: str = HOST
    separator: str = "."  # hierarchy separator of the (default Maildir++) namespace

    def __init__(
        self,
        base_dir: Path,
        port: int,
        *,
        idle: bool,
        auto_port: bool,
        tls: bool = False,
        oauth2_introspection_url: str | None = None,
    ) -> None:
        """Use :meth:`start`; this only prepares the directories and files."""
        self.base_dir = Path(base_dir).resolve()
        if not _SAFE_PATH.match(str(self.base_dir)):
            raise ValueError(f"base_dir {self.base_dir} contains characters unsafe for dovecot.conf")
        self.port = port
        self.idle = idle
        self._auto_port = auto_port
        self.tls = tls
        self.oauth2_introspection_url = oauth2_introspection_url
        # The implicit-TLS (IMAPS) port; always picked automatically.  None without TLS.
        self.tls_port: int | None = free_port() if tls else None
        self.tls_dir = self.base_dir / "tls"
        self._tls_files: TlsFiles | None = None
        self.user = DEFAULT_USER
        self.password = DEFAULT_PASSWORD
        self.instance_name = f"mbtest-{uuid.uuid4().hex[:10]}"
        # Dovecot titles its child processes "dovecot-<instance_name>/<service>".
        self._title_prefix = f"dovecot-{self.instance_name}/"

        self.config_path = self.base_dir / "dovecot.conf"
        self.log_path = self.base_dir / "dovecot.log"
        self.stderr_path = self.base_dir / "dovecot.stderr"
        self.passwd_dir = self.base_dir / "users.d"  # one passwd-file per user
        self.state_dir = self.base_dir / "state"
        self.mail_root = self.base_dir / "mail"
        self._run_dir: Path | None = None
        self._own_run_dir = False

        self.is_root = os.geteuid() == 0
        me = pwd.getpwuid(os.geteuid()).pw_name
        my_group = grp.getgrgid(os.getegid()).gr_name
        if self.is_root:
            mail_pw = pwd.getpwnam("nobody")
            self._login_user = self._first_existing_user("dovenull", "nobody")
            self._mail_user = mail_pw.pw_name
            self.mail_uid = mail_pw.pw_uid
            self.mail_gid = mail_pw.pw_gid
        else:
            self._login_user = me
            self._mail_user = me
            self.mail_uid = os.geteuid()
            self.mail_gid = os.getegid()
        self._mail_group = grp.getgrgid(self.mail_gid).gr_name
        self._internal_user = me
        self._internal_group = my_group

        self._users: dict[str, MailUser] = {}
        self._proc: subprocess.Popen[bytes] | None = None
        self._capability_override: str | None = None

        for directory in (self.base_dir, self.state_dir, self.mail_root, self.passwd_dir):
            directory.mkdir(parents=True, exist_ok=True)

    # ---------------------------------------------------------------------------------- lifecycle

    @staticmethod
    def available() -> bool:
        """True if a usable Dovecot 2.3 (dovecot, doveadm, imap, imap-login) is installed."""
        return _unavailable_reason() is None

    @staticmethod
    def unavailable_reason() -> str | None:
        """Why :meth:`available` is False (for ``pytest.skip``), or None."""
        return _unavailable_reason()

    @classmethod
    def start(
        cls,
        base_dir: Path,
        port: int | None = None,
        *,
        idle: bool = True,
        tls: bool = False,
        oauth2_introspection_url: str | None = None,
    ) -> Self:
        """Write a private config below ``base_dir`` and start Dovecot on 127.0.0.1:``port``.

        ``port=None`` picks a free port.  ``idle=False`` makes the server not advertise IDLE (nor
        NOTIFY), so clients must poll.  The user ``support``/``secret`` exists; see :meth:`add_user`.

        ``tls=True`` generates a test CA and server certificate (see :attr:`ca_file`), offers
        STARTTLS on ``port`` and adds an implicit-TLS listener on :attr:`tls_port`.

        ``oauth2_introspection_url`` adds Dovecot's ``oauth2`` passdb behind the password one: XOAUTH2 and
        OAUTHBEARER logins are checked by POSTing the token to that RFC 7662 endpoint, which must answer
        ``{"active": true, "username": USER}``. Password logins keep working.
        """
        reason = _unavailable_reason()
        if reason is not None:
            raise DovecotError(reason)
        if tls and _openssl_binary() is None and not _have_cryptography():
            raise DovecotError("tls=True needs the openssl command line tool or the Python package cryptography")
        server = cls(
            base_dir,
            port if port is not None else free_port(),
            idle=idle,
            auto_port=port is None,
            tls=tls,
            oauth2_introspection_url=oauth2_introspection_url,
        )
        server.add_user(DEFAULT_USER, DEFAULT_PASSWORD)
        try:
            if tls:
                server._ensure_tls_files()
            server._launch()
            if not idle:
                server._capability_override = server._probe_capabilities_without_push()
                server._terminate()
                server._launch()
            for name in server._users:
                server._materialize(name)
        except BaseException:
            server.stop()
            raise
        return server

    def stop(self) -> None:
        """Stop the server; afterwards no process of this instance is left.  Idempotent."""
        self._terminate()
        atexit.unregister(self._terminate)
        if self._own_run_dir and self._run_dir is not None:
            shutil.rmtree(self._run_dir, ignore_errors=True)
            self._run_dir = None
            self._own_run_dir = False

    def restart(self) -> None:
        """Stop and start the same server (same port, config, users and mail).

        All client connections are dropped.  Also works after :meth:`stop`.
        """
        self._terminate()
        self._launch()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def pids(self) -> list[int]:
        """PIDs of all live processes of this instance (master and children)."""
        return sorted(self._processes(self._proc.pid if self._proc is not None else None))

    def kill_connections(self, *, hard: bool = False) -> None:
        """Drop every current client connection (pre- and post-login); the server keeps running.

        With ``hard=False`` the imap processes get SIGTERM (Dovecot sends ``* BYE Server shutting
        down.`` and closes, like ``doveadm kick``); with ``hard=True`` they get SIGKILL, so the
        connection just ends (EOF, possibly in the middle of a literal).
        """
        if self._proc is None:
            return
        sig = signal.SIGKILL if hard else signal.SIGTERM
        victims = self._signal_clients(self._proc.pid, sig)
        deadline = time.monotonic() + STOP_TIMEOUT
        while any(_alive(pid) for pid in victims):
            if time.monotonic() > deadline:
                raise DovecotError(f"imap processes {victims} did not exit after {sig.name}")
            time.sleep(0.01)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        tls = f" tls_port={self.tls_port}" if self.tls else ""
        return f"<Dovecot {self.host}:{self.port}{tls} {state} base_dir={self.base_dir}>"

    # ---------------------------------------------------------------------------------------- TLS

    @property
    def ca_file(self) -> Path | None:
        """PEM file of the CA that signed the server certificate (clients must trust it); None without TLS."""
        return self._tls_files.ca_file if self._tls_files is not None else None

    @property
    def cert_file(self) -> Path | None:
        """PEM file of the server certificate (for 127.0.0.1 and localhost); None without TLS."""
        return self._tls_files.cert_file if self._tls_files is not None else None

    def ssl_context(self) -> ssl.SSLContext:
        """A default client context (hostname check, TLSv1.2+) that trusts only :attr:`ca_file`."""
        if self.ca_file is None:
            raise DovecotError("this server was started without tls=True")
        return ssl.create_default_context(cafile=str(self.ca_file))

    # -------------------------------------------------------------------------------------- users

    def add_user(self, name: str, password: str) -> MailUser:
        """Create another IMAP account with its own Maildir (``<base_dir>/mail/<name>/Maildir``)."""
        if not _SAFE_USER.match(name):
            raise ValueError(f"unsupported user name {name!r}")
        if any(c in password for c in ":\n\r") or not password:
            raise ValueError("password must be non-empty and must not contain ':' or newlines")
        if name in self._users:
            raise ValueError(f"user {name!r} already exists")
        home = self.mail_root / name
        home.mkdir(parents=True, exist_ok=True)
        if self.is_root:
            os.chown(home, self.mail_uid, self.mail_gid)
        user = MailUser(name=name, password=password, home=home, mail_dir=home / "Maildir")
        self._users[name] = user
        self._write_passwd_file(user)
        if self.running:
            self._materialize(name)
        return user

    @property
    def users(self) -> dict[str, MailUser]:
        return dict(self._users)

    @property
    def mail_dir(self) -> Path:
        """The Maildir of the default user (``support``)."""
        return self._users[self.user].mail_dir

    def user_mail_dir(self, user: str) -> Path:
        return self._get_user(user).mail_dir

    def folder_path(self, folder: str = "INBOX", *, user: str | None = None) -> Path:
        """On-disk Maildir++ directory of ``folder``."""
        mail_dir = self._get_user(user).mail_dir
        if folder.upper() == "INBOX":
            return mail_dir
        return mail_dir / ("." + imap_utf7_encode(folder))

    # --------------------------------------------------------------------------------- IMAP helpers

    @contextlib.contextmanager
    def imap(self, user: str | None = None) -> Iterator[imaplib.IMAP4]:
        """A logged-in ``imaplib.IMAP4`` connection (logged out afterwards)."""
        account = self._get_user(user)
        conn = imaplib.IMAP4(self.host, self.port, timeout=IMAP_TIMEOUT)
        try:
            conn.login(account.name, account.password)
            yield conn
        finally:
            with contextlib.suppress(imaplib.IMAP4.error, OSError):
                conn.logout()

    def capabilities(self, user: str | None = None) -> set[str]:
        """Capabilities the server announces after login."""
        with self.imap(user) as conn:
            data = _check(conn.capability(), "CAPABILITY")
        return set(self._decode(data[0]).upper().split())

    def greeting_capabilities(self) -> set[str]:
        """Capabilities in the pre-login greeting."""
        conn = imaplib.IMAP4(self.host, self.port, timeout=IMAP_TIMEOUT)
        try:
            return {c.upper() for c in conn.capabilities}
        finally:
            with contextlib.suppress(imaplib.IMAP4.error, OSError):
                conn.logout()

    def append(
        self,
        raw: bytes,
        folder: str = "INBOX",
        flags: str = "",
        *,
        user: str | None = None,
        internaldate: datetime | None = None,
    ) -> int:
        """APPEND ``raw`` to ``folder`` and return the new UID (from UIDPLUS APPENDUID).

        ``flags`` is e.g. ``r"\\Seen \\Flagged"``.  Note: imaplib turns bare LF / CR into CRLF.
        """
        date_time = imaplib.Time2Internaldate(internaldate) if internaldate is not None else None
        with self.imap(user) as conn:
            data = _check(conn.append(_quote_mailbox(folder), flags or None, date_time, raw), f"APPEND to {folder}")
        match = re.search(rb"\[APPENDUID (\d+) (\d+)\]", data[0] if isinstance(data[0], bytes) else b"")
        if match is None:
            raise DovecotError(f"no APPENDUID in APPEND response {data!r}")
        return int(match.group(2))

    def uids(self, folder: str = "INBOX", *, user: str | None = None) -> list[int]:
        with self.imap(user) as conn:
            if self._examine(conn, folder) == 0:
                return []
            data = _check(conn.uid("SEARCH", "ALL"), "UID SEARCH")
        return sorted(int(x) for x in self._decode(data[0]).split())

    def flags(self, folder: str = "INBOX", *, user: str | None = None) -> dict[int, set[str]]:
        """UID -> flags (without the session flag ``\\Recent``)."""
        result: dict[int, set[str]] = {}
        with self.imap(user) as conn:
            if self._examine(conn, folder) == 0:
                return result
            data = _check(conn.uid("FETCH", "1:*", "(UID FLAGS)"), "UID FETCH FLAGS")
        for item in data:
            line = item[0] if isinstance(item, tuple) else item
            if not isinstance(line, bytes):
                continue
            uid = re.search(rb"UID (\d+)", line)
            flags = re.search(rb"FLAGS \(([^)]*)\)", line)
            if uid is None or flags is None:
                continue
            result[int(uid.group(1))] = {f for f in flags.group(1).decode().split() if f != "\\Recent"}
        return result

    def fetch_all(self, folder: str = "INBOX", *, user: str | None = None) -> list[bytes]:
        """Raw messages (``BODY.PEEK[]``, so ``\\Seen`` is not set) in UID order."""
        return [raw for _uid, raw in sorted(self._fetch_bodies(folder, "1:*", user).items())]

    def fetch(self, uid: int, folder: str = "INBOX", *, user: str | None = None) -> bytes:
        """One raw message by UID."""
        bodies = self._fetch_bodies(folder, str(uid), user)
        if uid not in bodies:
            raise DovecotError(f"UID {uid} not found in {folder}")
        return bodies[uid]

    def create_folder(self, name: str, *, user: str | None = None) -> None:
        with self.imap(user) as conn:
            _check(conn.create(_quote_mailbox(name)), f"CREATE {name}")

    def folders(self, *, user: str | None = None) -> list[str]:
        """All mailbox names (decoded from modified UTF-7), sorted."""
        with self.imap(user) as conn:
            data = _check(conn.list('""', '"*"'), "LIST")
        names: list[str] = []
        for item in data:
            if isinstance(item, tuple):  # name sent as a literal
                names.append(imap_utf7_decode(item[1].decode()))
                continue
            if not isinstance(item, bytes):
                continue
            match = re.match(rb'^\([^)]*\) (?:NIL|"(?:[^"\\]|\\.)*") (.*)$', item)
            if match is None:
                raise DovecotError(f"cannot parse LIST response {item!r}")
            names.append(imap_utf7_decode(_unquote(match.group(1)).decode()))
        return sorted(names)

    def uidvalidity(self, folder: str = "INBOX", *, user: str | None = None) -> int:
        with self.imap(user) as conn:
            data = _check(conn.status(_quote_mailbox(folder), "(UIDVALIDITY)"), f"STATUS {folder}")
        match = re.search(rb"UIDVALIDITY (\d+)", data[0] if isinstance(data[0], bytes) else b"")
        if match is None:
            raise DovecotError(f"no UIDVALIDITY in {data!r}")
        return int(match.group(1))

    def reset_uidvalidity(self, folder: str = "INBOX", *, user: str | None = None) -> int:
        """Force a new UIDVALIDITY for ``folder``, keeping its mails (they get new UIDs from 1).

        Stops the server, deletes the folder's ``dovecot-uidlist`` and index files (and the mailbox
        list index, which caches UIDVALIDITY), and starts it again on the same port.  Dovecot then
        rescans the Maildir and picks a UIDVALIDITY larger than any it handed out before.  Flags
        survive (they are part of the Maildir file names; keywords are kept in dovecot-keywords).
        Returns the new UIDVALIDITY.
        """
        old = self.uidvalidity(folder, user=user)
        path = self.folder_path(folder, user=user)
        root = self._get_user(user).mail_dir
        self._terminate()
        for entry in path.iterdir():
            if entry.name == "dovecot-uidlist" or entry.name.startswith("dovecot.index"):
                entry.unlink()
        for entry in root.iterdir():
            if entry.name.startswith("dovecot.list.index"):
                entry.unlink()
        self._launch()
        new = self.uidvalidity(folder, user=user)
        if new == old:
            raise DovecotError(f"UIDVALIDITY of {folder} did not change ({old})")
        return new

    def log_text(self) -> str:
        """Dovecot's log (and early stderr), for debugging failed tests."""
        parts = []
        for path in (self.stderr_path, self.log_path):
            with contextlib.suppress(OSError):
                parts.append(path.read_text(errors="replace"))
        return "".join(parts)

    # ------------------------------------------------------------------------------------ internals

    @staticmethod
    def _first_existing_user(*names: str) -> str:
        for name in names:
            with contextlib.suppress(KeyError):
                return pwd.getpwnam(name).pw_name
        raise DovecotError(f"none of the users {names} exists")

    @staticmethod
    def _decode(value: object) -> str:
        if isinstance(value, bytes):
            return value.decode("utf-8", errors="replace")
        return "" if value is None else str(value)

    def _get_user(self, user: str | None) -> MailUser:
        name = self.user if user is None else user
        try:
            return self._users[name]
        except KeyError:
            raise KeyError(f"no such test user {name!r}") from None

    def _examine(self, conn: imaplib.IMAP4, folder: str) -> int:
        """Select ``folder`` read-only (keeps \\Recent for the real client); returns EXISTS."""
        data = _check(conn.select(_quote_mailbox(folder), readonly=True), f"EXAMINE {folder}")
        return int(self._decode(data[0]) or 0)

    def _fetch_bodies(self, folder: str, uid_set: str, user: str | None) -> dict[int, bytes]:
        bodies: dict[int, bytes] = {}
        with self.imap(user) as conn:
            if self._examine(conn, folder) == 0:
                return bodies
            data = _check(conn.uid("FETCH", uid_set, "(UID BODY.PEEK[])"), "UID FETCH BODY")
        for item in data:
            if not isinstance(item, tuple):
                continue
            match = re.search(rb"UID (\d+)", item[0])
            if match is not None:
                bodies[int(match.group(1))] = item[1]
        return bodies

    def _home_in_dovecot(self, user: MailUser) -> str:
        # As root the mail processes are chrooted into mail_root, so homes are relative to it.
        return f"/{user.name}" if self.is_root else str(user.home)

    def _write_passwd_file(self, user: MailUser) -> None:
        # One file per user (passdb path "users.d/%u"): Dovecot re-stats a single passwd-file at most
        # once per second, so a user appended to a shared file could not log in right away.
        path = self.passwd_dir / user.name
        tmp = self.passwd_dir / f".{user.name}.tmp"
        tmp.write_text(f"{user.name}:{{PLAIN}}{user.password}::::{self._home_in_dovecot(user)}::\n")
        tmp.chmod(0o600)
        os.replace(tmp, path)

    def _ensure_run_dir(self) -> Path:
        if self._run_dir is None:
            candidate = self.base_dir / "run"
            if len(str(candidate)) <= _MAX_RUN_DIR_LEN:
                candidate.mkdir(exist_ok=True)
                self._run_dir, self._own_run_dir = candidate, False
            else:  # unix socket paths would get too long
                self._run_dir = Path(tempfile.mkdtemp(prefix="dovecot-run-"))
                self._run_dir.chmod(0o755)  # what Dovecot wants for base_dir (it "fixes" it otherwise)
                self._own_run_dir = True
        return self._run_dir

    def _ensure_tls_files(self) -> TlsFiles:
        """Generate the CA and server certificate once per instance (restarts reuse them)."""
        if self._tls_files is None:
            self._tls_files = generate_tls_files(self.tls_dir, common_name=f"mailbridge test CA {self.instance_name}")
        return self._tls_files

    def _ssl_config_lines(self) -> list[str]:
        if not self.tls:
            return ["ssl = no"]
        files = self._ensure_tls_files()
        # No ssl_dh: without it Dovecot 2.3 just skips the (slow to generate) finite-field DHE
        # suites; ECDHE and TLSv1.3 do not need it.
        return [
            "ssl = yes",
            f"ssl_cert = <{files.cert_file}",
            f"ssl_key = <{files.key_file}",
            "ssl_min_protocol = TLSv1.2",
        ]

    def _imaps_listener(self) -> str:
        if not self.tls:
            return "  inet_listener imaps {\n    port = 0\n  }"
        return f"  inet_listener imaps {{\n    address = {HOST}\n    port = {self.tls_port}\n    ssl = yes\n  }}"

    def _write_config(self) -> None:
        run_dir = self._ensure_run_dir()
        lines = [
            "# Generated by tests/support/dovecot.py: a private test instance. Nothing from /etc/dovecot.",
            f"instance_name = {self.instance_name}",
            f"base_dir = {run_dir}",
            f"state_dir = {self.state_dir}",
            f"log_path = {self.log_path}",
            "protocols = imap",
            f"listen = {HOST}",
            *self._ssl_config_lines(),
            "disable_plaintext_auth = no",
            "auth_mechanisms = plain login" + (" xoauth2 oauthbearer" if self.oauth2_introspection_url else ""),
            "auth_failure_delay = 0",
            f"default_login_user = {self._login_user}",
            f"default_internal_user = {self._internal_user}",
            f"default_internal_group = {self._internal_group}",
            f"mail_uid = {self._mail_user}",
            f"mail_gid = {self._mail_group}",
            f"first_valid_uid = {self.mail_uid}",
            f"first_valid_gid = {self.mail_gid}",
            "mail_location = maildir:~/Maildir",
            "mail_max_userip_connections = 1000",
            "mailbox_idle_check_interval = 1 secs",
        ]
        if self.is_root:
            lines += [f"mail_chroot = {self.mail_root}", f"valid_chroot_dirs = {self.mail_root}"]
        if self._capability_override is not None:
            lines.append(f"imap_capability = {self._capability_override}")
        no_chroot = "" if self.is_root else "  chroot =\n"
        lines.append(
            f"""
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {self.passwd_dir}/%u
}}
{self._oauth2_passdb()}
userdb {{
  driver = passwd-file
  args = username_format=%u {self.passwd_dir}/%u
}}
service imap-login {{
{no_chroot}  inet_listener imap {{
    address = {HOST}
    port = {self.port}
  }}
{self._imaps_listener()}
}}
service anvil {{
{no_chroot}  # mode 0 disables the listener, which turns off the growing delay (2..15 s) after
  # failed logins from the same IP -- tests log in with wrong passwords on purpose.
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
"""
        )
        self.config_path.write_text("\n".join(lines))

    def _oauth2_passdb(self) -> str:
        """Dovecot 2.3's oauth2 passdb in RFC 7662 introspection mode (tried after the passwd-file one)."""
        if self.oauth2_introspection_url is None:
            return ""
        settings = self.base_dir / "dovecot-oauth2.conf.ext"
        settings.write_text(
            "\n".join(
                [
                    f"introspection_url = {self.oauth2_introspection_url}",
                    "introspection_mode = post",
                    "username_attribute = username",
                    "active_attribute = active",
                    "active_value = true",
                    "",
                ]
            )
        )
        return f"passdb {{\n  driver = oauth2\n  mechanisms = xoauth2 oauthbearer\n  args = {settings}\n}}"

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        for var in ("LISTEN_PID", "LISTEN_FDS", "NOTIFY_SOCKET", "DOVECOT_CONFIG"):
            env.pop(var, None)
        return env

    def _launch(self) -> None:
        binary = _dovecot_binary()
        if binary is None:
            raise DovecotError("dovecot is not installed")
        for attempt in range(5):
            self._write_config()
            with self.stderr_path.open("ab") as stderr:
                self._proc = subprocess.Popen(
                    [binary, "-c", str(self.config_path), "-F"],
                    stdin=subprocess.DEVNULL,
                    stdout=stderr,
                    stderr=stderr,
                    env=self._env(),
                    start_new_session=True,  # own process group: Ctrl-C in pytest doesn't hit it
                )
            atexit.register(self._terminate)
            try:
                self._wait_for_greeting()
                return
            except DovecotError as exc:
                self._terminate()
                if attempt < 4 and "Address already in use" in str(exc):
                    busy = {int(port) for port in _PORT_IN_USE.findall(str(exc))}
                    if self.tls and self.tls_port in busy:  # the IMAPS port is always picked automatically
                        self.tls_port = free_port()
                        if not self._auto_port or self.port not in busy:
                            continue
                    if self._auto_port:
                        self.port = free_port()
                        continue
                raise

    def _wait_for_greeting(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + START_TIMEOUT
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise DovecotError(f"dovecot exited with {self._proc.returncode} while starting:\n{self.log_text()}")
            try:
                with socket.create_connection((self.host, self.port), timeout=2) as sock:
                    greeting = sock.makefile("rb").readline()
                if greeting.startswith(b"* OK"):
                    if self.tls:
                        self._check_tls_greeting()
                    return
                last_error = DovecotError(f"unexpected greeting {greeting!r}")
            except OSError as exc:
                last_error = exc
            time.sleep(0.05)
        raise DovecotError(f"dovecot did not greet on port {self.port} ({last_error}):\n{self.log_text()}")

    def _check_tls_greeting(self) -> None:
        """Complete a verified TLS handshake on the IMAPS port and read the greeting."""
        assert self.tls_port is not None
        try:
            with (
                socket.create_connection((self.host, self.tls_port), timeout=IMAP_TIMEOUT) as raw,
                self.ssl_context().wrap_socket(raw, server_hostname=self.host) as sock,
            ):
                greeting = sock.makefile("rb").readline()
        except (OSError, ssl.SSLError) as exc:
            raise DovecotError(f"TLS handshake on port {self.tls_port} failed ({exc}):\n{self.log_text()}") from exc
        if not greeting.startswith(b"* OK"):
            raise DovecotError(f"unexpected IMAPS greeting {greeting!r}:\n{self.log_text()}")

    def _processes(self, master: int | None) -> dict[int, bytes]:
        """Live processes of this instance: pid -> process title (argv[0]).

        Matched by the child title ``dovecot-<instance>/...``, by the config path on the master's
        command line, and by parent / process group of ``master`` (children of a dead master are
        re-parented but keep the title and the process group).
        """
        config = str(self.config_path).encode()
        title_prefix = self._title_prefix.encode()
        found: dict[int, bytes] = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            pid = int(entry)
            info = _proc_info(pid)
            if info is None or pid == os.getpid():
                continue
            cmdline, ppid, pgid = info
            argv = cmdline.split(b"\0")
            if argv[0].startswith(title_prefix) or config in argv or (master is not None and master in (ppid, pgid)):
                found[pid] = argv[0].strip()
        return found

    def _signal_clients(self, master: int, sig: signal.Signals) -> list[int]:
        """Send ``sig`` to the processes serving clients (imap, imap-login); returns their pids."""
        client_titles = {f"{self._title_prefix}imap".encode(), f"{self._title_prefix}imap-login".encode()}
        victims = [pid for pid, title in self._processes(master).items() if title in client_titles]
        for pid in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        return victims

    def _terminate(self) -> None:
        """Stop the master and make sure no process of this instance survives.

        Dovecot 2.3's own shutdown is slow for tests: the master only SIGQUITs the imap processes
        (a client that stays connected keeps its session for ~10 more seconds after the master has
        gone), and it sleeps a hard-coded second before it exits.  So the client processes are
        terminated explicitly (they send ``* BYE Server shutting down.``), and once only the log
        process is left the master is killed instead of waiting for that second.
        """
        proc, self._proc = self._proc, None
        if proc is None:
            return
        master = proc.pid
        log_title = f"{self._title_prefix}log".encode()
        deadline = time.monotonic() + STOP_TIMEOUT
        if proc.poll() is None:
            self._signal_clients(master, signal.SIGTERM)
            proc.send_signal(signal.SIGTERM)
            while proc.poll() is None:
                self._signal_clients(master, signal.SIGTERM)  # clients may have connected meanwhile
                others = {title for pid, title in self._processes(master).items() if pid != master}
                if others <= {log_title}:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(master, signal.SIGKILL)
                    break
                if time.monotonic() > deadline:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(master, signal.SIGKILL)
                    break
                time.sleep(0.01)
            proc.wait(timeout=STOP_TIMEOUT)
        if self._run_dir is not None:
            with contextlib.suppress(FileNotFoundError):
                (self._run_dir / "master.pid").unlink()
        # What is left (normally just the log process, which exits once the master is gone) is now
        # re-parented; pids() still finds it by process group and title.
        deadline = time.monotonic() + STOP_TIMEOUT
        killed = False
        while True:
            self._signal_clients(master, signal.SIGTERM)
            left = sorted(self._processes(master))
            if not left:
                return
            if time.monotonic() > deadline:
                if killed:
                    raise DovecotError(f"dovecot processes {left} survived SIGKILL")
                for pid in left:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                killed = True
                deadline = time.monotonic() + STOP_TIMEOUT
            time.sleep(0.01)

    def _materialize(self, name: str) -> None:
        """Log in once so Dovecot creates the user's Maildir (INBOX)."""
        with self.imap(name) as conn:
            _check(conn.status("INBOX", "(MESSAGES)"), "STATUS INBOX")

    def _probe_capabilities_without_push(self) -> str:
        """The post-login capability list of this Dovecot build, minus IDLE and NOTIFY."""
        capabilities = _FALLBACK_CAPABILITIES
        doveadm = _doveadm_binary()
        if doveadm is not None:
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                out = subprocess.run(
                    [doveadm, "-c", str(self.config_path), "exec", "imap", "-u", self.user],
                    input=b"a LOGOUT\r\n",
                    capture_output=True,
                    timeout=20,
                    env=self._env(),
                    check=False,
                )
                match = re.search(rb"\[CAPABILITY ([^\]]+)\]", out.stdout)
                if match is not None:
                    capabilities = match.group(1).decode()
        return " ".join(c for c in capabilities.split() if c.upper() not in _PUSH_CAPABILITIES)
