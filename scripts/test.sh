#!/usr/bin/env bash
# Install everything and run lilota's whole test suite: lint, types, unit, property,
# integration (SQLite and PostgreSQL) and browser tests.
#
#   bash scripts/test.sh [pytest arguments...]
#
# PostgreSQL: the test plugin (lilota.testing) uses $LILOTA_TEST_POSTGRES_URL if set, else
# a container where Docker runs, else a throwaway cluster started from the PostgreSQL
# server binaries on this machine (installed here with apt when missing and possible).
# With CI set, a PostgreSQL test that cannot get a database fails instead of skipping.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${LILOTA_VENV:-.venv}

log() { printf '\n== %s\n' "$*" >&2; }

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else return 1; fi
}

apt_updated=
apt_install() {
    command -v apt-get >/dev/null || return 1
    if [ -z "$apt_updated" ]; then as_root apt-get update -qq || return 1; apt_updated=1; fi
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# PostgreSQL server binaries for the throwaway test cluster (not needed with a URL).
if [ -z "${LILOTA_TEST_POSTGRES_URL:-}" ] && ! command -v initdb >/dev/null \
    && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    log "installing PostgreSQL server binaries"
    apt_install postgresql || echo "could not install PostgreSQL; PostgreSQL tests will need LILOTA_TEST_POSTGRES_URL" >&2
fi

# `ip` (iproute2) for the network partition tests (root only: they make network namespaces).
if [ "$(id -u)" = 0 ] && ! command -v ip >/dev/null; then
    log "installing iproute2 for the network partition tests"
    apt_install iproute2 || echo "could not install iproute2; the partition tests will report it" >&2
fi

# Headless Chromium for the dashboard's browser tests.
if [ -f tests/e2e/requirements.txt ] || [ -d tests/e2e ]; then
    if ! command -v chromium >/dev/null && [ ! -x /usr/bin/chromium ]; then
        log "installing Chromium for the browser tests"
        apt_install chromium fonts-dejavu-core || echo "could not install chromium; browser tests will report it" >&2
    fi
fi

log "creating $VENV and installing lilota with its test dependencies"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
extras=dev
if grep -q '^dashboard *=' pyproject.toml; then extras="dev,dashboard"; fi
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".[$extras]"

log "ruff"
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .

log "import contracts (lint-imports)"
"$VENV/bin/lint-imports"

log "mypy --strict"
"$VENV/bin/mypy"

log "pytest"
"$VENV/bin/python" -m pytest "$@"
