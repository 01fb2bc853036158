#!/usr/bin/env bash
# Make a PostgreSQL image for lilota's container tests without an image registry.
#
#   bash scripts/postgres-image.sh            # prints the image name when it is ready
#
# For machines that run Docker but cannot pull images (air-gapped CI): the image is built
# from Debian packages with debootstrap and loaded with `docker import`, no registry
# involved. It behaves like the official postgres image as far as the tests need: it honours
# POSTGRES_USER, POSTGRES_PASSWORD and POSTGRES_DB, and its arguments go to the server
# (`postgres -p 54321 -c fsync=off`). The container's server runs as the user postgres.
#
# The image is cached by name and version: when LILOTA_TEST_POSTGRES_IMAGE (default below)
# is already loaded, nothing is built. Building needs root, debootstrap (installed with apt
# when missing), a Debian mirror (LILOTA_DEBIAN_MIRROR) and one to three minutes.
#
# Then run the tests with that image:
#   LILOTA_TEST_POSTGRES_IMAGE=$(bash scripts/postgres-image.sh) pytest ...
# (lilota.testing also finds the default name below on its own when the official image is
# neither loaded nor pullable.)
set -euo pipefail

SUITE=${LILOTA_DEBIAN_SUITE:-bookworm}
PG_MAJOR=${LILOTA_POSTGRES_MAJOR:-15}
MIRROR=${LILOTA_DEBIAN_MIRROR:-http://deb.debian.org/debian}
# Bump RECIPE when the entrypoint or the packages below change: the tag is the cache key.
RECIPE=2
# Keep the default in step with lilota.pgcluster.LOCAL_IMAGE.
IMAGE=${LILOTA_TEST_POSTGRES_IMAGE:-lilota-postgres:$PG_MAJOR-$SUITE-r$RECIPE}

log() { printf '%s\n' "$*" >&2; }

command -v docker >/dev/null || { log "postgres-image: no docker command"; exit 1; }
if docker image inspect "$IMAGE" >/dev/null 2>&1; then
    echo "$IMAGE"
    exit 0
fi

if [ "$(id -u)" != 0 ]; then
    log "postgres-image: building $IMAGE needs root (debootstrap); run it with sudo"
    exit 1
fi

# One build at a time on this machine; a second caller waits and then finds the image.
exec 9>"${TMPDIR:-/tmp}/lilota-postgres-image.lock"
flock 9
if docker image inspect "$IMAGE" >/dev/null 2>&1; then
    echo "$IMAGE"
    exit 0
fi

if ! command -v debootstrap >/dev/null; then
    log "postgres-image: installing debootstrap"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null \
        || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null; }
fi

# The root file system is built in memory where there is room: dpkg syncs every file it
# unpacks, which on a disk makes the build about half as slow again (three minutes, not two,
# on a busy two-core machine). About 400 MB.
build_dir=${LILOTA_IMAGE_BUILD_DIR:-${TMPDIR:-/tmp}}
if [ -z "${LILOTA_IMAGE_BUILD_DIR:-}" ] && [ -d /dev/shm ] && [ -w /dev/shm ] \
    && [ "$(df -Pk /dev/shm | awk 'NR == 2 { print $4 }')" -gt 1048576 ]; then
    build_dir=/dev/shm
fi
root=$(mktemp -d "$build_dir/lilota-postgres-rootfs.XXXXXX")
# --one-file-system: never into a /proc or /dev that a stopped debootstrap left mounted.
trap 'rm -rf --one-file-system "$root"' EXIT
started=$(date +%s)
log "postgres-image: debootstrap $SUITE with postgresql-$PG_MAJOR from $MIRROR"
# The downloaded packages are kept (cache-dir) so that a new recipe rebuilds faster.
cache=${LILOTA_DEBOOTSTRAP_CACHE:-/var/cache/lilota-debootstrap}
mkdir -p "$cache"
if ! debootstrap --variant=minbase --include="postgresql-$PG_MAJOR" --cache-dir="$cache" \
    "$SUITE" "$root" "$MIRROR" \
    >"$root.log" 2>&1; then
    tail -20 "$root.log" >&2
    log "postgres-image: debootstrap failed (full log: $root.log)"
    exit 1
fi
rm -f "$root.log"

# What the official image's entrypoint does, in short: a new data directory gets the
# user, password and database from the environment; then the arguments go to postgres.
cat >"$root/usr/local/bin/docker-entrypoint.sh" <<EOF
#!/bin/sh
set -eu
bin=/usr/lib/postgresql/$PG_MAJOR/bin
EOF
cat >>"$root/usr/local/bin/docker-entrypoint.sh" <<'EOF'
: "${POSTGRES_USER:=postgres}"
: "${POSTGRES_DB:=$POSTGRES_USER}"
: "${PGDATA:=/var/lib/postgresql/data}"
if [ "${1:-postgres}" = postgres ]; then
    [ "$#" -eq 0 ] || shift
    if [ ! -s "$PGDATA/PG_VERSION" ]; then
        if [ -z "${POSTGRES_PASSWORD:-}" ]; then
            echo "docker-entrypoint: set POSTGRES_PASSWORD" >&2
            exit 1
        fi
        mkdir -p "$PGDATA"
        pwfile=$(mktemp)
        printf '%s\n' "$POSTGRES_PASSWORD" >"$pwfile"
        "$bin/initdb" -D "$PGDATA" -U "$POSTGRES_USER" --pwfile="$pwfile" \
            --auth-local=trust --auth-host=scram-sha-256 --locale=C.UTF-8 -E UTF8 --no-sync >/dev/null
        rm -f "$pwfile"
        echo "host all all all scram-sha-256" >>"$PGDATA/pg_hba.conf"
        echo "listen_addresses = '*'" >>"$PGDATA/postgresql.conf"
        if [ "$POSTGRES_DB" != postgres ]; then
            db=$(printf '%s' "$POSTGRES_DB" | sed 's/"/""/g')
            echo "CREATE DATABASE \"$db\"" | "$bin/postgres" --single -D "$PGDATA" -c fsync=off postgres >/dev/null
        fi
    fi
    exec "$bin/postgres" -D "$PGDATA" -k /tmp "$@"
fi
exec "$@"
EOF
chmod 755 "$root/usr/local/bin/docker-entrypoint.sh"
# Smaller image: no package lists, caches or docs.
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* \
    "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/locale/*

log "postgres-image: docker import $IMAGE"
tar -C "$root" -c . | docker import \
    --change 'USER postgres' \
    --change 'ENV PGDATA=/var/lib/postgresql/data' \
    --change "ENV PATH=/usr/lib/postgresql/$PG_MAJOR/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
    --change 'ENTRYPOINT ["/usr/local/bin/docker-entrypoint.sh"]' \
    --change 'CMD ["postgres"]' \
    --change 'EXPOSE 5432' \
    --message "lilota test PostgreSQL $PG_MAJOR ($SUITE, debootstrap, recipe $RECIPE)" \
    - "$IMAGE" >/dev/null
log "postgres-image: built $IMAGE in $(($(date +%s) - started)) s"
echo "$IMAGE"
