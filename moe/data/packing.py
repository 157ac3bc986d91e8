"""Best-fit-decreasing packing of examples into rows of seq_len tokens (deterministic, never splits)."""
from __future__ import annotations

import numpy as np


def best_fit_pack(lengths: np.ndarray, seq_len: int) -> list[list[int]]:
    """Group example indices into rows whose lengths sum to at most seq_len.

    Longest first (ties by index); each example goes into the open row with the least
    room that still fits it, else a new row. An example is never split: one that does
    not fit in any open row starts a new one. Every length must be in [1, seq_len].
    Rows come out in creation order; inside a row, examples in placement order.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and (lengths.min() < 1 or lengths.max() > seq_len):
        raise ValueError(f"lengths must be in [1, {seq_len}], got [{lengths.min()}, {lengths.max()}]")
    rows: list[list[int]] = []
    by_space: list[list[int]] = [[] for _ in range(seq_len + 1)]  # rows with exactly that room left
    has_space = np.zeros(seq_len + 1, dtype=bool)
    for i in np.argsort(-lengths, kind="stable").tolist():
        n = int(lengths[i])
        s = n + int(has_space[n:].argmax())  # smallest room >= n, if has_space[s]
        if has_space[s]:
            r = by_space[s].pop()
            has_space[s] = bool(by_space[s])
            rows[r].append(i)
        else:
            r, s = len(rows), seq_len
            rows.append([i])
        left = s - n
        if left > 0:
            by_space[left].append(r)
            has_space[left] = True
    return rows
