# The two commands of the README: `make run` and `make test`. Both create .venv when needed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: run test bench lint results clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

EXPERIMENT ?= swiss_roll_sft_pg_fast

run: $(STAMP)  ## default experiment, CPU: train, evaluate against the floor, plot
	$(PY) -m diffft.train experiment=$(EXPERIMENT) $(ARGS)

# Two pytest workers (pytest-xdist): the tests run on one thread each, so the suite takes about half
# the time on two cores; the DDP tests stay on one worker (xdist_group "ddp"). TEST_WORKERS=0: serial.
TEST_WORKERS ?= 2
test: $(STAMP)  ## the whole test suite
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadgroup --durations=15 $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check diffft tests experiments
	$(VENV)/bin/ruff format --check diffft tests experiments

bench: $(STAMP)  ## speed against a bare PyTorch loop (one thread)
	$(PY) experiments/bench.py $(ARGS)

clean:
	rm -rf outputs multirun .cache
