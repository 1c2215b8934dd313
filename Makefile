# Both targets create .venv and install what they need on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck unit integration acceptance bench chaos crash-matrix clean

DEMO_STAMP := $(VENV)/.demo-installed
# make demo DATABASE_URL=mysql+pymysql://root@127.0.0.1/empty_db  tells the story on a server
DATABASE_URL ?=

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP) $(DEMO_STAMP)

# The demo needs the package (and psycopg for a PostgreSQL URL), not the development tools.
$(DEMO_STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[postgres]'
	touch $(DEMO_STAMP)

demo: $(DEMO_STAMP)
	$(BIN)/cola-worker demo $(if $(DATABASE_URL),--database-url '$(DATABASE_URL)')

lint: $(STAMP)
	$(BIN)/ruff check worker tests bench migrations
	$(BIN)/ruff format --check worker tests bench migrations

typecheck: $(STAMP)
	$(BIN)/mypy

test: lint typecheck
	$(BIN)/pytest tests

unit: $(STAMP)
	$(BIN)/pytest tests/unit

bench: $(STAMP)
	$(BIN)/python bench/run_all.py

# Everything under faults, at full size (`make test` runs each smaller):
# - the chaos test (tests/chaos): 10,000 messages on a private MariaDB and a
#   private PostgreSQL, each killed and restarted; prints the checker's table
#   and writes bench/results/chaos.json;
# - the crash-point matrix, 200 kills per point on each backend;
# - the state-machine model test with its large profile.
chaos: $(STAMP)
	rm -f bench/results/chaos.json
	COLA_CHAOS_FULL=1 $(BIN)/pytest -q tests/chaos/test_chaos.py; status=$$?; \
	$(BIN)/python tests/chaos/checker.py --show bench/results/chaos.json; \
	COLA_CRASH_ITERATIONS=$${COLA_CRASH_ITERATIONS:-200} $(BIN)/pytest -q -s tests/chaos/test_crash_matrix.py || status=1; \
	COLA_MODEL_PROFILE=chaos $(BIN)/pytest -q tests/model || status=1; \
	exit $$status

# The crash-point matrix alone at full size: prints its table. COLA_CRASH_ITERATIONS overrides.
crash-matrix: $(STAMP)
	COLA_CRASH_ITERATIONS=$${COLA_CRASH_ITERATIONS:-200} $(BIN)/pytest -s tests/chaos/test_crash_matrix.py

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
