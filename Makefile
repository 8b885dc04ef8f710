# The two quickstart commands: `make up` serves the test model on http://127.0.0.1:8000, `make test` runs every test.
MODEL ?= models/SmolLM2-135M-Instruct.Q4_1.gguf
CARGO ?= cargo

.PHONY: up test bench model setup check-deploy

setup:
	bash scripts/setup.sh

model:
	bash scripts/fetch-test-model.sh

## A whole local cluster on the test model: controller, one worker, gateway on :8000.
up: setup model
	$(CARGO) build --release --bin herd
	$(CARGO) run --release --bin herd -- up --model $(MODEL) --model-name smollm2

## Build everything in release (the binary is used by tests/), run all tests, then check deploy/
## (Kustomize overlays against the Kubernetes schema, Dockerfiles, compose, flags against the binary).
test: setup model
	$(CARGO) build --release --workspace --bins
	$(CARGO) test --release --workspace
	bash scripts/check-deploy.sh

## Only the deploy/ checks (needs a release build of herd for the flags check).
check-deploy:
	bash scripts/check-deploy.sh

## Prompt and decode speed of the engine alone on the test model, single stream and batched.
bench: setup model
	$(CARGO) run --release --bin herd -- bench --engine --model $(MODEL) --prompt-tokens 37 --max-tokens 128 --concurrency 8
