#!/usr/bin/env bash
# The main job: prune the embedded default model (SmolLM2-135M-Instruct) with ReplaceMe and print
# the report. Extra arguments go to scripts/prune.py, e.g. --config.solver=cosine.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/bootstrap.sh" ""
cd "$ROOT"
exec python scripts/prune.py --config=configs/smollm2_135m.py "$@"
