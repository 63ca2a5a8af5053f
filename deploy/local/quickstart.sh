#!/usr/bin/env bash
# Install the exchange, start it on the embedded default (SQLite under .hie/), and run the demo
# exchange between two hospitals against it. The exchange keeps running until Ctrl-C.
#
# Overrides (e.g. for a second exchange on one machine, or CI): HIE_DATA_DIR, HIE_GATEWAY_PORT,
# HIE_SERVICE_BASE_PORT, HIE_MLLP_PORT (all read by `hie up`); QUICKSTART_VENV (default .venv);
# QUICKSTART_SKIP_INSTALL=1 uses the installed venv as is; QUICKSTART_EXIT_AFTER_DEMO=1 stops the
# exchange after the demo.
set -euo pipefail
cd "$(dirname "$0")/../.."

PYTHON=${PYTHON:-python3}
venv=${QUICKSTART_VENV:-.venv}
if [ ! -x "$venv/bin/python" ]; then
  "$PYTHON" -m venv "$venv"
fi
if [ "${QUICKSTART_SKIP_INSTALL:-0}" != 1 ]; then
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  "$venv/bin/python" -m pip install --quiet -e .
fi
hie="$venv/bin/hie"

export HIE_DATA_DIR=${HIE_DATA_DIR:-.hie}
gateway_url="http://127.0.0.1:${HIE_GATEWAY_PORT:-8400}"

"$hie" up --hint "the quick start runs the demo now" &
up_pid=$!
stop() {
  trap - EXIT INT TERM
  kill -TERM "$up_pid" 2>/dev/null || true
  wait "$up_pid" 2>/dev/null || true
}
trap stop EXIT
trap 'stop; exit 130' INT
trap 'stop; exit 143' TERM

# Ready means the gateway answers /readyz, asked directly; a file left by an earlier run means nothing.
ready=0
for _ in $(seq 1 180); do
  kill -0 "$up_pid" 2>/dev/null || { wait "$up_pid" || true; echo "hie up did not start (see above)" >&2; exit 1; }
  if "$hie" status --gateway-url "$gateway_url" >/dev/null 2>&1; then
    ready=1
    break
  fi
  sleep 0.5
done
[ "$ready" = 1 ] || { echo "the exchange did not come up in time" >&2; exit 1; }

echo
"$hie" demo --gateway-url "$gateway_url"
echo
if [ "${QUICKSTART_EXIT_AFTER_DEMO:-0}" = 1 ]; then
  exit 0
fi
echo "The exchange is still running (gateway $gateway_url). Ctrl-C stops it."
wait "$up_pid"
