# Two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test test-slow test-asan lint typecheck proto install clean check-image

$(STAMP): pyproject.toml setup.py src/rtmonitor/ingest/_rows.c src/rtmonitor/ingest/_devices.c \
		src/rtmonitor/_model.c src/rtmonitor/storage/_merge.c src/rtmonitor/storage/_pack.c
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## Run the service on the embedded Redis (gRPC :50051, HTTP :8000).
run: $(STAMP)
	$(BIN)/rtmonitor serve $(ARGS)

## Lint, type-check and run the test suite (starts its own Redis and services on free ports).
test: $(STAMP) lint typecheck
	$(BIN)/pytest -m "not slow" $(PYTEST_ARGS)

## The long soak/load variants.
test-slow: $(STAMP)
	$(BIN)/pytest -m slow $(PYTEST_ARGS)

## The C parts under AddressSanitizer + UBSan, against their differential tests.
test-asan: $(STAMP)
	$(BIN)/python tools/asan.py

lint: $(STAMP)
	$(BIN)/ruff check src tests tools benchmarks examples
	$(BIN)/ruff format --check src tests tools benchmarks examples

typecheck: $(STAMP)
	$(BIN)/mypy

## Run the Dockerfile's build and install steps without a Docker engine, then the service.
check-image: $(STAMP)
	$(BIN)/python tools/check_image.py

## Regenerate the protobuf/gRPC modules from proto/ (commit the result).
proto: $(STAMP)
	$(BIN)/python tools/gen_proto.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info src/rtmonitor/*.so src/rtmonitor/ingest/*.so src/rtmonitor/storage/*.so .mypy_cache .pytest_cache .ruff_cache
