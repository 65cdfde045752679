# specd: one entry point per job. `make run` and `make test` work on a fresh machine.
SHELL := /bin/bash
export CARGO_TARGET_DIR ?= $(HOME)/.cache/specd/target
export SPECD_MODEL_CACHE ?= $(HOME)/.cache/specd/models
CARGO ?= cargo
SPECD := $(CARGO_TARGET_DIR)/release/specd
PROMPT ?= Write a Python function that checks whether a number is prime.

.PHONY: all setup models build run test test-fast bench lint fmt clean

all: build

setup:
	@scripts/setup.sh

models:
	@scripts/fetch-models.sh all

build: setup
	$(CARGO) build --release -p specd

# The main job on one machine: fetch the models if missing, then generate with speculation.
run: models build
	$(SPECD) generate --model-preset qwen --drafter auto --prompt "$(PROMPT)" --max-new-tokens 256

# Everything CI runs: hermetic tests, then the real-model tests (models fetched, sha256-checked).
test: setup models
	$(CARGO) test --release --workspace

# Hermetic tests only (no model files needed).
test-fast: setup
	SPECD_MODELS_DIR=/nonexistent $(CARGO) test --release --workspace

bench: models build
	$(SPECD) bench --model-preset qwen

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --release --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

clean:
	$(CARGO) clean
