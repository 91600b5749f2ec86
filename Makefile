# The commands the README shows. Every target runs from the checkout; state (data,
# logs, pids, certificates) goes to var/ unless F2PIPE_STATE_DIR says otherwise.

SHELL := /bin/bash
VENV := .venv
F2PIPE := $(VENV)/bin/f2pipe

.PHONY: venv run up down status test lint

# uv from PATH, or from the user's Python when it was just installed with pip.
UV = $$(command -v uv || echo python3 -m uv)

venv:
	@command -v uv >/dev/null 2>&1 || python3 -m uv --version >/dev/null 2>&1 \
		|| python3 -m pip install --quiet --user uv \
		|| python3 -m pip install --quiet --user --break-system-packages uv
	@$(UV) sync --frozen --quiet

# For now: the servers, the schema and the demo fleet; later the whole pipeline.
run: venv
	$(F2PIPE) stack up
	$(F2PIPE) db migrate
	$(F2PIPE) db seed-demo
	@echo
	@$(F2PIPE) stack status

up: venv
	$(F2PIPE) stack up

down: venv
	$(F2PIPE) stack down

status: venv
	@$(F2PIPE) stack status

# Starts what is not running, runs the whole suite, then stops only what it started
# (a stack that was already up stays up), even when tests fail or on Ctrl-C.
test: venv
	@started=$$(mktemp); \
	trap '$(F2PIPE) stack down --record "$$started"; rm -f "$$started"' EXIT; \
	trap 'exit 130' INT TERM; \
	$(F2PIPE) stack up --record "$$started" && $(VENV)/bin/pytest $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests
	$(VENV)/bin/mypy
