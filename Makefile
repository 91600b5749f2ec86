# The commands the README shows. Every target runs from the checkout; state (data,
# logs, pids, certificates) goes to var/ unless F2PIPE_STATE_DIR says otherwise.

SHELL := /bin/bash
VENV := .venv
F2PIPE := $(VENV)/bin/f2pipe

.PHONY: venv run up down status test chaos bench lint

# uv from PATH, or from the user's Python when it was just installed with pip.
UV = $$(command -v uv || echo python3 -m uv)

venv:
	@command -v uv >/dev/null 2>&1 || python3 -m uv --version >/dev/null 2>&1 \
		|| python3 -m pip install --quiet --user uv \
		|| python3 -m pip install --quiet --user --break-system-packages uv
	@$(UV) sync --frozen --quiet

# The whole pipeline in the foreground with a live view; Ctrl-C stops what it started.
run: venv
	@$(F2PIPE) run

# The same in the background: returns once every service is healthy; idempotent.
up: venv
	@$(F2PIPE) up

down: venv
	@$(F2PIPE) down

status: venv
	@$(F2PIPE) status

# Starts what is not running, runs the whole suite, then stops only what it started
# (a stack that was already up stays up), even when tests fail or on Ctrl-C.
test: venv
	@started=$$(mktemp); \
	trap '$(F2PIPE) stack down --record "$$started"; rm -f "$$started"' EXIT; \
	trap 'exit 130' INT TERM; \
	$(F2PIPE) stack up --record "$$started" && $(VENV)/bin/pytest $(PYTEST_ARGS)

# The crash matrix at full size: 50,000 QoS 1 messages, a fifth faulty, while every
# stage is killed (also at its commit point) and every server killed or restarted
# (CHAOS_MESSAGES overrides the size).
chaos: venv
	@CHAOS_MESSAGES=$${CHAOS_MESSAGES:-50000} $(MAKE) --no-print-directory test \
		PYTEST_ARGS="tests/test_pipeline.py -k crash $(PYTEST_ARGS)"

# The whole pipeline on this box: writes bench/report.json and bench/report.md.
bench: venv
	@$(F2PIPE) bench $(BENCH_ARGS)

lint: venv
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests
	$(VENV)/bin/mypy
