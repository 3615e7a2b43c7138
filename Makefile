# Two commands on a fresh Debian machine, as root:  `make run`  and  `make test`.
# Both install what is missing (Debian packages, a virtualenv with rain) and are
# quick the second time.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
HOST   ?= 127.0.0.1
PORT   ?= 8480
# `make run` links $(BINDIR)/rain to this checkout's rain (as root), so a new shell has it.
BINDIR ?= /usr/local/bin

# Debian packages: the tools rain drives (qemu-img, mke2fs, debootstrap, sfdisk,
# qemu-system for boot tests, udpcast for multicast deployments, iproute2 for the
# testbed's namespaces and tc). The test suite also needs a PostgreSQL server to run
# the catalog tests against.
RUN_DEBS  := qemu-utils e2fsprogs openssl debootstrap fdisk qemu-system-x86 udpcast iproute2 \
             extlinux gpgv debian-archive-keyring
TEST_DEBS := $(RUN_DEBS) postgresql

.PHONY: run test lint deps-run deps-test venv link clean bench

run: deps-run venv link
	$(BIN)/rain serve --host $(HOST) --port $(PORT)

link: venv
	@./scripts/link-rain $(BIN)/rain $(BINDIR)

test: deps-test venv lint
	$(BIN)/python -m pytest -q tests

lint: venv
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy
	$(BIN)/lint-imports

bench: deps-test venv
	$(BIN)/pip install -q -e '.[dev,bench]'
	$(BIN)/python benchmarks/repository.py
	$(BIN)/python benchmarks/build.py --png docs/build-phases.png

deps-run:
	@./scripts/apt-ensure $(RUN_DEBS)

deps-test:
	@./scripts/apt-ensure $(TEST_DEBS)

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
