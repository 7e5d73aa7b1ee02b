#!/usr/bin/env bash
# Set up ./.venv if needed, then train (default: the embedded default config into runs/).
# Arguments go to `parscale-jax train`, e.g. scripts/train.sh model.parscale_n=2
source "$(dirname "$0")/setup.sh"
exec parscale-jax train "$@"
