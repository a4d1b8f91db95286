"""Entry-point helper for scripts: user errors become one ``error:`` line and exit code 1.

Exit codes: 0 success; 1 a user error (bad flag, unknown config field, unparseable value,
missing config file, bad setting, unwritable output: one ``error: ...`` line, no traceback);
130 / 143 interrupted by SIGINT / SIGTERM (one ``interrupted (...)`` line; see ``interrupts``).
"""
from __future__ import annotations

import difflib
import re
import sys
from typing import Callable

from absl import app, flags

from replaceme_jax import interrupts
from replaceme_jax.errors import ReplaceMeError


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(1)


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _config_flags():
    """(name, flag) of every ml_collections config-file flag."""
    out = []
    for name, flag in flags.FLAGS._flags().items():  # noqa: SLF001 - absl has no public iterator
        if any(c.__name__ == "_ConfigFlag" for c in type(flag).__mro__) and name == flag.name:
            out.append((name, flag))
    return out


def _config_argument(argv: list[str], name: str) -> str | None:
    for i, a in enumerate(argv):
        if a in (f"--{name}", f"-{name}") and i + 1 < len(argv):
            return argv[i + 1]
        for prefix in (f"--{name}=", f"-{name}="):
            if a.startswith(prefix):
                return a[len(prefix):]
    return None


def _config_load_error(argv: list[str], name: str, error: BaseException) -> str:
    path = (_config_argument(argv, name) or "").split(":", 1)[0]
    text = str(error)
    if "No such file or directory" in text or "Errno 2" in text:
        return f"config file {path} not found (--{name}=...): check the path (relative to the current directory)"
    detail = next((line.strip() for line in reversed(text.splitlines()) if line.strip()), text)
    return f"cannot load config file {path} (--{name}=...): {detail}"


def _unknown_field(argv: list[str], e: BaseException) -> str | None:
    """ml_collections reports an unknown override field as a raw AttributeError / KeyError."""
    text = str(e).replace("\\n", "\n").replace("\\'", "'")
    m = re.search(r"'([A-Za-z_][\w]*)'", text)
    if not m:
        return None
    field = m.group(1)
    arg = next((a for a in argv[1:] if re.match(rf"--?\w+(\.\w+)*\.{re.escape(field)}(=|$)", a)), None)
    if arg is None:
        return None
    dotted = arg.lstrip("-").split("=", 1)[0]
    hint = re.search(r'Did you mean "([\w.]+)"', text)
    if hint is None:
        names = _sibling_fields(dotted)
        close = difflib.get_close_matches(field, names, n=1)
        hint_name = close[0] if close else None
    else:
        hint_name = hint.group(1)
    msg = f"unknown config field '{dotted.split('.', 1)[1] if '.' in dotted else dotted}'"
    return msg + (f"; did you mean '{hint_name}'?" if hint_name else "")


def _sibling_fields(dotted: str) -> list[str]:
    """Field names beside the last part of ``--config.a.b`` (for a suggestion)."""
    parts = dotted.split(".")
    try:
        node = flags.FLAGS[parts[0]].value
        for p in parts[1:-1]:
            node = node[p]
        return list(node.keys())
    except Exception:  # noqa: BLE001 - a suggestion only
        return []


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing with every failure one ``error:`` line (exit 1) instead of usage or a traceback."""
    try:
        rest = flags.FLAGS(argv)
    except flags.Error as e:
        text = _first_line(e)
        m = re.match(r"flag (--[\w.]+)=(.*?): (.*)", text)
        if m:  # e.g. --config.num_blocks=abc: invalid literal for int() with base 10: 'abc'
            flag, value, why = m.groups()
            text = (f"{flag} is required" if "must have a value other than None" in why else
                    f"cannot parse {flag}={value}: {why}")
        _fail(text)
    except (AttributeError, KeyError) as e:
        _fail(_unknown_field(argv, e) or f"bad flag: {_first_line(e)}")
    except OSError as e:  # overrides given for a config file that failed to load
        name = next((n for n, _ in _config_flags() if _config_argument(argv, n) is not None), "config")
        _fail(_config_load_error(argv, name, e))
    except Exception as e:  # noqa: BLE001 - a config file that raises while it is built (SyntaxError, ...)
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        _fail(f"cannot load the config file: {type(e).__name__}: {lines[-1] if lines else ''}")
    for name, flag in _config_flags():
        value = flag.value
        if type(value).__name__ == "_ErrorConfig":  # ml_collections defers the load error to first use
            _fail(_config_load_error(argv, name, object.__getattribute__(value, "_error")))
    return rest


def run_main(main: Callable[[list[str]], int | None]) -> None:
    """``absl.app.run(main)``: ``error: <message>`` and exit 1 for a user error (flags included), and
    exit 130 / 143 with one ``interrupted`` line on SIGINT / SIGTERM (no traceback, no partial output)."""
    interrupts.install()

    def guarded(argv):
        from replaceme_jax import compile_cache, logs
        compile_cache.enable()
        # absl's own --verbosity (-v): 0 (default) keeps library INFO chatter (Orbax, the TPU probe)
        # off; --verbosity=1 lets it through, 2 is DEBUG.
        logs.configure(max(int(flags.FLAGS["verbosity"].value), 0) if "verbosity" in flags.FLAGS else 0)
        try:
            code = main(argv)
        except KeyboardInterrupt as e:  # Terminated (SIGTERM) is one too
            interrupts.exit_now(interrupts.received() or getattr(e, "signum", 2))
        except ReplaceMeError as e:
            if interrupts.received():  # a signal turned into an error by library code
                interrupts.exit_now(interrupts.received())
            print(f"error: {e}", file=sys.stderr)
            return 1
        if interrupts.received():  # a library swallowed the interrupt: still report it as one
            interrupts.exit_now(interrupts.received())
        interrupts.main_returned()
        return code

    try:
        app.run(guarded, flags_parser=parse_flags)
    except KeyboardInterrupt as e:  # a signal during flag parsing or start-up
        interrupts.exit_now(interrupts.received() or getattr(e, "signum", 2))
