#!/usr/bin/env bash
# The whole test suite, as CI runs it. Installs what the tests need when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

# Debian package installs, as root or through sudo.
apt_install() {
  local sudo=""
  if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null || { echo "need root or sudo to install: $*" >&2; exit 1; }
    sudo="sudo"
  fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >/dev/null
}

step "test dependencies"
# Broker tests start their own nats-server on a random port.
if ! command -v nats-server >/dev/null && [ ! -x /usr/sbin/nats-server ]; then
  echo "nats-server not found; installing the Debian package"
  apt_install nats-server
fi
echo "nats-server: $( (command -v nats-server || echo /usr/sbin/nats-server) )"

# Kafka tests start their own tansu broker (Kafka protocol, in-memory storage). Built from
# crates.io the first time: several minutes on two cores.
tansu_bin="${TANSU_BIN:-$(command -v tansu || echo "${CARGO_HOME:-$HOME/.cargo}/bin/tansu")}"
if [ ! -x "$tansu_bin" ]; then
  echo "tansu not found; installing it (cargo install --locked tansu --features dynostore,libsql)"
  cargo install --locked tansu --features dynostore,libsql
fi
echo "tansu: $tansu_bin"

# The PostgreSQL sink tests create a database of their own per test on the server named by
# CONVEYOR_TEST_POSTGRES_URL: the machine's (127.0.0.1:5432, trust auth) when it answers, else
# a private one started here (initdb in a temp dir, a random port), stopped when the suite ends.
if ! command -v psql >/dev/null; then
  echo "psql not found; installing the Debian package postgresql-client"
  apt_install postgresql-client
fi
if [ -z "${CONVEYOR_TEST_POSTGRES_URL:-}" ]; then
  if psql "postgres://postgres@127.0.0.1:5432/postgres" -XAtqc "select 1" >/dev/null 2>&1; then
    export CONVEYOR_TEST_POSTGRES_URL="postgres://postgres@127.0.0.1:5432/postgres"
  else
    pg_bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
    if [ -z "$pg_bin" ]; then
      echo "no PostgreSQL answers on 127.0.0.1:5432 and none is installed; installing the Debian package postgresql"
      apt_install postgresql
      pg_bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
    fi
    pg_dir=$(mktemp -d)
    pg_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    pg_user=$(id -un)
    # initdb refuses to run as root: the private server runs as the user `postgres` then.
    if [ "$(id -u)" = 0 ]; then
      id postgres >/dev/null 2>&1 || useradd --system --no-create-home postgres
      chown postgres "$pg_dir"
      as_pg() { su postgres -s /bin/sh -c "$*"; }
      pg_user=postgres
    else
      as_pg() { sh -c "$*"; }
    fi
    as_pg "$pg_bin/initdb -D $pg_dir/data -U $pg_user --auth=trust -E UTF8 >/dev/null"
    as_pg "$pg_bin/pg_ctl -D $pg_dir/data -o '-p $pg_port -k $pg_dir -c listen_addresses=127.0.0.1' -l $pg_dir/log -w start >/dev/null"
    trap 'as_pg "$pg_bin/pg_ctl -D $pg_dir/data -m fast stop" >/dev/null 2>&1 || true' EXIT
    export CONVEYOR_TEST_POSTGRES_URL="postgres://$pg_user@127.0.0.1:$pg_port/postgres"
  fi
fi
echo "PostgreSQL for the tests: $CONVEYOR_TEST_POSTGRES_URL"

# observability test dependencies
# promtool (Debian package `prometheus`) checks live /metrics output, the scrape configs and
# the alert rules (crates/conveyor/tests/it/observability/).
if ! command -v promtool >/dev/null; then
  echo "promtool not found; installing the Debian package prometheus"
  apt_install --no-install-recommends prometheus
fi
echo "promtool: $(command -v promtool)"
# The live dashboard test drives the system's Chromium with playwright-core (npm).
if ! command -v chromium >/dev/null && [ ! -x /usr/bin/chromium ]; then
  echo "chromium not found; installing the Debian package"
  apt_install chromium
