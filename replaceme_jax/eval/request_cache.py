"""On-disk cache of per-request log-likelihoods, so an interrupted evaluation resumes.

A result is keyed by the model's fingerprint (a hash of its config and every parameter's bytes)
and the exact token ids scored (context after truncation, continuation), so it is reused only
for the very same computation, whatever task, limit or process asked for it.

Safe against concurrent and killed writers without locks: every writer process appends to a file
of its own (``<pid>-<random>.jsonl`` in the model's directory) and flushes whole lines after
each batch; readers take the union of all files and skip a torn last line.
"""
from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np

from replaceme_jax.errors import ReplaceMeError


def model_fingerprint(model) -> str:
    """Hex digest of the config and all parameters (names, dtypes, shapes, bytes)."""
    from flax import nnx

    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps(model.config.to_hf_config(), sort_keys=True, default=str).encode())
    flat = sorted(nnx.to_flat_state(nnx.state(model, nnx.Param)), key=lambda kv: str(kv[0]))
    for path, var in flat:
        arr = np.asarray(jax.device_get(var.get_value()))
        h.update(f"{path}|{arr.dtype}|{arr.shape}".encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def request_key(context: Sequence[int], continuation: Sequence[int]) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(np.asarray(context, np.int64).tobytes())
    h.update(b"|")
    h.update(np.asarray(continuation, np.int64).tobytes())
    return h.hexdigest()


class RequestCache:
    """Results of one model under ``root/<fingerprint>/``."""

    def __init__(self, root, fingerprint: str):
        self.dir = Path(root).expanduser().resolve() / fingerprint
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ReplaceMeError(f"cannot create the evaluation cache {self.dir}: {e.strerror}. Fix: "
                                 "pass a writable --cache_dir, or --cache_dir='' to run without it") from e
        self._file = self.dir / f"{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl"
        self._entries = self._read()

    def _read(self) -> dict[str, tuple[float, bool]]:
        entries = {}
        for path in sorted(self.dir.glob("*.jsonl")):
            with open(path, encoding="utf-8") as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                        entries[rec["k"]] = (float(rec["ll"]), bool(rec["g"]))
                    except (ValueError, KeyError, TypeError):
                        continue  # a line torn by a killed writer
        return entries

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> tuple[float, bool] | None:
        return self._entries.get(key)

    def put(self, keys: Sequence[str], logprobs, greedy) -> None:
        lines = []
        for k, ll, g in zip(keys, logprobs, greedy):
            self._entries[k] = (float(ll), bool(g))
            lines.append(json.dumps({"k": k, "ll": float(ll), "g": bool(g)}) + "\n")
        if not lines:
            return
        with open(self._file, "a", encoding="utf-8") as f:
            f.write("".join(lines))
            f.flush()
            os.fsync(f.fileno())
