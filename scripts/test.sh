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
#
# Two PostgreSQL runs: the whole suite on $LILOTA_TEST_POSTGRES_URL or the local binaries
# (the container source switched off, so that tests which stop the server can), then the
# tests marked `containers` once more on a server in a Docker container. For that run
# Docker is installed (Debian's docker.io) and dockerd started when missing and possible;
# the image is postgres:16-alpine where it can be pulled, else one made without a registry
# by scripts/postgres-image.sh (cached). With CI set, a machine where Docker can run must
# do the container run; elsewhere it is skipped, saying why. LILOTA_TEST_CONTAINERS=0
# skips it on purpose.
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

# PgBouncer for the tests of lilota behind a transaction pooler.
if ! command -v pgbouncer >/dev/null && [ ! -x /usr/sbin/pgbouncer ]; then
    log "installing PgBouncer"
    apt_install pgbouncer || echo "could not install pgbouncer; its tests will report it" >&2
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

# Docker for the container run: the engine must answer; else install and start it.
docker_answers() { docker version --format '{{.Server.Version}}' >/dev/null 2>&1; }
docker_why_not=
start_docker() {
    command -v docker >/dev/null && docker_answers && return 0
    if [ -n "${DOCKER_HOST:-}" ]; then docker_why_not="DOCKER_HOST=$DOCKER_HOST does not answer"; return 1; fi
    if ! command -v dockerd >/dev/null || ! command -v docker >/dev/null; then
        log "installing Docker (docker.io)"
        apt_install docker.io || { docker_why_not="Docker is not installed and could not be installed"; return 1; }
    fi
    if [ "$(id -u)" != 0 ] && ! command -v sudo >/dev/null; then
        docker_why_not="dockerd is not running and starting it needs root"; return 1
    fi
    local dockerd_log=${TMPDIR:-/tmp}/lilota-dockerd.log
    log "starting dockerd (log: $dockerd_log)"
    # No bridge and no iptables rules: the test containers use the host network and listen
    # on 127.0.0.1 only, so the engine needs neither, and the host's firewall is left alone.
    as_root setsid dockerd --bridge=none --iptables=false --ip6tables=false \
        >"$dockerd_log" 2>&1 </dev/null &
    for _ in $(seq 60); do docker_answers && return 0; sleep 0.5; done
    tail -5 "$dockerd_log" >&2 || true
    docker_why_not="dockerd did not start (see $dockerd_log)"
    return 1
}

# The image of the container run: LILOTA_TEST_POSTGRES_IMAGE, else the official one if
# loaded or pullable, else one made here without a registry (cached by name and version).
postgres_image=
find_postgres_image() {
    local official=postgres:16-alpine
    if [ -n "${LILOTA_TEST_POSTGRES_IMAGE:-}" ]; then
        postgres_image=$LILOTA_TEST_POSTGRES_IMAGE
    elif docker image inspect "$official" >/dev/null 2>&1 \
        || timeout 120 docker pull -q "$official" >/dev/null 2>&1; then
        postgres_image=$official
    else
        log "$official cannot be pulled: the image of scripts/postgres-image.sh (made when missing)"
        postgres_image=$(bash scripts/postgres-image.sh) || return 1
    fi
}

container_run=
if [ "${LILOTA_TEST_CONTAINERS:-1}" = 0 ]; then
    docker_why_not="LILOTA_TEST_CONTAINERS=0"
else
    started=$SECONDS
    if start_docker; then
        log "Docker answers ($((SECONDS - started)) s); finding the PostgreSQL image"
        started=$SECONDS
        if ! find_postgres_image; then
            # Docker runs, so CI must test on it: no image is a failure, not a skip.
            echo "no PostgreSQL image for the container run (scripts/postgres-image.sh failed)" >&2
            exit 1
        fi
        container_run=1
        log "PostgreSQL image $postgres_image ready in $((SECONDS - started)) s"
    fi
fi
[ -n "$container_run" ] || log "no container run: Docker cannot run here ($docker_why_not)"

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

# The whole suite. Its PostgreSQL is $LILOTA_TEST_POSTGRES_URL or a local cluster (which
# tests that stop the server need); Docker only where there are no local binaries. The
# plugin's own container tests (tests/unit/test_testing_containers.py) use Docker in inner
# sessions; LILOTA_TEST_REQUIRE_DOCKER makes them fail rather than skip without it.
main_env=()
if [ -n "$container_run" ]; then
    main_env+=(LILOTA_TEST_REQUIRE_DOCKER=1 "LILOTA_TEST_POSTGRES_IMAGE=$postgres_image")
    if command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
        main_env+=(LILOTA_TEST_POSTGRES_DISABLE_DOCKER=1)
    fi
fi
log "pytest"
status=0
started=$SECONDS
env ${main_env[@]+"${main_env[@]}"} "$VENV/bin/python" -m pytest "$@" || status=$?
main_seconds=$((SECONDS - started))

container_seconds=0
if [ -n "$container_run" ]; then
    log "pytest, tests marked 'containers', once more on PostgreSQL in a container of $postgres_image"
    started=$SECONDS
    env -u LILOTA_TEST_POSTGRES_URL LILOTA_TEST_POSTGRES_DISABLE_LOCAL=1 \
        LILOTA_TEST_POSTGRES_DISABLE_DOCKER= "LILOTA_TEST_POSTGRES_IMAGE=$postgres_image" \
        "$VENV/bin/python" -m pytest -m "containers and postgres" --lilota-backend=postgres \
        tests/integration || status=$?
    container_seconds=$((SECONDS - started))
fi

log "PostgreSQL sources: whole suite ${main_seconds} s on $(
    if [ -n "${LILOTA_TEST_POSTGRES_URL:-}" ]; then echo "LILOTA_TEST_POSTGRES_URL";
    elif [[ " ${main_env[*]-} " == *DISABLE_DOCKER=1* ]]; then echo "local binaries";
    else echo "the first source that answered"; fi
); container run: $(
    if [ -n "$container_run" ]; then echo "${container_seconds} s on $postgres_image"; else echo "skipped ($docker_why_not)"; fi
)"
exit "$status"
