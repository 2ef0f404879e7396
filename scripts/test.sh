#!/usr/bin/env bash
# The project's checks: lint, formatting, types, then the tests and the docstring examples.
# Extra arguments go to pytest (e.g. -k docs, -x).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"

echo "== ruff check"
ruff check .
echo "== ruff format --check"
ruff format --check .
echo "== mypy"
mypy
echo "== pytest"
python -m pytest --doctest-modules lightning_gradguard tests "$@"
