#!/usr/bin/env bash
# Install the system packages the test-suite needs: the Dovecot IMAP server (dovecot-imapd, 2.3 on
# Debian 12), which tests/support/dovecot.py starts privately per test, PostgreSQL, of which
# tests/support/postgres.py starts a private cluster (initdb/pg_ctl in a temp dir), and Chromium, in which
# tests/test_reports.py opens the HTML report (headless, over the DevTools protocol).
#
# Idempotent: installs only what is missing.
#
# If the package starts a system-wide Dovecot (systemd, /etc/dovecot, /run/dovecot, ports 143/993),
# that is harmless: the test instances use their own config, base_dir and a free port on 127.0.0.1
# and never read /etc/dovecot.
set -euo pipefail

have_dovecot_imap() {
    local dovecot=""
    if [ -x /usr/sbin/dovecot ]; then
        dovecot=/usr/sbin/dovecot
    elif command -v dovecot >/dev/null 2>&1; then
        dovecot="$(command -v dovecot)"
    else
        return 1
    fi
    # dovecot-core alone has no IMAP server; the imap binaries come with dovecot-imapd.
    local libexec
    libexec="$(doveconf -c /dev/null -h libexec_dir 2>/dev/null || true)"
    libexec="${libexec:-/usr/lib/dovecot}"
    [ -x "$libexec/imap" ] && [ -x "$libexec/imap-login" ] || return 1
    echo "dovecot $("$dovecot" --version) with IMAP is already installed ($dovecot)"
}

as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        echo "error: need root (or sudo) to install the test packages" >&2
        exit 1
    fi
}

have_chromium() {
    command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1
}

have_postgres_server() {
    compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || command -v initdb >/dev/null 2>&1
}

missing=()
have_dovecot_imap || missing+=(dovecot-imapd)
if have_postgres_server; then
    echo "PostgreSQL server binaries are already installed"
else
    missing+=(postgresql)
fi
if have_chromium; then
    echo "chromium is already installed ($(command -v chromium || command -v chromium-browser))"
else
    missing+=(chromium)
fi
if [ "${#missing[@]}" -eq 0 ]; then
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "error: apt-get not found; install ${missing[*]} manually (Dovecot 2.3 with IMAP support, Chromium)" >&2
    exit 1
fi

echo "installing ${missing[*]} ..."
as_root apt-get update
# env(1) so that DEBIAN_FRONTEND survives sudo's environment reset.
as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}"

if ! have_dovecot_imap; then
    echo "error: dovecot-imapd was installed but dovecot/imap was not found" >&2
    exit 1
fi
if ! have_postgres_server; then
    echo "error: postgresql was installed but initdb was not found" >&2
    exit 1
fi
if ! have_chromium; then
    echo "error: chromium was installed but is not on PATH" >&2
    exit 1
fi

version="$(/usr/sbin/dovecot --version 2>/dev/null || dovecot --version)"
case "$version" in
    2.3.*) ;;
    *) echo "warning: dovecot $version installed; tests/support/dovecot.py supports Dovecot 2.3 only" >&2 ;;
esac
