#!/usr/bin/env bash
# Make the databases of earlier lilota 2 schema versions that the upgrade tests open
# (tests/fixtures/schema/v<N>.sqlite and v<N>.postgres.sql), with the lilota code of the
# last commit at each version: tasks in every status, a retried one and a deleted one.
#
#   bash scripts/make-schema-fixtures.sh [postgresql://postgres@127.0.0.1:5432] [version...]
set -euo pipefail
cd "$(dirname "$0")/.."
PG=${1:-postgresql://postgres@127.0.0.1:5432}
PYTHON=${PYTHON:-.venv/bin/python}
OUT=tests/fixtures/schema
mkdir -p "$OUT"
# version -> the last commit whose lilota wrote that schema version
declare -A COMMITS=([1]=e8fccec [2]=50416d6)
VERSIONS=("${@:2}")
[ ${#VERSIONS[@]} -gt 0 ] || VERSIONS=("${!COMMITS[@]}")
for version in "${VERSIONS[@]}"; do
    src=$(mktemp -d)
    git archive "${COMMITS[$version]}" lilota | tar -x -C "$src"
    psql "$PG/postgres" -qc "DROP DATABASE IF EXISTS lilota_schema_fixture" -c "CREATE DATABASE lilota_schema_fixture" >/dev/null
    rm -f "$src/v.sqlite"
    for url in "sqlite:///$src/v.sqlite" "postgresql+psycopg://${PG#postgresql://}/lilota_schema_fixture"; do
        (cd "$src" && PYTHONPATH="$src" "$OLDPWD/$PYTHON" -P - "$url" <<'PYEOF'
import sys
from datetime import timedelta
from lilota.store import NewTask, Outcome, TaskStore
store = TaskStore(sys.argv[1])
# Version 1 named a claim's attempt in each write, version 2 its fence.
key = "fence" if "fence" in Outcome.__dataclass_fields__ else "attempt"
store.ensure_schema()
ids = [store.add(NewTask(name="add", input='{"a": %d, "b": 2}' % i, max_attempts=2)) for i in range(5)]
claims = store.claim(worker_id="old-worker", names=["add"], limit=3, lease=timedelta(minutes=5))
done, failed, running = claims
store.finish([Outcome(id=done.id, status="completed", output='{"sum": 2}', **{key: getattr(done, key)})])
store.finish([Outcome(id=failed.id, status="failed", **{key: getattr(failed, key)},
                      exception='{"type": "ValueError", "message": "bad", "traceback": ""}')])
store.set_progress(running.id, getattr(running, key), 40)
store.cancel(ids[3])
store.dispose()
PYEOF
        )
    done
    cp "$src/v.sqlite" "$OUT/v$version.sqlite"
    pg_dump --no-owner --no-privileges --inserts "$PG/lilota_schema_fixture" | grep -v "^--\|^\\\\" \
        | grep -v '^SET \|^SELECT pg_catalog.set_config' | cat -s > "$OUT/v$version.postgres.sql"
    psql "$PG/postgres" -qc "DROP DATABASE lilota_schema_fixture WITH (FORCE)" >/dev/null
    rm -rf "$src"
    echo "wrote $OUT/v$version.sqlite and $OUT/v$version.postgres.sql"
done
