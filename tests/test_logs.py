"""logs.configure: under absl.app.run (which turns every library's INFO on), a default run shows no
Orbax / JAX backend-probe INFO lines but keeps the project's own; verbosity=1 lets them through."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import logging, os
    from absl import app

    def main(argv):
        from replaceme_jax import logs
        verbosity = int(os.environ["LOGS_TEST_VERBOSITY"])
        if verbosity >= 0:
            logs.configure(verbosity)
        import jax, jax.numpy as jnp
        import orbax.checkpoint as ocp
        jax.devices()  # the backend probe (INFO "Unable to initialize backend 'tpu'" on CPU)
        logging.getLogger("replaceme_jax.pipeline").info("PROJECT-INFO-LINE")
        with ocp.StandardCheckpointer() as c:
            c.save(os.environ["LOGS_TEST_TARGET"], {"a": jnp.arange(4.0)})
            c.wait_until_finished()
        logging.getLogger("orbax.something").warning("ORBAX-WARNING-LINE")

    app.run(main)
""")


def _run(tmp_path, verbosity: int) -> str:
    target = tmp_path / f"ckpt{verbosity}"
    env = {**os.environ, "JAX_PLATFORMS": "", "LOGS_TEST_VERBOSITY": str(verbosity),
           "LOGS_TEST_TARGET": str(target)}
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (target / "_CHECKPOINT_METADATA").exists()
    return proc.stderr


def _info_lines(stderr: str) -> list[str]:
    """absl-formatted INFO records ('I1203 11:44:25.805901 ... file.py:35] ...')."""
    return [line for line in stderr.splitlines() if line[:1] == "I" and line[1:5].isdigit()]


@pytest.mark.parametrize("verbosity", [-1, 0, 1])
def test_configure_quiets_third_party_info(tmp_path, verbosity):
    stderr = _run(tmp_path, verbosity)
    info = _info_lines(stderr)
    orbax_info = [line for line in info if "checkpoint" in line.lower() and "PROJECT" not in line]
    assert "PROJECT-INFO-LINE" in stderr, stderr[-2000:]  # the project's own INFO always shows
    assert "ORBAX-WARNING-LINE" in stderr  # warnings from libraries are kept
    if verbosity == 0:
        assert info == [line for line in info if "PROJECT-INFO-LINE" in line], "\n".join(info)
        assert "Unable to initialize backend" not in stderr
    else:  # unconfigured (-1: what absl.app.run gives) or verbose: Orbax's INFO lines come through
        assert len(orbax_info) >= 5, stderr[-2000:]


def test_configure_sets_levels_in_process(monkeypatch):
    import logging

    from replaceme_jax import logs
    for name in ("TRANSFORMERS_VERBOSITY", "DATASETS_VERBOSITY", "HF_HUB_VERBOSITY",
                 "TRANSFORMERS_NO_ADVISORY_WARNINGS"):
        monkeypatch.delenv(name, raising=False)  # configure(1) sets them; monkeypatch restores them
    root = logging.getLogger()
    names = ("", logs.PROJECT_LOGGER, *logs.THIRD_PARTY_LOGGERS)
    saved = {name: logging.getLogger(name or None).level for name in names}
    try:
        logs.configure(0)
        assert os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] == "1"
        assert root.level == logging.WARNING
        assert logging.getLogger("absl").getEffectiveLevel() == logging.WARNING
        assert logging.getLogger("jax._src.xla_bridge").getEffectiveLevel() == logging.WARNING
        assert logging.getLogger("replaceme_jax.replaceme.solvers").getEffectiveLevel() == logging.INFO
        logs.configure(1)
        assert logging.getLogger("absl").getEffectiveLevel() == logging.INFO
        assert logging.getLogger("jax._src.xla_bridge").getEffectiveLevel() == logging.INFO
        logs.configure(2)
        assert logging.getLogger("replaceme_jax.x").getEffectiveLevel() == logging.DEBUG
    finally:  # leave no library at INFO/DEBUG: their atexit logging would hit pytest's closed streams
        for name, level in saved.items():
            logging.getLogger(name or None).setLevel(level)
