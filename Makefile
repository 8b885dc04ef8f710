# The two quickstart commands: `make up` runs herd on the test model, `make test` runs every test.
MODEL ?= models/SmolLM2-135M-Instruct.Q4_1.gguf
CARGO ?= cargo

.PHONY: up test bench model setup

setup:
	bash scripts/setup.sh

model:
	bash scripts/fetch-test-model.sh

## Chat with the test model in the terminal.
up: setup model
	$(CARGO) build --release --bin herd
	$(CARGO) run --release --bin herd -- chat --model $(MODEL)

## Build everything in release (the binary is used by tests/) and run all tests.
test: setup model
	$(CARGO) build --release --workspace --bins
	$(CARGO) test --release --workspace

## Single-stream decode speed on the test model.
bench: setup model
	$(CARGO) bench -p herd-worker --bench decode
