"""Shared fixtures. Float32 matmuls everywhere so parity tolerances are meaningful on any backend."""
import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "float32")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running (full-size data, lm-eval cross-checks); run with -m slow")


@pytest.fixture(scope="session")
def smollm2_gguf_path():
    from replaceme_jax.checkpoints.registry import resolve_default_path
    return resolve_default_path("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the embedded default, loaded once per test session (by registry name,
    so from the converted cache after the first load; tests/test_gguf.py checks the GGUF path itself)."""
    from replaceme_jax.checkpoints import load_pretrained
    return load_pretrained("smollm2-135m")
