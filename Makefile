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
MODEL ?= $(MODELS_DIR)/tiny-qwen2.5-omni

.PHONY: help install protos models run demo-media serve-demo-media test bench lint format clean

help:
	@echo "make install   create $(VENV) and install Omnigate with the gateway, worker and dev extras"
	@echo "make protos    generate Python code from protos/ into services/shared/omnigate/"
	@echo "make models    build the tiny offline checkpoints into $(MODELS_DIR)/"
	@echo "make run       run a worker and the gateway in the foreground (Ctrl-C stops both)"
	@echo "make serve-demo-media  write sample media into demo-media/ and serve it on http://127.0.0.1:8088/"
	@echo "make test      run all tests"
	@echo "make bench     engine benchmark: writes bench/results/engine.{json,md,png}"
	@echo "make lint      ruff over services/ and tests/"

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
	@trap 'kill $$(jobs -p) 2>/dev/null; wait' EXIT INT TERM; \
	OMNIGATE_WORKER_MODEL=$(MODEL) OMNIGATE_WORKER_PORT=$(WORKER_PORT) \
		OMNIGATE_WORKER_METRICS_PORT=$(WORKER_METRICS_PORT) $(PY) -m omnigate_worker.main & \
	OMNIGATE_GATEWAY_PORT=$(GATEWAY_PORT) OMNIGATE_GATEWAY_METRICS_PORT=$(GATEWAY_METRICS_PORT) \
		OMNIGATE_GATEWAY_WORKER_TARGET=127.0.0.1:$(WORKER_PORT) OMNIGATE_GATEWAY_ALLOW_PRIVATE_NETWORKS=true \
		$(PY) -m omnigate_gateway.main & \
	wait -n

demo-media: install
	$(PY) tests/media_factory.py demo-media

# Serves demo-media/ on http://127.0.0.1:8088/ (for the README's examples); Ctrl-C stops it.
serve-demo-media: demo-media
	$(PY) -m http.server 8088 --bind 127.0.0.1 --directory demo-media

test: install protos models
	$(PY) -m pytest -q

# Engine benchmark: pipeline in-process vs the full stack at several concurrencies (bench/results/engine.*).
bench: install protos models
	$(PY) bench/engine.py

lint: install protos
	$(PY) -m ruff check services tests
	$(PY) -m ruff format --check services tests

format: install
	$(PY) -m ruff format services tests
	$(PY) -m ruff check --fix services tests

clean:
	rm -rf $(STAMPS) services/shared/omnigate/gateway services/shared/omnigate/worker .pytest_cache
