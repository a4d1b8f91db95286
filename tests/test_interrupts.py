"""SIGINT / SIGTERM end the real prune script quickly and cleanly; a SIGKILLed run's temp output is
swept by the next one.

Each test runs ``scripts/prune.py`` on the embedded SmolLM2 in a subprocess with small settings,
waits for the stage on stderr, sends the signal and checks: the process ends within 5 s, exit code
130 (SIGINT) / 143 (SIGTERM), exactly one ``interrupted`` line and no traceback (nor segfault),
and neither the output directory nor any temp directory is left. The save window is held open with
the test-only hook ``REPLACEME_TEST_PAUSE_AT=save`` (``io_utils._test_pause``).
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PRUNE = [sys.executable, str(ROOT / "scripts/prune.py"), "--config=" + str(ROOT / "configs/smollm2_135m.py"),
         "--config.eval.perplexity_windows=0", "--config.cuts=20-28"]
SMALL = ["--config.calibration.num_samples=8", "--config.calibration.max_length=64", "--config.candidates=selected"]
# A pass of several batches, so the signal lands while batches run (the main thread waits in XLA).
# Only the user's cut is gathered (not all 22 candidates): the step compiles in about half the time,
# and the 15 batches after the first still run for ~15 s, far longer than the wait for the signal.
LONGER = ["--config.calibration.num_samples=64", "--config.calibration.max_length=256",
          "--config.calibration.batch_size=2", "--config.candidates=selected"]
CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}
NAMES = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}


class Run:
    """The script in a subprocess, its output collected as it comes (tqdm's \\r updates included)."""

    def __init__(self, args, cwd, **env):
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1", **env}
        self.proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.out, self.err = bytearray(), bytearray()
        self.readers = [threading.Thread(target=self._read, args=(s, b), daemon=True)
                        for s, b in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for t in self.readers:
            t.start()

    @staticmethod
    def _read(stream, buf):
        while chunk := stream.read1(65536):
            buf.extend(chunk)

    def text(self) -> str:
        return (bytes(self.out) + b"\n" + bytes(self.err)).decode("utf-8", "replace")

    def wait_for(self, pattern: str, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.text()):
            if self.proc.poll() is not None:
                pytest.fail(f"the script ended (rc={self.proc.returncode}) before {pattern!r}:\n{self.text()[-3000:]}")
            if time.monotonic() > deadline:
                self.proc.kill()
                pytest.fail(f"no {pattern!r} within {timeout} s:\n{self.text()[-3000:]}")
            time.sleep(0.05)

    def send(self, sig) -> float:
        """Seconds from the signal to the process's end."""
        t0 = time.monotonic()
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        elapsed = time.monotonic() - t0
        for t in self.readers:
            t.join(timeout=5)
        return elapsed


def _leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name == "out" or ".tmp-" in p.name or ".old-" in p.name)


def _assert_clean_interrupt(run: Run, sig, elapsed: float, root: Path) -> None:
    text = run.text()
    lines = [line for line in re.split(r"[\r\n]", text) if "interrupted (" in line]
    assert elapsed < 5, f"took {elapsed:.1f} s to stop after {NAMES[sig]}:\n{text[-3000:]}"
    assert run.proc.returncode == CODES[sig], f"rc={run.proc.returncode}\n{text[-3000:]}"
    assert lines == [f"interrupted ({NAMES[sig]}): no output written"], text[-3000:]
    assert "Traceback" not in text and "Segmentation" not in text and "Fatal Python" not in text, text[-3000:]
    assert _leftovers(root) == [], _leftovers(root)


def _signal_during_statistics(tmp_path, sig, *, batches_done: bool):
    run = Run(PRUNE + LONGER + [f"--config.output_dir={tmp_path / 'out'}"], cwd=tmp_path)
    if batches_done:  # at least one batch finished, more queued and running (main thread in XLA)
        run.wait_for(r"statistics pass:\s+\d+%.*\b[1-9]\d*/\d+")
    else:  # the pass has started: tracing and compiling its step
        run.wait_for(r"\[replaceme\] statistics pass")
        time.sleep(1.0)
    elapsed = run.send(sig)
    print(f"{NAMES[sig]} -> exit in {elapsed:.2f} s")
    _assert_clean_interrupt(run, sig, elapsed, tmp_path)


def test_sigint_while_statistics_batches_run(tmp_path):
    _signal_during_statistics(tmp_path, signal.SIGINT, batches_done=True)


def test_sigterm_while_statistics_pass_compiles(tmp_path):
    _signal_during_statistics(tmp_path, signal.SIGTERM, batches_done=False)


@pytest.mark.slow
def test_sigterm_while_statistics_batches_run(tmp_path):
    _signal_during_statistics(tmp_path, signal.SIGTERM, batches_done=True)


@pytest.mark.slow
def test_sigint_while_statistics_pass_compiles(tmp_path):
    _signal_during_statistics(tmp_path, signal.SIGINT, batches_done=False)


def test_sigint_during_save(tmp_path):
    run = Run(PRUNE + SMALL + [f"--config.output_dir={tmp_path / 'out'}"], cwd=tmp_path,
              REPLACEME_TEST_PAUSE_AT="save")
    run.wait_for(r"\[test\] paused in save")
    assert any(".out.tmp-" in p.name for p in tmp_path.iterdir())  # the signal really hits a save
    elapsed = run.send(signal.SIGINT)
    print(f"SIGINT in save -> exit in {elapsed:.2f} s")
    _assert_clean_interrupt(run, signal.SIGINT, elapsed, tmp_path)


@pytest.mark.slow
def test_sigterm_during_save(tmp_path):
    run = Run(PRUNE + SMALL + [f"--config.output_dir={tmp_path / 'out'}"], cwd=tmp_path,
              REPLACEME_TEST_PAUSE_AT="save")
    run.wait_for(r"\[test\] paused in save")
    _assert_clean_interrupt(run, signal.SIGTERM, run.send(signal.SIGTERM), tmp_path)


def _assert_swept_by_next_open(tmp_path: Path, pid: int) -> None:
    stale = [p for p in tmp_path.iterdir() if p.name.startswith(f".out.tmp-{pid}-")]
    assert stale, sorted(p.name for p in tmp_path.iterdir())  # SIGKILL leaves it: nothing can run
    from replaceme_jax.io_utils import atomic_output_dir, preflight_output_dir
    preflight_output_dir(tmp_path / "out", overwrite=False)  # the next run's first look at the path
    assert not any(p.exists() for p in stale)
    stale[0].mkdir()  # and the save itself sweeps too
    with atomic_output_dir(tmp_path / "out") as tmp:
        (tmp / "ok").write_text("1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_temp_of_a_sigkilled_writer_is_swept(tmp_path):
    """A process SIGKILLed inside atomic_output_dir (no handler can run) leaves its temp directory."""
    code = ("import sys, time; from replaceme_jax.io_utils import atomic_output_dir\n"
            "with atomic_output_dir(sys.argv[1]) as tmp:\n"
            "    (tmp / 'half.bin').write_bytes(b'x' * 1000); print('writing', flush=True); time.sleep(60)\n")
    run = Run([sys.executable, "-c", code, str(tmp_path / "out")], cwd=tmp_path)
    run.wait_for("writing", timeout=60)
    run.send(signal.SIGKILL)
    _assert_swept_by_next_open(tmp_path, run.proc.pid)


@pytest.mark.slow
def test_temp_of_a_sigkilled_prune_is_swept(tmp_path):
    run = Run(PRUNE + SMALL + [f"--config.output_dir={tmp_path / 'out'}"], cwd=tmp_path,
              REPLACEME_TEST_PAUSE_AT="save")
    run.wait_for(r"\[test\] paused in save")
    run.send(signal.SIGKILL)
    _assert_swept_by_next_open(tmp_path, run.proc.pid)


GC_CALLBACK_MAIN = """
import gc, os, signal, sys, time
from replaceme_jax.cli import run_main
from replaceme_jax.io_utils import atomic_output_dir

def main(argv):
    fired = []

    def cb(phase, info):  # JAX registers a gc callback like this; the signal lands inside it
        if phase == "start" and not fired:
            fired.append(1)
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(200000):
                pass
    with atomic_output_dir(sys.argv[1]) as tmp:
        (tmp / "half.bin").write_bytes(b"x")
        gc.callbacks.append(cb)
        gc.collect()
        time.sleep(30)
    return 0

run_main(main)
"""


def test_signal_inside_a_gc_callback_is_not_lost(tmp_path):
    """Python drops an exception raised in a gc callback ("Exception ignored in ..."): the handler
    defers the signal until the callback is done instead of losing it."""
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", GC_CALLBACK_MAIN, str(tmp_path / "out")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 143, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "interrupted (SIGTERM): no output written", proc.stderr
    assert "Exception ignored" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert _leftovers(tmp_path) == []
    assert time.monotonic() - t0 < 20
