"""The training order of windows, computed rather than stored: a keyed permutation per epoch and a mixture schedule.

Both are pure functions of a few integers, so a loader's memory does not grow with the corpus and its state is one
position:

- ``permute(i, n, key)`` maps positions ``i`` of an epoch to window numbers in ``[0, n)``: a 4-round Feistel network
  on the smallest even-bit domain holding ``n`` (cycle-walking back into range), keyed by ``window_key(seed, source,
  epoch)``. Every window comes exactly once per epoch, in an order that looks random and differs per epoch.
- ``Mixture(weights)`` decides which source each global window slot draws from: a fixed period of ``PERIOD`` slots in
  which source ``s`` gets ``round(w_s * PERIOD)`` slots, spread by smooth weighted round-robin, so every span of slots
  holds each source within a couple of windows of its weight. The ordinal of a slot within its source (how many
  earlier slots went there) is computed in O(1), which is what resuming at any position needs.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence

import numpy as np

PERIOD = 2**16
"""Slots in one period of the mixture schedule; weights are kept to 1/PERIOD."""
_ROUNDS = 4


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on a uint64 array (wrapping arithmetic): a bijection that scrambles every bit."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


@functools.lru_cache(maxsize=64)
def window_key(seed: int, source: str, epoch: int) -> np.ndarray:
    """(4,) uint64 round keys of the permutation of ``source``'s windows in ``epoch`` under ``seed``.

    A source is keyed by its name, so its order does not change when other sources join the mixture.
    """
    name = int.from_bytes(hashlib.sha256(source.encode()).digest()[:8], "little")
    return np.random.SeedSequence([seed, name, epoch]).generate_state(_ROUNDS, np.uint64)


def permute(i: np.ndarray, n: int, key: np.ndarray) -> np.ndarray:
    """The window numbers at positions ``i`` (int, in ``[0, n)``) of the keyed permutation of ``[0, n)``; int64."""
    if n < 1:
        raise ValueError(f"cannot permute {n} windows")
    i = np.asarray(i, dtype=np.int64)
    if i.size and (i.min() < 0 or i.max() >= n):
        raise ValueError(f"positions must lie in [0, {n})")
    half = max(1, ((n - 1).bit_length() + 1) // 2)  # domain 4**half >= n, less than 4n: < 4 walks expected
    mask, shift = np.uint64((1 << half) - 1), np.uint64(half)
    x = i.astype(np.uint64)
    out = np.empty_like(x)
    todo = np.arange(x.size)
    while todo.size:
        left, right = x[todo] >> shift, x[todo] & mask
        for k in key:
            left, right = right, left ^ (mix64(right ^ k) & mask)
        y = (left << shift) | right
        inside = y < np.uint64(n)
        out[todo[inside]] = y[inside]
        x[todo], todo = y, todo[~inside]  # cycle-walk: permute again until the value falls inside [0, n)
    return out.astype(np.int64)


class Mixture:
    """The source of every global window slot, for sources with the given weights (normalised to sum 1).

    Args:
        weights: one positive weight per source, in the sources' order.
    """

    def __init__(self, weights: Sequence[float]) -> None:
        w = np.asarray(weights, dtype=np.float64)
        if w.ndim != 1 or not w.size or not np.all(np.isfinite(w)) or np.any(w <= 0):
            raise ValueError(f"mixture weights must be positive numbers, got {list(weights)}")
        w = w / w.sum()
        # Largest remainder: quotas sum to PERIOD exactly.
        quotas = np.floor(w * PERIOD).astype(np.int64)
        order = np.argsort(-(w * PERIOD - quotas), kind="stable")
        quotas[order[: PERIOD - int(quotas.sum())]] += 1
        if np.any(quotas == 0):
            raise ValueError(f"mixture weights below 1/{PERIOD} cannot be kept: {list(weights)}")
        self.weights = w
        self.quotas = quotas
        # Each source's k-th slot of the period ideally falls at (k + 1/2) * PERIOD / quota: the slots are the
        # sources' ideal times merged in order (ties to the lower source), which keeps every span within a couple
        # of windows of the weights.
        source = np.repeat(np.arange(len(quotas)), quotas)
        k = np.arange(PERIOD) - np.repeat(np.cumsum(quotas) - quotas, quotas)
        labels = source[np.lexsort((source, (k + 0.5) / quotas[source]))]
        self._labels = labels
        self._prefix = np.zeros((PERIOD + 1, len(quotas)), dtype=np.int64)  # slots of each source before slot j
        np.cumsum(np.eye(len(quotas), dtype=np.int64)[labels], axis=0, out=self._prefix[1:])

    def assign(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source, ordinal) of each global slot (int64 arrays): its source, and how many earlier slots went there."""
        slots = np.asarray(slots, dtype=np.int64)
        period, within = np.divmod(slots, PERIOD)
        source = self._labels[within]
        return source, period * self.quotas[source] + self._prefix[within, source]

    def consumed(self, position: int) -> np.ndarray:
        """(num_sources,) int64: windows each source gave to the slots before global slot ``position``."""
        period, within = divmod(int(position), PERIOD)
        return period * self.quotas + self._prefix[within]
