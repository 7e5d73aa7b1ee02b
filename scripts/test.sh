#!/usr/bin/env bash
# Set up ./.venv-test if needed, then run the test suite. Arguments go to pytest.
PARSCALE_VENV=.venv-test PARSCALE_EXTRAS="[test]"
source "$(dirname "$0")/setup.sh"
cd "$ROOT"
exec python -m pytest "$@"
