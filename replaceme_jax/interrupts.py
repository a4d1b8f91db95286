"""SIGINT / SIGTERM end a run within seconds, with one ``interrupted`` line and no partial output.

``install()`` (called by ``cli.run_main``) makes SIGTERM raise ``Terminated`` (a KeyboardInterrupt)
in the main thread as SIGINT raises KeyboardInterrupt, so every ``finally`` / ``except
BaseException`` cleanup runs (``io_utils.atomic_output_dir`` removes its temp directory). Owning the
SIGINT handler also keeps ``asyncio.run`` (used under some savers) from installing its own, which
turns Ctrl-C into a task cancellation that library code may swallow.

Python runs signal handlers only between bytecodes of the main thread, so a main thread blocked in
native code (an XLA computation, a write) would not see the signal until that returns. A watcher
thread therefore learns of the signal through ``signal.set_wakeup_fd`` (written by the C-level
handler at once) and, if the process is still alive ``GRACE_S`` seconds later (or on a second
signal), removes the registered temp directories itself and ends the process with ``os._exit``.
The normal path ends with ``os._exit`` as well: interpreter teardown while XLA still runs queued
work is what used to segfault.
"""
from __future__ import annotations

import gc
import os
import shutil
import signal
import socket
import sys
import threading
import time
from pathlib import Path

GRACE_S = 3.0  # the main thread's time to unwind before the watcher ends the process
EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}
NAMES = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like KeyboardInterrupt so the same cleanup runs."""
    signum = signal.SIGTERM


_lock = threading.RLock()
_temps: list[Path] = []        # temp outputs being built (removed on a forced exit)
_written: list[Path] = []      # outputs completed by this process (top level only)
_received: list[int] = []      # signals seen, in order
_exiting = threading.Lock()
_installed = False
_finished = False              # main() returned: a signal now only stops the interpreter's teardown


def register_temp(path) -> None:
    with _lock:
        _temps.append(Path(path))


def unregister_temp(path, committed=None) -> None:
    """``path`` is gone; ``committed``: the output it became (recorded unless inside another temp)."""
    path = Path(path)
    with _lock:
        if path in _temps:
            _temps.remove(path)
        if committed is not None and not any(t in Path(committed).parents for t in _temps):
            _written.append(Path(committed))


def inside_temp(path) -> bool:
    """True when ``path`` lies in an output still being built."""
    path = Path(path).absolute()
    with _lock:
        return any(t == path or t in path.parents for t in _temps)


def main_returned() -> None:
    """From here a signal ends the process at once (raising it into the interpreter's teardown,
    e.g. while it joins library threads, would print a traceback and still exit 0)."""
    global _finished
    _finished = True


def received() -> int | None:
    """The first signal this process received since ``install``, or None."""
    return _received[0] if _received else None


def message(signum: int) -> str:
    name = NAMES.get(signum, f"signal {signum}")
    with _lock:
        written = list(dict.fromkeys(_written))
    if not written:
        return f"interrupted ({name}): no output written"
    return f"interrupted ({name}): outputs completed before the signal: " + ", ".join(map(str, written))


def exit_now(signum: int, *, newline: bool = False) -> None:
    """Print the one ``interrupted`` line and end the process (no teardown: see the module doc)."""
    if not _exiting.acquire(blocking=False):
        time.sleep(GRACE_S)  # someone else is already exiting; never return into the run
        os._exit(EXIT_CODES.get(signum, 128 + signum))
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a broken pipe must not stop the exit
            pass
    try:
        os.write(2, (("\n" if newline else "") + message(signum) + "\n").encode())
    except OSError:
        pass
    os._exit(EXIT_CODES.get(signum, 128 + signum))


def _remove_temps() -> None:
    with _lock:
        temps = list(_temps)
    for t in temps:
        for _ in range(3):  # writers in other threads may still add files while it goes
            shutil.rmtree(t, ignore_errors=True)
            if not os.path.lexists(t):
                break


def _force_exit(signum: int) -> None:
    _remove_temps()
    exit_now(signum, newline=True)


def _unraisable_context(frame) -> bool:
    """True inside a gc callback or a ``__del__``: Python prints and DROPS an exception raised there
    ("Exception ignored in ..."; JAX registers such a gc callback), so the signal must wait."""
    codes = {getattr(cb, "__code__", None) for cb in gc.callbacks}
    while frame is not None:
        if frame.f_code in codes or frame.f_code.co_name == "__del__":
            return True
        frame = frame.f_back
    return False


_redelivered = [0]  # signals this module re-sent itself (the watcher must not count them twice)


def _redeliver(signum: int) -> None:
    with _lock:
        _redelivered[0] += 1
    os.kill(os.getpid(), signum)


def _handler(signum, frame):
    if not _received and not _finished and _unraisable_context(frame):
        threading.Timer(0.02, _redeliver, (signum,)).start()  # raise it once the callback is done
        return
    first = not _received
    _received.append(signum)
    _wake.set()
    if not first or _finished:
        _force_exit(_received[0])  # a second signal (stop waiting for the cleanup), or after main()
    if signum == signal.SIGTERM:
        raise Terminated()
    raise KeyboardInterrupt()


_wake = threading.Event()


def _watch(rsock: socket.socket) -> None:
    """Wakes on the first signal (wakeup fd or handler), then ends the process after the grace time."""
    deadline = None
    signum = None
    while True:
        timeout = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        rsock.settimeout(0.05 if timeout is None else min(timeout, 0.05))
        try:
            data = rsock.recv(16)
        except (BlockingIOError, socket.timeout, InterruptedError):
            data = b""
        except OSError:
            return
        nums = []
        for b in data:
            if b not in EXIT_CODES:
                continue
            with _lock:
                if _redelivered[0] and (signum is not None or nums):
                    _redelivered[0] -= 1
                    continue
            nums.append(b)
        if nums or (_wake.is_set() and signum is None):
            if signum is None:
                signum = nums[0] if nums else (_received[0] if _received else signal.SIGINT)
                deadline = time.monotonic() + GRACE_S
                nums = nums[1:]
            if nums:  # a second signal while the first is still being handled
                _force_exit(signum)
        if deadline is not None and time.monotonic() >= deadline:
            _force_exit(signum)


def install() -> None:
    """Own SIGINT and SIGTERM for this (main-thread) process; idempotent."""
    global _installed
    if _installed or threading.current_thread() is not threading.main_thread():
        return
    signal.signal(signal.SIGINT, _handler)
    signal.signal(signal.SIGTERM, _handler)
    rsock, wsock = socket.socketpair()
    wsock.setblocking(False)
    try:
        signal.set_wakeup_fd(wsock.fileno(), warn_on_full_buffer=False)
    except (ValueError, OSError):
        pass  # the handler still wakes the watcher (only later, if the main thread is blocked)
    _keep.extend([rsock, wsock])
    threading.Thread(target=_watch, args=(rsock,), name="replaceme-interrupts", daemon=True).start()
    _installed = True


_keep: list[socket.socket] = []