fi
if ! command -v npm >/dev/null; then
  echo "node/npm not found; installing the Debian packages"
  apt_install nodejs npm
fi
if [ ! -d tests/browser/node_modules/playwright-core ]; then
  echo "installing the browser test's npm dependencies (tests/browser)"
  (cd tests/browser && npm ci --no-audit --no-fund)
fi
# end of observability test dependencies

# Python test tools, each in a venv under the target dir made from its requirements file
# (made again when the file changes): python_venv NAME REQUIREMENTS.
python_venv() {
  local venv="${CARGO_TARGET_DIR:-target}/$1" requirements=$2
  if cmp -s "$requirements" "$venv/requirements.txt"; then
    return
  fi
  if ! command -v python3 >/dev/null; then
    echo "python3 not found; installing the Debian packages"
    apt_install python3 python3-venv
  fi
  echo "installing $requirements into $venv"
  rm -rf "$venv"
  if ! python3 -m venv "$venv"; then
    echo "python3 -m venv failed; installing the Debian package python3-venv"
    apt_install python3-venv
    python3 -m venv "$venv"
  fi
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$requirements"
  cp "$requirements" "$venv/requirements.txt"
}

# The gRPC ecosystem test (crates/conveyor/tests/it/grpc_ecosystem.rs) asks conveyor's health
# and reflection services with the gRPC project's Python client.
python_venv grpc-venv tests/grpc/requirements.txt
grpc_venv="${CARGO_TARGET_DIR:-target}/grpc-venv"
echo "gRPC test client: $grpc_venv ($("$grpc_venv/bin/python" -m pip freeze | grep -E '^grpcio==' || true))"

# The S3 sink tests start their own moto_server (PyPI moto[server], a real S3 wire protocol
# server) on a random port.
python_venv s3-venv tests/s3/requirements.txt
echo "S3 test server: ${CARGO_TARGET_DIR:-target}/s3-venv/bin/moto_server"

step "formatting (cargo fmt --check)"
cargo fmt --all -- --check

step "lints (cargo clippy -D warnings)"
cargo clippy --workspace --all-targets -- -D warnings

step "dependency policy (cargo deny: licences, bans, sources; deny.toml)"
# Advisories are left out: the RustSec database is fetched from GitHub, which the build
# machines cannot reach (see deny.toml).
if ! cargo deny --version >/dev/null 2>&1; then
  echo "cargo-deny not found; installing it (cargo install --locked cargo-deny: ~8 min on two cores)"
  cargo install --locked cargo-deny
fi
cargo deny --log-level error check licenses bans sources

step "memory-only build (cargo build --no-default-features)"
# The broker backends are cargo features of the binary; without them it must build, link
# neither librdkafka nor the NATS client, and refuse a broker QUEUE_TYPE naming the feature.
if cargo tree -p conveyor --no-default-features -e normal | grep -E "rdkafka|async-nats"; then
  echo "the memory-only build still depends on a broker client (above)" >&2
  exit 1
fi
cargo build -q -p conveyor --no-default-features
set +e
refusal=$(timeout 20 target/debug/conveyor run --queue-type kafka --host 127.0.0.1 --port 0 2>&1)
code=$?
set -e
if [ "$code" != 64 ] || ! grep -q "cargo feature \`kafka\`" <<<"$refusal"; then
  echo "a memory-only conveyor given QUEUE_TYPE=kafka must exit 64 naming the feature; got $code: $refusal" >&2
  exit 1
fi
echo "memory-only binary: no broker clients; QUEUE_TYPE=kafka refused (exit 64)"

step "tests"
if ! cargo nextest --version >/dev/null 2>&1; then
  echo "cargo-nextest not found; installing it"
  cargo install --locked cargo-nextest
fi
cargo nextest run --workspace --no-fail-fast
