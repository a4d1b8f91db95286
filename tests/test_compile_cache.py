"""The scripts' persistent XLA compilation cache (replaceme_jax.compile_cache), in fresh processes
so this process's JAX configuration is left alone."""
import os
import subprocess
import sys

CODE = """
import jax, jax.numpy as jnp
from replaceme_jax import compile_cache
compile_cache.MIN_COMPILE_SECONDS = 0  # cache even this tiny program
print(compile_cache.enable())
jax.jit(lambda x: jnp.sin(x) * 2 + 1)(jnp.ones(3)).block_until_ready()
"""


def _run(env):
    return subprocess.run([sys.executable, "-c", CODE], env={**os.environ, **env}, capture_output=True,
                          text=True, check=True, timeout=120).stdout.strip()


def test_compiled_programs_are_kept_under_the_cache_dir(tmp_path):
    assert _run({"REPLACEME_JAX_CACHE": str(tmp_path)}) == str(tmp_path / "xla")
    entries = {p.name for p in (tmp_path / "xla").iterdir()}
    assert entries
    # A second process reuses the entries rather than adding new ones.
    _run({"REPLACEME_JAX_CACHE": str(tmp_path)})
    assert {p.name for p in (tmp_path / "xla").iterdir()} == entries


def test_turned_off_by_the_environment(tmp_path):
    assert _run({"REPLACEME_JAX_CACHE": str(tmp_path), "REPLACEME_JAX_XLA_CACHE": "0"}) == "None"
    assert not (tmp_path / "xla").exists()
