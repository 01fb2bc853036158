#!/usr/bin/env bash
# Make the lilota 1.x databases the upgrade tests open (tests/fixtures/lilota1x/), with the
# real lilota 1.4.0 from PyPI (it needs Python >= 3.12): a SQLite file and a plain-SQL dump
# of a PostgreSQL database, each holding tasks in every 1.x status. Run it again only to
# refresh them (the tests read the committed files; they do not need Python 3.12).
#
#   bash scripts/make-1x-fixtures.sh [postgresql://postgres@127.0.0.1:5432]
set -euo pipefail
cd "$(dirname "$0")/.."
PG=${1:-postgresql://postgres@127.0.0.1:5432}
PY312=${PY312:-$(command -v python3.12 || ls /root/.pyenv/versions/3.12*/bin/python3.12 2>/dev/null | head -1)}
OUT=tests/fixtures/lilota1x
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"; psql "$PG/postgres" -qc "DROP DATABASE IF EXISTS lilota_1x_fixture WITH (FORCE)" >/dev/null 2>&1 || true' EXIT

"$PY312" -m venv "$WORK/venv"
"$WORK/venv/bin/pip" install -q --disable-pip-version-check "lilota==1.4.0" "psycopg[binary]"

psql "$PG/postgres" -qc "CREATE DATABASE lilota_1x_fixture" >/dev/null
for url in "sqlite:///$WORK/lilota-1.4.0.sqlite" \
           "postgresql+psycopg://${PG#postgresql://}/lilota_1x_fixture"; do
    "$WORK/venv/bin/python" -P - "$url" <<'PYEOF'
import logging, sys
from datetime import timedelta
from lilota.db.alembic import upgrade_db
from lilota.models import TaskProgress
from lilota.stores import TaskStore

url = sys.argv[1]
upgrade_db(url)
store = TaskStore(url, logging.getLogger("fixture"))
def task(name, input, status):
    task_id = store.create_task(name, input)
    if status == "created":
        return
    store.start_task(task_id, max_attempts=1)
    if status == "running":
        store.set_progress(task_id, 40)
    elif status == "completed":
        store.end_task_success(task_id, {"sum": input["a"] + input["b"]}, TaskProgress(task_id, store.set_progress))
    elif status == "failed":
        error = {"type": "ValueError", "message": "b must be positive",
                 "traceback": "Traceback (most recent call last):\n  ...\nValueError: b must be positive\n"}
        store.end_task_failure(task_id, error, TaskProgress(task_id, store.set_progress))
task("add", {"a": 1, "b": 2}, "completed")
task("add", {"a": 5, "b": -1}, "failed")
task("add", {"a": 7, "b": 8}, "created")
task("report", {"month": "2026-10"}, "running")
task("add", {"a": 2, "b": 3}, "completed")
PYEOF
done
cp "$WORK/lilota-1.4.0.sqlite" "$OUT/lilota-1.4.0.sqlite"
pg_dump --no-owner --no-privileges --inserts "$PG/lilota_1x_fixture" | grep -v "^--\|^\\\\" | grep -v '^SET \|^SELECT pg_catalog.set_config' | cat -s > "$OUT/lilota-1.4.0.postgres.sql"
echo "wrote $OUT/lilota-1.4.0.sqlite and $OUT/lilota-1.4.0.postgres.sql"
