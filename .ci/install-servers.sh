#!/usr/bin/env bash
# Install the servers the test suite starts: PostgreSQL, etcd + Patroni, pg_auto_failover.
#
#   * Debian packages: etcd-server (/usr/bin/etcd) and postgresql-15-auto-failover
#     (/usr/bin/pg_autoctl plus the monitor extension for PostgreSQL 15), and
#     prometheus (/usr/bin/prometheus; its service is not started, as for etcd).
#   * A Patroni venv at $PATRONI_VENV, built from the system /usr/bin/python3 so the
#     `postgres` user can run it (pyenv's Python under /root is unreadable to it).
#
# Idempotent: does nothing that is already done. Must run as root.
set -euo pipefail

PATRONI_VENV="${PICOPOOL_PATRONI_VENV:-/opt/picopool-ha/patroni-venv}"
PG_MAJOR="${PICOPOOL_PG_MAJOR:-15}"
# prometheus: the real server the observability tests scrape the pool with;
# pgbouncer: tests/test_pgbouncer.py and the benches; pgpool2: bench/compare.py
DEB_PACKAGES=("postgresql-${PG_MAJOR}" etcd-server "postgresql-${PG_MAJOR}-auto-failover" python3-venv
              prometheus pgbouncer pgpool2)
PATRONI_REQUIREMENTS=("patroni[etcd3,psycopg3]" "psycopg[binary]")

log() { printf 'install-servers: %s\n' "$*" >&2; }

if [[ $(id -u) -ne 0 ]]; then
    log "must run as root (installs Debian packages and writes ${PATRONI_VENV})"
    exit 1
fi

missing=()
for package in "${DEB_PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$package")
    fi
done

if ((${#missing[@]})); then
    log "installing ${missing[*]}"
    # The etcd package would start a system etcd on the default ports. Tests run
    # their own, so keep package scripts from starting services (policy-rc.d
    # answering 101 means "not allowed"), unless the image already forbids it.
    temporary_policy=""
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        temporary_policy=/usr/sbin/policy-rc.d
        printf '#!/bin/sh\nexit 101\n' >"$temporary_policy"
        chmod 755 "$temporary_policy"
        trap 'rm -f "$temporary_policy"' EXIT
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
    if [[ -n "$temporary_policy" ]]; then
        rm -f "$temporary_policy"
        trap - EXIT
    fi
fi

# The package enables (and with systemd running, starts) a system etcd on the
# default ports. Tests run their own, so stop and disable it. `systemctl disable`
# works without a running systemd: it only removes the symlinks.
if command -v systemctl >/dev/null; then
    if [[ -d /run/systemd/system ]]; then
        systemctl stop etcd.service >/dev/null 2>&1 || true
    fi
    systemctl disable etcd.service >/dev/null 2>&1 || true
elif command -v update-rc.d >/dev/null && [[ -e /etc/init.d/etcd ]]; then
    update-rc.d etcd disable >/dev/null 2>&1 || true
fi

for binary in /usr/sbin/pgbouncer /usr/sbin/pgpool /usr/bin/etcd /usr/bin/pg_autoctl "/usr/lib/postgresql/${PG_MAJOR}/lib/pgautofailover.so" \
        /usr/bin/prometheus; do
    if [[ ! -e "$binary" ]]; then
        log "expected $binary after the install, but it is missing"
        exit 1
    fi
done

# The venv is complete when Patroni runs and its etcd3 DCS and psycopg import.
if ! "${PATRONI_VENV}/bin/patroni" --version >/dev/null 2>&1 \
    || ! "${PATRONI_VENV}/bin/python" -c "import patroni.dcs.etcd3, psycopg" >/dev/null 2>&1; then
    log "building the Patroni venv at ${PATRONI_VENV}"
    rm -rf "$PATRONI_VENV"
    mkdir -p -m 755 "$(dirname "$PATRONI_VENV")"
    /usr/bin/python3 -m venv "$PATRONI_VENV"
    "${PATRONI_VENV}/bin/pip" install -q --disable-pip-version-check "${PATRONI_REQUIREMENTS[@]}"
fi
# Readable and executable by the postgres user, whatever umask root had; and
# check it really is (a parent directory might not let that user through).
chmod -R a+rX "$PATRONI_VENV"
if ! runuser -u postgres -- "${PATRONI_VENV}/bin/patroni" --version >/dev/null 2>&1; then
    log "the postgres user cannot run ${PATRONI_VENV}/bin/patroni: make its parent directories world-searchable"
    exit 1
fi

log "ready: etcd $(/usr/bin/etcd --version | head -n1 | awk '{print $3}'), $("${PATRONI_VENV}/bin/patroni" --version), $(/usr/bin/pg_autoctl version 2>/dev/null | head -n1)"
