#!/usr/bin/env bash
# The test suite (fast tests; add `-m slow` for the slow ones). Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/bootstrap.sh" test
cd "$ROOT"
exec python -m pytest "$@"
