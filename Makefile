# Task runner; CI runs `make test` through .ci/run.
.PHONY: demo test lint fmt build bench bench-e2e soak

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

## Micro-benchmarks (criterion; allocation counts printed first).
bench:
	cargo bench -p conveyor-queue --bench memory_queue
	cargo bench -p conveyor-processor --bench worker_pool
	cargo bench -p conveyor-core --bench decode
	cargo bench -p conveyor-pipeline --bench stages
	cargo bench -p conveyor-proto --bench protobuf
	cargo bench -p conveyor-queue-nats --bench nats_path
	cargo bench -p conveyor-queue-kafka --bench kafka_path
	cargo bench -p conveyor-sink --bench file
	cargo bench -p conveyor-sink-postgres --bench insert
	cargo bench -p conveyor-sink-http --bench send
	cargo bench -p conveyor-sink-nats --bench publish

## End-to-end benchmark: ceiling, run, split, NATS, scaling; appends to BENCHMARKS.md.
bench-e2e:
	bash scripts/bench-e2e.sh

## Soak (not in CI): steady open-loop load for SOAK_MINUTES (15) on the memory queue and on NATS;
## samples RSS, CPU and latency every second and fails on RSS growth or p99 drift after warm-up.
soak:
	cargo build --release -p conveyor
	python3 scripts/soak.py
