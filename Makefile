.PHONY: run test bench soak
# Set up .venv and start the daemon on its embedded defaults.
run:
	bash scripts/run.sh
# Set up .venv and run the whole test suite (ruff, mypy --strict, pytest).
test:
	bash scripts/test.sh
# Run every benchmark in bench/ and regenerate docs/benchmarks.md (scripts/bench.sh).
bench:
	bash scripts/bench.sh
# The crash, power-loss, kill and fuzz tests at full size (bench/soak.py; about an hour).
soak:
	bash scripts/bootstrap.sh dev && .venv/bin/python bench/soak.py
