#!/usr/bin/env bash
# Installs PostgreSQL from Debian (if missing), starts the cluster, and makes the role `crm` and
# the database `crm_test`. Idempotent: a cluster left running by a previous run is reused.
set -euo pipefail
if ! command -v pg_ctlcluster >/dev/null 2>&1 || ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
fi
version=$(ls /usr/lib/postgresql | sort -n | tail -1)
if ! pg_lsclusters -h | awk '{print $1" "$2}' | grep -q "^$version main$"; then
  pg_createcluster "$version" main >/dev/null
fi
pg_ctlcluster "$version" main start 2>/dev/null || true
for _ in $(seq 1 30); do
  su postgres -c "psql -qtAc 'SELECT 1'" >/dev/null 2>&1 && break
  sleep 1
done
su postgres -c "psql -qc \"CREATE ROLE crm LOGIN PASSWORD 'crm' CREATEDB\"" 2>/dev/null || true
# So that the benchmarks' DROP DATABASE ... WITH (FORCE) may end an autovacuum worker on it.
su postgres -c "psql -qc 'GRANT pg_signal_backend TO crm'" >/dev/null 2>&1 || true
su postgres -c "createdb -O crm crm_test" 2>/dev/null || true
# Databases left by earlier test runs (one per test) are dropped so the cluster does not grow.
for db in $(su postgres -c "psql -qtAc \"SELECT datname FROM pg_database WHERE datname LIKE 't\\_%'\""); do
  su postgres -c "dropdb --if-exists $db" >/dev/null 2>&1 || true
done
echo "PostgreSQL $version ready on 127.0.0.1:5432"
