#!/usr/bin/env bash
# Install the project with its test dependencies and run the whole test suite.
# With HIE_TEST_DATABASE_URL (postgresql+asyncpg://…) set, every database test runs on
# PostgreSQL as well as on SQLite.
set -euo pipefail
cd "$(dirname "$0")/../.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[test]'
exec .venv/bin/python -m pytest "$@"
