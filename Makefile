# The two commands the README starts with: `make demo` and `make test`. Both create .venv when missing.
VENV ?= .venv
TORCH_INDEX ?=
PY := $(VENV)/bin/python
STAMP := $(VENV)/.hpml-installed
# MLproject commands run `python …`: with the venv first on PATH that is the venv's, activated or not.
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: install demo test test-learning ui server clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned, from TORCH_INDEX when given (https://download.pytorch.org/whl/cpu = the CPU build);
	# otherwise from pip's index, where PyPI's Linux wheel is the CUDA build (several GB).
	$(PY) -m pip install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/hpml demo

# Two pytest workers (pytest-xdist): much of a test's time is single-threaded (imports, tokenizing, MLflow's
# store, subprocess starts), so two interleave well on 2 cores. A file runs on one worker (--dist loadfile),
# so module fixtures are built once; tests/conftest.py hands out the heaviest files first.
# One torch thread per worker (OMP_NUM_THREADS=1, inherited by the tests' subprocesses): two workers with two
# threads each on 2 cores oversubscribe them, and torch's spinning threads then run several times slower.
TEST_WORKERS ?= 2
test: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15 -m "not gpu and not learning" tests

# The two real-model accuracy checks (MiniLM on 4,000 real SST-2 rows; MiniLM's first two layers on generated
# SQuAD v2): about 7 minutes together on 2 cores, one after the other (each uses both cores). CI runs them
# after `make test`.
test-learning: install
	$(PY) -m pytest -q --durations=5 -m learning tests

ui:
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db

# A team tracking server (docs/team-server.md): PostgreSQL from `apt-get install postgresql`, basic-auth
# users. HPML_SERVER_DB names the database; the first start needs MLFLOW_AUTH_ADMIN_PASSWORD.
server: install
	$(VENV)/bin/hpml server $(SERVER_ARGS)

clean:
	rm -rf demo-data report mlruns mlartifacts mlflow.db
