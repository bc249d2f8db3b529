# The two commands of the README. Both set up ./.venv first (idempotent).
PROMPT ?= What is the capital of France? Answer in one sentence.
PORT ?= 3000

.PHONY: run generate test lint setup

run:
	@scripts/setup.sh
	.venv/bin/tokenmill serve --port $(PORT)

generate:
	@scripts/setup.sh
	.venv/bin/tokenmill generate "$(PROMPT)"

test:
	@scripts/setup.sh test
	.venv/bin/ruff check src tests benchmarks
	.venv/bin/mypy
	.venv/bin/python -m pytest -q -p no:cacheprovider

lint:
	.venv/bin/ruff check src tests benchmarks
	.venv/bin/mypy
