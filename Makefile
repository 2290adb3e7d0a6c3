# Task runner; CI runs `make test` through .ci/run.
.PHONY: demo test lint fmt build

## Run the whole system in one process (memory queue) on :8080 and print where to look.
demo:
	cargo run -p conveyor -- run --host 127.0.0.1

## Everything CI checks: formatting, lints, and every test (installs what the tests need).
test:
	bash scripts/test.sh

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

fmt:
	cargo fmt --all

build:
	cargo build --workspace
