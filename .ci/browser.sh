#!/usr/bin/env bash
# The browser suite: Debian's headless Chromium drives `crm-host demo` (simulated Microsoft
# services) through the operator's procedure. Installs what it needs.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x /usr/bin/chromium ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
(cd .ci/browser && npm install --no-audit --no-fund --silent)
cargo build -q -p crm-host
bin="${CARGO_TARGET_DIR:-target}/debug/crm-host"
work=$(mktemp -d)
port="${BROWSER_PORT:-18080}"
# Screenshots outlive the run (the demo's folder does not): kept beside the build.
shots="${SHOTS:-${CARGO_TARGET_DIR:-target}/browser-shots}"
mkdir -p "$shots" && rm -f "$shots"/*.png
shots="$(cd "$shots" && pwd)"
(cd "$work" && CRM_LOG=info exec "$bin" demo --bind "127.0.0.1:$port" >"$work/demo.log" 2>&1) &
demo=$!
trap 'kill $demo 2>/dev/null || true; wait $demo 2>/dev/null || true; rm -rf "$work"' EXIT
for _ in $(seq 1 60); do
  curl -fsS "http://127.0.0.1:$port/health" >/dev/null 2>&1 && break
  sleep 1
done
# demo.mjs first (it connects the shared mailbox), then every other suite in name order.
for suite in .ci/browser/demo.mjs $(ls .ci/browser/*.mjs | grep -v '/demo.mjs$' | sort); do
  echo "-- $suite"
  if ! DEMO_URL="http://127.0.0.1:$port" SHOTS="$shots" node "$suite"; then
    # The whole log is kept beside the screenshots; here, what the module did (not each request).
    cp "$work/demo.log" "$shots/demo.log"
    echo "--- the demo's log (requests left out; whole log: $shots/demo.log):"
    grep -v 'crm_host::http' "$work/demo.log" | tail -n 200
    echo "screenshots: $shots"
    exit 1
  fi
done
echo "screenshots: $shots"
