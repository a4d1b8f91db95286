"""Entry-point helper for scripts: user errors become one ``error:`` line and exit code 1."""
from __future__ import annotations

import sys
from typing import Callable

from absl import app

from replaceme_jax.errors import ReplaceMeError


def run_main(main: Callable[[list[str]], int | None]) -> None:
    """``absl.app.run(main)``, printing ``error: <message>`` (no traceback) for a ReplaceMeError."""

    def guarded(argv):
        try:
            return main(argv)
        except ReplaceMeError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1

    app.run(guarded)
