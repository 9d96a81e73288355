# Two commands set up everything on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
# One stamp per set of extras: `make run` installs the package alone, `make test` (and the
# benchmark, fuzzing, chaos, which use the test helpers) its test extras, `make lint` the dev
# extra; none undoes another.
STAMP_RUN  = $(VENV)/.installed-run
STAMP_TEST = $(VENV)/.installed-test
STAMP_DEV  = $(VENV)/.installed-dev
# The official AsyncAPI JSON Schemas (npm package), to validate docs/asyncapi.yaml in the tests.
ASYNCAPI_SPECS = .cache/asyncapi-specs/node_modules/@asyncapi/specs/schemas/3.0.0-without-$$id.json

.PHONY: run test lint fuzz migrate install install-dev clean asyncapi-specs test-tools bench soak chaos chaos-ha

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP_RUN): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

$(STAMP_TEST): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

install: $(STAMP_RUN)

# The `dev` extra (ruff, mypy, stubs), on top of the package: what `make lint` and the
# pre-commit hooks run.
$(STAMP_DEV): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

install-dev: $(STAMP_DEV)

## Lint rules and import order, formatting, types (configured in pyproject.toml); CI runs it before the tests.
lint: $(STAMP_DEV)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

## Apply migrations, then run the worker against the configured (by default local) services.
run: $(STAMP_RUN)
	$(BIN)/inventory-worker migrate
	exec $(BIN)/inventory-worker run

migrate: $(STAMP_RUN)
	$(BIN)/inventory-worker migrate

## The whole suite, against real PostgreSQL, Redis and RabbitMQ (each run isolated).
test: $(STAMP_TEST) asyncapi-specs test-tools
	$(BIN)/pytest $(PYTEST_ARGS)

## Programs the suite runs, from Debian's packages where this is root with apt-get (elsewhere,
## install them yourself): promtool checks the /metrics exposition and the alert rules
## (package prometheus; only the binary is used), wrk drives the benchmark's smoke test.
test-tools:
	@for pair in promtool:prometheus wrk:wrk; do \
	  cmd=$${pair%%:*}; pkg=$${pair#*:}; \
	  command -v $$cmd >/dev/null && continue; \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    echo "make: installing $$cmd (Debian package $$pkg)"; \
	    { [ -n "$$updated" ] || apt-get update -qq; } && updated=1 && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$pkg >/dev/null; \
	  else echo "make: $$cmd not found: install it (Debian package $$pkg); the tests that need it fail without it"; fi; \
	done

asyncapi-specs:
	@test -f '$(ASYNCAPI_SPECS)' || ! command -v npm >/dev/null || \
	  npm install --silent --no-audit --no-fund --prefix .cache/asyncapi-specs @asyncapi/specs@6.11.1
## Longer fuzzing than the suite's bounded runs: schemathesis against a live worker (2000 cases
## per operation) and 20000 random and near-valid messages through RabbitMQ. Minutes, not seconds.
fuzz: $(STAMP_TEST)
	INVENTORY_FUZZ_EXAMPLES=$${INVENTORY_FUZZ_EXAMPLES:-2000} INVENTORY_FUZZ_TIMEOUT=3000 \
	INVENTORY_FUZZ_MESSAGES=$${INVENTORY_FUZZ_MESSAGES:-20000} INVENTORY_FUZZ_SEED=$${INVENTORY_FUZZ_SEED:-$$RANDOM} \
	$(BIN)/pytest -o timeout=3600 tests/e2e/test_message_fuzz.py \
	    tests/e2e/test_http_security.py::test_schemathesis_finds_no_difference_from_the_document $(PYTEST_ARGS)

## The benchmark (docs/performance.md): a table, bench/results.json and PNG charts beside it
## (bench/results-*.png; redraw them with `python -m bench.charts bench/results.json`). Needs
## pgbench and wrk; matplotlib comes with the `bench` extra, installed for this target only.
## Interrupted (Ctrl-C, SIGTERM), it stops its worker and removes its names from the services.
bench: $(STAMP_TEST) $(VENV)/.installed-bench
	$(BIN)/python -m bench.run

$(VENV)/.installed-bench: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[bench]'
	touch $@

## Ten minutes of steady load: is the worker's memory flat? Writes bench/soak.json.
soak: $(STAMP_TEST)
	$(BIN)/python -m bench.soak

## The long fault-injection run on private service instances: 600 s of faults, seed 7 (other
## values: CHAOS_ARGS="--duration 1800 --seed 3"). A progress line every 5 s, then one verdict
## line, `chaos: PASS ...` or `chaos: FAIL ...` (a failed run keeps its logs and says where).
## Interrupted (Ctrl-C, SIGTERM), it stops every process and private instance it started.
chaos: $(STAMP_TEST)
	$(BIN)/python -m tests.chaos.runner $(CHAOS_ARGS)

## The HA run (docs/topology.md): a 3-node RabbitMQ cluster, a PostgreSQL primary with a
## synchronous standby, Redis with a replica and three Sentinels, a worker in its own network
## namespace (needs root: ip netns); the chaos workload through the loss of a node of each and
## a partition, each fault once per cycle (CHAOS_HA_ARGS="--cycles 3 --seed 3"). A table of
## figures per fault, also in .cache/chaos-ha.json; the verdict line last.
chaos-ha: $(STAMP_TEST)
	$(BIN)/python -m tests.chaos.ha_runner $(CHAOS_HA_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info .cache
