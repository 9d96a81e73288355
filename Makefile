# Two commands set up everything on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed

.PHONY: run test migrate install clean bench soak

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

## The benchmark (README "Performance"): a table, and bench/results.json. Needs pgbench and wrk.
bench: $(STAMP)
	$(BIN)/python -m bench.run

## Ten minutes of steady load: is the worker's memory flat? Writes bench/soak.json.
soak: $(STAMP)
	$(BIN)/python -m bench.soak

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
