# specd: one entry point per job. `make run` and `make test` work on a fresh machine.
SHELL := /bin/bash
export CARGO_TARGET_DIR ?= $(HOME)/.cache/specd/target
export SPECD_MODEL_CACHE ?= $(HOME)/.cache/specd/models
CARGO ?= cargo
SPECD := $(CARGO_TARGET_DIR)/release/specd
PROMPT ?= Write a Python function that checks whether a number is prime.

.PHONY: all setup models build run generate test test-fast test-deploy cluster cluster-down bench bench-kernels bench-anchor bench-cluster loadtest demo-osd lint fmt clean

all: build

setup:
	@scripts/setup.sh

models:
	@scripts/fetch-models.sh all

build: setup
	$(CARGO) build --release -p specd

GRPC_ADDR ?= 127.0.0.1:50051
HTTP_ADDR ?= 127.0.0.1:8080

# The main job on one machine: fetch the models if missing, then serve a whole cluster (router, drafter
# worker, target worker, embedded coordination store) until Ctrl-C.
run: models build
	$(SPECD) up --model-preset qwen --grpc-addr $(GRPC_ADDR) --http-addr $(HTTP_ADDR)

# One prompt through the single-process engine, text to stdout.
generate: models build
	$(SPECD) generate --model-preset qwen --drafter auto --prompt "$(PROMPT)" --max-new-tokens 256

# Everything CI runs: hermetic tests, then the real-model tests (models fetched, sha256-checked). A
# missing model file fails its test here instead of skipping it.
test: setup models
	SPECD_REQUIRE_MODELS=1 $(CARGO) test --release --workspace
	$(MAKE) --no-print-directory test-deploy

# Deployment files against the binary: the Helm chart (lint, golden renders, kubernetes-validate,
# schema sync, every container's flags through --check-config), Dockerfile, compose, dashboard and
# alert rules (hadolint, promtool), and a multi-process cluster losing a drafter and a target.
test-deploy: setup
	@scripts/setup-deploy-tools.sh
	$(CARGO) build --release -p specd
	SPECD=$(SPECD) scripts/check-chart.sh
	SPECD=$(SPECD) scripts/check-deploy-files.sh
	SPECD=$(SPECD) scripts/cluster-smoke.sh

# A real multi-process cluster on loopback (3-member etcd, two targets, two drafters, a trainer, a
# router; smollm unless MODEL_PRESET=qwen), logs under ~/.cache/specd/cluster/logs; cluster-down stops
# exactly what it started.
cluster: models build
	SPECD=$(SPECD) scripts/cluster.sh up

cluster-down:
	@scripts/cluster.sh down

# Hermetic tests only (no model files needed); says how many real-model tests it skipped.
test-fast: setup
	@log=$$(mktemp); \
	SPECD_MODELS_DIR=/nonexistent SPECD_SKIP_LOG=$$log $(CARGO) test --release --workspace; rc=$$?; \
	echo "test-fast: $$(wc -l < $$log) real-model test(s) skipped (no model files; \`make test\` runs them)"; \
	rm -f $$log; exit $$rc

bench: models build
	$(SPECD) bench --model-preset qwen

# The cost of a forward as rows are added (m = 1..16), prefill, decode and batched decode, per model file.
bench-kernels: models build
	$(SPECD) bench-kernels --model-preset $(or $(MODEL_PRESET),qwen)

# specd's compute figures and llama.cpp's (built by the workplace tool llama-anchor) on the same files,
# one after the other, ratios in one table.
bench-anchor: models build
	SPECD=$(SPECD) scripts/bench-anchor.sh

bench-cluster: models build
	$(SPECD) bench-cluster --model-preset qwen --drafters none,auto

# Closed-loop load on a fresh `specd up` (or on ADDR=host:port).
loadtest: models build
	SPECD=$(SPECD) loadtest/run.sh

# Online distillation on a shifting workload (phase A: Python documentation prose, phase B: CPython
# standard library code; OSD_PROMPTS_A=FILE / OSD_PROMPTS_B=FILE replace them): acceptance and tok/s
# per window, osd.svg, one `osd:` summary line.
OSD_DIR ?= $(HOME)/.cache/specd/osd
demo-osd: models build
	@mkdir -p $(OSD_DIR)
	@python3 scripts/osd-prompts.py $(OSD_DIR)/prompts-a.txt $(OSD_DIR)/prompts-b.txt
	OSD_PROMPTS_A=$${OSD_PROMPTS_A:-$(OSD_DIR)/prompts-a.txt} OSD_PROMPTS_B=$${OSD_PROMPTS_B:-$(OSD_DIR)/prompts-b.txt} \
		$(SPECD) demo-osd --model-preset qwen --models-dir models --svg osd.svg $(OSD_ARGS)

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --release --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

clean:
	$(CARGO) clean
