.PHONY: run test bench lint

# Run the broker on its embedded defaults (ws://127.0.0.1:8765/ws), installing it first if needed.
run: .venv/bin/broker
	.venv/bin/broker

.venv/bin/broker: pyproject.toml setup.py $(wildcard broker/*/*.c)
	test -x .venv/bin/python || python3 -m venv .venv
	.venv/bin/python -m pip install -q -e .
	touch .venv/bin/broker

# Install everything the tests need (venv, Debian packages when missing) and run the whole suite.
test:
	./scripts/test.sh

bench: .venv/bin/broker
	.venv/bin/broker-bench all

lint:
	.venv/bin/ruff check . && .venv/bin/ruff format --check . && .venv/bin/mypy
