PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: test install lint clean demo demo-rl

$(VENV)/.installed: setup.cfg pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed

# pytest-xdist workers: one per core, at most 4 (TEST_WORKERS=1 runs the files one after another);
# each test file runs on one worker, so its module fixtures are built once.
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); [ $$n -gt 4 ] && n=4; echo $$n)

test: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

# The inference-time scaling curve from scratch (under 15 min on a 2-core CPU); DEMO_ARGS=--fresh starts over.
demo: install
	$(VENV)/bin/ponder demo $(DEMO_ARGS)

# The demo's policy with a long GRPO stage: the RL curve and search on the RL policy (runs/demo_rl, under 30 min).
demo-rl: install
	$(VENV)/bin/ponder demo --config experiments/demo_rl $(DEMO_ARGS)

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
