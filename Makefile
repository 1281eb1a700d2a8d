# The two commands a new user needs: `make demo` and `make test`.
# Both set everything up first (scripts/bootstrap.sh: Debian packages when root, .venv, the project).
.PHONY: install install-test demo test test-fedml bench lint clean

install:
	bash scripts/bootstrap.sh demo

install-test:
	bash scripts/bootstrap.sh test
	bash scripts/install-deploy-tools.sh

demo: install
	.venv/bin/fedsilo demo

# Lint first (as the README says), then the whole suite; the target fails when either fails, and when
# the lint passes its status is pytest's. The suite runs on TEST_WORKERS processes (pytest-xdist), a test module
# per worker at a time (module fixtures start federations once); TEST_WORKERS=0 runs it in this process.
TEST_WORKERS ?= 2
test: install-test
	.venv/bin/ruff check .
	.venv/bin/mypy
	.venv/bin/pytest -q -n $(TEST_WORKERS) --dist loadfile

# Optional, not part of `make test` or CI: a federation in which a site trains through a real FedML ClientTrainer,
# in a separate virtualenv (.venv-fedml) with fedml 0.9.6 and torch 2.14.1 (≈6 GB; see docs/fedml.md).
test-fedml:
	bash scripts/test-fedml.sh

bench: install
	.venv/bin/python -m bench

lint: install-test
	.venv/bin/ruff check .
	.venv/bin/mypy

clean:
	rm -rf demo-output .pytest_cache .mypy_cache .ruff_cache .hypothesis
