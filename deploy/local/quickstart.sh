#!/usr/bin/env bash
# Install the exchange, start it on the embedded default (SQLite under .hie/), and run the demo
# exchange between two hospitals against it. The exchange keeps running until Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/../.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e .

.venv/bin/hie up &
up_pid=$!
trap 'kill -TERM "$up_pid" 2>/dev/null; wait "$up_pid" 2>/dev/null' EXIT INT TERM

for _ in $(seq 1 120); do
  [ -f .hie/up.json ] && break
  kill -0 "$up_pid" 2>/dev/null || { echo "hie up failed to start" >&2; exit 1; }
  sleep 0.5
done
[ -f .hie/up.json ] || { echo "the exchange did not come up in time" >&2; exit 1; }

echo
.venv/bin/hie demo
echo
echo "The exchange is still running (gateway http://127.0.0.1:8400). Ctrl-C stops it."
wait "$up_pid"
