# Two entry points: `make demo` (the main job) and `make test`. Both build .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is pinned here (a CPU wheel on these machines); the package itself accepts torch>=2.6.
TORCH_PIN ?= torch==2.13.0

.PHONY: venv test test-slow demo bench clean

$(BIN)/.installed: pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_PIN)
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

venv: $(BIN)/.installed

test: venv
	$(BIN)/python -m pytest -q --durations=15

test-slow: venv
	$(BIN)/pip install -q -e '.[harness]'
	$(BIN)/python -m pytest -q -m slow

demo: venv
	$(BIN)/mptkit demo

clean:
	rm -rf $(VENV) out
