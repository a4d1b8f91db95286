#!/usr/bin/env bash
# The test suite (fast tests; add `-m slow` for the slow ones). Extra arguments go to pytest.
# Two pytest-xdist workers, one test file each at a time (module fixtures stay on one worker): JAX
# compiles on one thread, so two workers keep a 2-core machine busy. REPLACEME_TEST_WORKERS=0: serial.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/bootstrap.sh" test
cd "$ROOT"
exec python -m pytest -n "${REPLACEME_TEST_WORKERS:-2}" --dist loadfile "$@"
