#!/usr/bin/env bash
# Set up ./.venv if needed, then run the test suite. Arguments go to pytest.
source "$(dirname "$0")/setup.sh"
cd "$ROOT"
exec python -m pytest "$@"
