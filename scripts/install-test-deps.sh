#!/usr/bin/env bash
# Install the system packages the test-suite needs: the Dovecot IMAP server (dovecot-imapd, 2.3 on
# Debian 12), which tests/support/dovecot.py starts privately per test.
#
# Idempotent: does nothing when Dovecot with IMAP support is already installed.
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
        echo "error: need root (or sudo) to install dovecot-imapd" >&2
        exit 1
    fi
}

if have_dovecot_imap; then
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "error: apt-get not found; install Dovecot 2.3 with IMAP support (dovecot-imapd) manually" >&2
    exit 1
fi

echo "installing dovecot-imapd ..."
as_root apt-get update
# env(1) so that DEBIAN_FRONTEND survives sudo's environment reset.
as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y dovecot-imapd

if ! have_dovecot_imap; then
    echo "error: dovecot-imapd was installed but dovecot/imap was not found" >&2
    exit 1
fi

version="$(/usr/sbin/dovecot --version 2>/dev/null || dovecot --version)"
case "$version" in
    2.3.*) ;;
    *) echo "warning: dovecot $version installed; tests/support/dovecot.py supports Dovecot 2.3 only" >&2 ;;
esac
