# Two commands set up everything on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed

.PHONY: run test migrate install clean chaos

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

## Apply migrations, then run the worker against the configured (by default local) services.
run: $(STAMP)
	$(BIN)/inventory-worker migrate
	exec $(BIN)/inventory-worker run

migrate: $(STAMP)
	$(BIN)/inventory-worker migrate

## The whole suite, against real PostgreSQL, Redis and RabbitMQ (each run isolated).
test: $(STAMP)
	$(BIN)/pytest $(PYTEST_ARGS)

## The long fault-injection run on private service instances (CHAOS_ARGS="--duration 600 --seed 7").
chaos: $(STAMP)
	$(BIN)/python -m tests.chaos.runner $(CHAOS_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
