# dmuserd: every entry point a user or CI needs. On a fresh Debian 12
# machine, as root, `make test` and `make demo` do all the set-up.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=
ifeq ($(SLOW),1)
MARKS :=
else
MARKS := -m "not slow"
endif
PACKAGE_SOURCES := __init__.py __main__.py errors.py protocol daemon backends snapshot dsa_offload images

.PHONY: all system venv lint test fuzz demo bench bench-quick install clean

all: venv

# System packages (idempotent; prints the apt command when not root).
.system-ok: scripts/system-packages.txt scripts/setup-system
	scripts/setup-system
	@touch $@

system:
	scripts/setup-system

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# Reinstall only when the project's metadata or native sources change.
# Byte-compiled too, as a wheel install would be: an editable install never
# is, and where PYTHONDONTWRITEBYTECODE is set every command would compile
# dmuserd again (~20 ms of each start-up).
$(STAMP): .system-ok $(VENV)/bin/python pyproject.toml $(wildcard dsa_offload/*.c dsa_offload/*.h daemon/*.c daemon/ublk/*.c snapshot/*.c)
	$(PY) -m pip install -q -e '.[test,bench]'
	$(PY) -m compileall -q $(PACKAGE_SOURCES)
	@touch $@

venv: $(STAMP)

# ruff and mypy, as pyproject.toml configures them ([tool.ruff], [tool.mypy]).
# mypy reads the package as dmuserd through build/mypy-path/dmuserd, a link
# to this folder (the package's folder is "." in pyproject.toml).
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	@mkdir -p build/mypy-path && ln -sfn "$(CURDIR)" build/mypy-path/dmuserd
	$(VENV)/bin/mypy

# Lint first: make test fails when ruff or mypy does.
# pytest exits 5 when it collected nothing: that is a failure here.
test: $(STAMP) lint
	@$(PY) -m pytest $(MARKS) $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: no tests were collected" >&2; exit 1; fi; \
	exit $$rc

# The storms of tests/fuzz with many more examples than `make test` gives
# them (minutes); DMUSERD_FUZZ_SCALE=10 for ten times as many.
fuzz: $(STAMP)
	DMUSERD_FUZZ_PROFILE=fuzz $(PY) -m pytest tests/fuzz $(PYTEST_ARGS)

demo: $(STAMP)
	$(VENV)/bin/dmuserd demo

# Start-up is part of what the merge scenario times: compile what changed since.
bench: $(STAMP)
	$(PY) -m compileall -q $(PACKAGE_SOURCES)
	$(PY) -m bench.run

bench-quick: $(STAMP)
	$(PY) -m compileall -q $(PACKAGE_SOURCES)
	$(PY) -m bench.run --quick

# systemd units + example config (root; DESTDIR=DIR stages them below DIR).
install: $(STAMP)
	$(VENV)/bin/dmuserd install-units $(if $(DESTDIR),--root $(DESTDIR))

clean:
	rm -rf $(VENV) .system-ok build *.egg-info .pytest_cache
