# Two entry points: `make demo` (the main job) and `make test`. Both build .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is pinned here (a CPU wheel on these machines); the package itself accepts torch>=2.6.
TORCH_PIN ?= torch==2.13.0

.PHONY: venv llama-cpp test test-slow demo bench clean

$(BIN)/.installed: pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_PIN)
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

venv: $(BIN)/.installed

test: venv
	$(BIN)/python -m pytest -q --durations=15

# llama-cpp-python (the GGUF parity tests) builds llama.cpp from source: ~7 min on 2 cores, so once per
# venv (the stamp). Only the CPU library: no llava/mtmd, tools, tests, examples or server.
LLAMA_CPP_PIN ?= llama-cpp-python==0.3.36
LLAMA_CPP_CMAKE_ARGS ?= -DGGML_NATIVE=ON -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF \
	-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_OPENSSL=OFF

$(BIN)/.llama-cpp: | $(BIN)/.installed
	CMAKE_ARGS="$(LLAMA_CPP_CMAKE_ARGS)" $(BIN)/pip install -q $(LLAMA_CPP_PIN)
	touch $@

llama-cpp: $(BIN)/.llama-cpp

test-slow: venv llama-cpp
	$(BIN)/pip install -q -e '.[harness]'
	$(BIN)/python -m pytest -q -m slow

demo: venv
	$(BIN)/mptkit demo

clean:
	rm -rf $(VENV) out
