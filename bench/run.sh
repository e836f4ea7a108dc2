#!/usr/bin/env bash
# Runs every benchmark of the microsoft_outlook module and rewrites BENCHMARKS.md at the
# repository root. Installs what the baselines need (Postfix's smtp-source without starting its
# daemon, wrk), starts PostgreSQL (.ci/postgres.sh), builds the release binaries, then runs
# `crm-bench all`. Extra arguments go to `crm-bench all` (e.g. --runs 5).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
started=$(date +%s)
export BENCH_STARTED=$started
export CARGO_TERM_COLOR=never

missing=()
if ! command -v smtp-source >/dev/null 2>&1 && [ ! -x /usr/sbin/smtp-source ]; then
  missing+=(postfix)
fi
if ! command -v wrk >/dev/null 2>&1; then
  missing+=(wrk)
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "== installing ${missing[*]} from Debian (Postfix's daemon is not started)"
  apt-get update -qq
  # A policy-rc.d that answers 101 keeps invoke-rc.d from starting Postfix during the install;
  # "No configuration" leaves it unconfigured. An existing policy-rc.d is put back afterwards.
  policy=/usr/sbin/policy-rc.d
  saved=""
  if [ -e "$policy" ]; then
    saved=$(mktemp)
    cp -p "$policy" "$saved"
  fi
  restore_policy() {
    if [ -n "$saved" ]; then mv -f "$saved" "$policy"; else rm -f "$policy"; fi
  }
  trap restore_policy EXIT
  printf '#!/bin/sh\nexit 101\n' >"$policy"
  chmod 755 "$policy"
  echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  restore_policy
  trap - EXIT
fi

echo "== PostgreSQL"
bash .ci/postgres.sh

echo "== release build (crm-bench, crm-host)"
target="${CARGO_TARGET_DIR:-$root/target}"
cargo build --release -p crm-bench -p crm-host

echo "== benchmarks"
"$target/release/crm-bench" all --out "$root/BENCHMARKS.md" --host-bin "$target/release/crm-host" "$@"
echo "== done in $(($(date +%s) - started)) s (build included); BENCHMARKS.md rewritten"
