#!/usr/bin/env bash
# The whole test suite, as CI runs it. Installs what the tests need when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "formatting (cargo fmt --check)"
cargo fmt --all -- --check

step "lints (cargo clippy -D warnings)"
cargo clippy --workspace --all-targets -- -D warnings

step "tests"
if ! cargo nextest --version >/dev/null 2>&1; then
  echo "cargo-nextest not found; installing it"
  cargo install --locked cargo-nextest
fi
cargo nextest run --workspace --no-fail-fast
