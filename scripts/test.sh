#!/usr/bin/env bash
# Set up ./.venv-test if needed, then run the test suite. Arguments go to pytest.
# The test files run in PARSCALE_TEST_WORKERS processes (default 2, the CI machine's cores), each
# file whole in one of them, so that its module-scoped runs are trained once; the longest files first
# (tests/conftest.py: LONGEST_FIRST), so that the processes finish together.
PARSCALE_VENV=.venv-test PARSCALE_EXTRAS="[test]"
source "$(dirname "$0")/setup.sh"
cd "$ROOT"
exec python -m pytest -n "${PARSCALE_TEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder "$@"
