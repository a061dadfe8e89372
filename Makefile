# The README's commands. Everything a fresh machine with only Python needs is installed here.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench proto clean prometheus chromium iproute2 fuzz

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: install
	$(BIN)/chainrule demo

# The slowest tests are listed at the end: the suite must stay under 20 minutes on CI's 2 cores.
test: install prometheus chromium iproute2
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m pytest -q --durations=25

# promtool and the Prometheus server for the deploy tests. Debian's package only; its service
# is not started here (the tests run their own server on a free loopback port).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
prometheus:
	command -v promtool >/dev/null || ($(SUDO) apt-get update && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus)

# A real headless browser for the web UI's tests (tests/services/test_web_ui.py). Debian's
# package only; nothing is downloaded by the tests themselves.
chromium:
	command -v chromium >/dev/null || ($(SUDO) apt-get update && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium)

# ip and tc for the hosts made of network namespaces (deploy/netns_hosts.py and its tests).
iproute2:
	command -v ip >/dev/null && command -v tc >/dev/null || ($(SUDO) apt-get update && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends iproute2)

# mypy checks services/, scheduler/, worker/ and chainrule/ ([tool.mypy] in pyproject.toml).
lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy

# The service fuzz (tests/services/test_fuzz.py) for longer than CI's fixed 2,000 requests, from
# a fresh seed each run (Hypothesis prints the seed with any failure, to replay it).
FUZZ_EXAMPLES ?= 20000
fuzz: install
	CHAINRULE_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) CHAINRULE_FUZZ_SEED=$$(od -An -N4 -tu4 /dev/urandom | tr -d ' ') \
		$(BIN)/python -m pytest -q -s --timeout=0 tests/services/test_fuzz.py

bench: install
	$(BIN)/pip install --quiet -e ".[dev,bench]"
	$(BIN)/python bench/engine.py
	$(BIN)/python bench/models.py
	$(BIN)/python bench/distributed.py
	$(BIN)/python bench/service.py
	$(BIN)/python bench/metrics.py
	$(BIN)/python bench/scheduler.py
	$(BIN)/python bench/tracking.py
	$(BIN)/python bench/hostile.py
	$(BIN)/python bench/chaos.py
	$(BIN)/python bench/parquet.py

# Regenerate chainrule/v1 from proto/ (the generated code is committed; a test diffs it).
proto: install
	$(BIN)/python -m grpc_tools.protoc -Iproto --python_out=. --pyi_out=. --grpc_python_out=. \
		proto/chainrule/v1/*.proto

clean:
	rm -rf $(VENV) build *.egg-info
