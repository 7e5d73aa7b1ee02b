#!/usr/bin/env bash
# Run every benchmark (decode cost, equal-loss comparison, training throughput) into bench/results.
# Arguments go to `parscale-jax bench all`, e.g. bench/run.sh --config paper_0.5b --prompt-len 512
source "$(dirname "$0")/../scripts/setup.sh"
python -c "import matplotlib" 2>/dev/null || pip install --quiet -c "$ROOT/constraints.txt" -e "$ROOT[bench]"
cd "$ROOT"
exec parscale-jax bench all --out bench/results "$@"
