"""A bounded, uniformly sampled store of per-token activations (M, Y, L) for gradient solvers.

The cosine solver needs token rows, not just the sums the closed-form solvers use. Calibration
streams can hold far more tokens than fit in memory, so the buffer keeps a uniform random sample
of fixed size (reservoir sampling, Algorithm R) in RAM or in disk-backed memmaps.
"""
from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np

from replaceme_jax.errors import ReplaceMeError

_NAMES = ("m", "y", "l")


class TokenBuffer:
    """Uniform reservoir sample of up to ``capacity_tokens`` token rows (m, y, l), each of width d.

    * ``add(m, y, l)`` takes numpy-like [n, d] arrays of real (non-padding) tokens. Until the
      buffer is full every row is kept; afterwards row number i (0-based over the whole stream)
      replaces a uniformly chosen slot with probability capacity / (i + 1) (Algorithm R), so every
      token seen so far is held with the same probability. The draws are vectorised per call and
      come from one seeded generator consuming one draw per row past capacity, so the sample
      depends only on the seed and the stream, not on how the stream is chunked.
    * With ``path`` the three stores are ``.npy`` memmaps in a fresh directory under ``path``
      (RAM stays bounded by the chunk being added); ``close()`` deletes that directory.
    """

    def __init__(self, capacity_tokens: int, d: int, *, seed: int = 0,
                 path: str | os.PathLike | None = None, dtype=np.float32):
        if not isinstance(capacity_tokens, (int, np.integer)) or capacity_tokens <= 0:
            raise ReplaceMeError(
                f"token buffer capacity must be a positive integer, got {capacity_tokens!r}; "
                "pass a token count (or use TokenBuffer.budget_from_bytes)")
        if not isinstance(d, (int, np.integer)) or d <= 0:
            raise ReplaceMeError(f"token buffer width d must be a positive integer, got {d!r}")
        self.capacity = int(capacity_tokens)
        self.d = int(d)
        self.dtype = np.dtype(dtype)
        if not np.issubdtype(self.dtype, np.floating):
            raise ReplaceMeError(f"token buffer dtype must be floating point, got {self.dtype}")
        self._rng = np.random.default_rng(seed)
        self._seen = 0
        self._dir = None
        shape = (self.capacity, self.d)
        if path is None:
            self._store = [np.empty(shape, self.dtype) for _ in _NAMES]
        else:
            try:
                os.makedirs(path, exist_ok=True)
                self._dir = tempfile.mkdtemp(prefix="token_buffer-", dir=path)
            except OSError as e:
                raise ReplaceMeError(f"cannot create the token buffer directory under {path}: {e}") from e
            self._store = [np.lib.format.open_memmap(os.path.join(self._dir, f"{name}.npy"), mode="w+",
                                                     dtype=self.dtype, shape=shape) for name in _NAMES]

    @staticmethod
    def budget_from_bytes(max_bytes: int, d: int, dtype=np.float32) -> int:
        """Largest capacity (tokens) whose three [capacity, d] stores fit in ``max_bytes``."""
        row_bytes = 3 * int(d) * np.dtype(dtype).itemsize
        capacity = int(max_bytes) // row_bytes
        if capacity < 1:
            raise ReplaceMeError(
                f"a token buffer budget of {max_bytes} bytes holds no token of width {d} "
                f"({row_bytes} bytes per token); raise the budget")
        return capacity

    def __len__(self) -> int:
        return min(self._seen, self.capacity)

    @property
    def tokens_seen(self) -> int:
        """Rows passed to ``add`` so far (kept or not)."""
        return self._seen

    @property
    def nbytes(self) -> int:
        """Bytes of storage allocated for the three stores (on disk in memmap mode)."""
        return 3 * self.capacity * self.d * self.dtype.itemsize

    @property
    def directory(self) -> str | None:
        """The memmap directory, or None when the buffer lives in RAM."""
        return self._dir

    def _stores(self) -> list[np.ndarray]:
        if self._store is None:
            raise ReplaceMeError("this token buffer was closed; create a new TokenBuffer")
        return self._store

    def add(self, m, y, l) -> None:
        """Offer a chunk of token rows; see the class docstring for which rows are kept."""
        stores = self._stores()
        rows = [np.asarray(a) for a in (m, y, l)]
        for name, a in zip(_NAMES, rows):
            if a.ndim != 2 or a.shape[1] != self.d:
                raise ReplaceMeError(
                    f"token buffer expects {name} of shape [n, {self.d}], got {list(a.shape)}; "
                    "flatten [batch, seq, d] to real tokens only (drop padding) before adding")
        n = rows[0].shape[0]
        if any(a.shape[0] != n for a in rows):
            raise ReplaceMeError(
                f"m, y, l must hold the same tokens, got row counts {[a.shape[0] for a in rows]}")
        # Fill phase: rows go straight into empty slots.
        fill = min(max(self.capacity - self._seen, 0), n)
        if fill:
            for store, a in zip(stores, rows):
                store[self._seen:self._seen + fill] = a[:fill]
        if fill < n:
            # Algorithm R: stream row i (global, 0-based) draws j ~ U{0..i}; if j < capacity the
            # row replaces slot j.
            index = np.arange(self._seen + fill, self._seen + n, dtype=np.int64)
            j = self._rng.integers(0, index + 1)
            taken = np.nonzero(j < self.capacity)[0]
            # Several rows may hit one slot within a chunk; sequentially the last one wins.
            slots, first_in_reversed = np.unique(j[taken][::-1], return_index=True)
            source = fill + taken[::-1][first_in_reversed]
            for store, a in zip(stores, rows):
                store[slots] = a[source]
        self._seen += n

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Views (m, y, l) of the rows held, each [len(self), d] (memmaps in memmap mode)."""
        n = len(self)
        return tuple(store[:n] for store in self._stores())

    def sample(self, batch_size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``batch_size`` rows drawn uniformly with replacement from the held rows, as in-memory arrays."""
        stores = self._stores()
        if len(self) == 0:
            raise ReplaceMeError("the token buffer is empty; add calibration tokens before sampling")
        index = rng.integers(0, len(self), size=int(batch_size))
        return tuple(store[index] for store in stores)

    def close(self) -> None:
        """Release the stores; in memmap mode also delete the buffer's directory."""
        self._store = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> "TokenBuffer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        where = f"memmap at {self._dir}" if self._dir else "in RAM"
        return (f"TokenBuffer({len(self)}/{self.capacity} tokens of width {self.d}, "
                f"{self._seen} seen, {self.dtype}, {where})")
