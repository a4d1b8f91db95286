"""Quiet third-party logs by default; ``verbosity >= 1`` lets them through.

Why a default run was noisy: ``absl.app.run`` sets ``--verbosity`` from -1 to 0 (INFO) after
parsing flags and puts its handler on the root logger, so every library's INFO record reaches
stderr: ~40 lines from Orbax per checkpoint save (Orbax logs through ``absl.logging``, i.e. the
``absl`` logger, not an ``orbax`` one) and JAX's backend probe (``jax._src.xla_bridge``:
"Unable to initialize backend 'tpu': ... libtpu.so ..."); without torch, transformers adds an
advisory "PyTorch was not found" warning on import. :func:`configure` undoes that after the
flags are parsed: the root logger and the known libraries go to WARNING, the project's own
``replaceme_jax`` loggers stay at INFO.

Call it inside ``absl.app.run``'s main (after flag parsing; ``absl.app.run`` resets the root level
while parsing). It does not need to run before ``import jax``, except for the C++ side: XLA's C++
log threshold (``TF_CPP_MIN_LOG_LEVEL``) is read once when jaxlib's extension loads, so
:func:`configure` only sets it when jaxlib is not loaded yet (``set_cpp_env``).
"""
from __future__ import annotations

import logging
import os
import sys

PROJECT_LOGGER = "replaceme_jax"

# Python loggers of the libraries this project uses ("absl" carries Orbax's and etils' records).
THIRD_PARTY_LOGGERS = (
    "absl", "orbax", "jax", "jaxlib", "flax", "optax", "chex", "etils", "tensorstore",
    "ml_collections", "urllib3", "requests", "httpx", "httpcore", "filelock", "fsspec",
    "datasets", "transformers", "tokenizers", "huggingface_hub", "safetensors", "accelerate",
    "torch", "lm_eval", "lm-eval", "evaluate", "sqlitedict", "numexpr", "matplotlib", "PIL",
    "asyncio", "gguf",
)
# Environment variables the Hugging Face libraries read when they set up their own loggers.
_HF_VERBOSITY_ENV = ("TRANSFORMERS_VERBOSITY", "DATASETS_VERBOSITY", "HF_HUB_VERBOSITY")


def _level(verbosity: int) -> int:
    if verbosity <= 0:
        return logging.WARNING
    return logging.INFO if verbosity == 1 else logging.DEBUG


def set_cpp_env(verbosity: int = 0) -> bool:
    """``TF_CPP_MIN_LOG_LEVEL`` for XLA's C++ logs (1: hide INFO; 0 at verbosity >= 1), unless the
    user set it. It takes effect only before jaxlib loads; returns whether it still could."""
    if "jaxlib.xla_extension" in sys.modules or "jaxlib._jax" in sys.modules:
        return False
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1" if verbosity <= 0 else "0")
    return True


def configure(verbosity: int = 0) -> None:
    """Third-party loggers (and the root logger) to WARNING at ``verbosity`` 0; INFO at 1, DEBUG at
    2 or more. The project's loggers stay at INFO (DEBUG at 2), so its own progress still shows.
    Idempotent; safe to call again with another verbosity."""
    level = _level(verbosity)
    set_cpp_env(verbosity)
    for name in _HF_VERBOSITY_ENV:  # read when transformers/datasets/hub configure their loggers
        if verbosity >= 1:
            os.environ.setdefault(name, "info" if verbosity == 1 else "debug")
    if verbosity <= 0:
        # transformers' advisory warnings, e.g. "PyTorch was not found. Models won't be available"
        # on import in the main job's environment (no torch; the project does not need it).
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    logging.getLogger().setLevel(level)
    for name in THIRD_PARTY_LOGGERS:
        logging.getLogger(name).setLevel(level)
    try:  # the absl logger may carry its own level (absl.logging.set_verbosity before app.run)
        from absl import logging as absl_logging
        absl_logging.get_absl_logger().setLevel(level)
    except ImportError:
        pass
    for module, attribute in (("transformers.utils.logging", "set_verbosity"),
                              ("datasets.utils.logging", "set_verbosity"),
                              ("huggingface_hub.utils.logging", "set_verbosity")):
        # Already imported: their library loggers were configured, and propagate to no one.
        lib = sys.modules.get(module)
        if lib is not None and hasattr(lib, attribute):
            getattr(lib, attribute)(level)
    logging.getLogger(PROJECT_LOGGER).setLevel(logging.DEBUG if verbosity >= 2 else logging.INFO)


__all__ = ["configure", "set_cpp_env", "THIRD_PARTY_LOGGERS", "PROJECT_LOGGER"]
