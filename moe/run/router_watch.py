"""Routing guardrails: per-layer load statistics from each step's routed counts, and a warning (once
per layer and kind) when a layer's routing collapses or experts go dead.

    watch = RouterWatch(num_experts, top_k)
    stats = watch.observe(routed_per_expert_LE)   # every step, on rank 0, with the global batch's counts
    stats.per_layer   -> expert_load.jsonl          stats.summary -> metrics.jsonl

Routed counts are the router's choices before capacity dropping (kept counts cannot exceed the
capacity, so they hide a collapse). The thresholds (documented in the README, "Routing"):
  collapse  the busiest expert of a layer gets at least collapse_ratio(E, k) times the mean load
            (min(4, (1 + E/k) / 2): 4x its fair share at Arctic's 128 experts top-2, where at most
            64x is possible; 2.5x at tiny's 8 top-2, where at most 4x is possible) for COLLAPSE_STEPS
            consecutive steps;
  dead      an expert chosen by no token over the last DEAD_WINDOW steps (warned once the window is full;
            the logged count covers the steps seen so far, up to the window).
The window restarts on resume. No torch.distributed here: the trainer passes global counts.
"""
from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass

import torch

log = logging.getLogger("floe")

COLLAPSE_STEPS = 10
DEAD_WINDOW = 20


def collapse_ratio(num_experts: int, top_k: int) -> float:
    """max/mean load from which a layer counts as collapsed (module docstring)."""
    return min(4.0, (1.0 + num_experts / top_k) / 2.0)


def layer_load_stats(counts_LE: torch.Tensor) -> tuple[list[float], list[float]]:
    """(coefficient of variation, max / mean) of each layer's load, counts [L, E]; 0 for an empty layer."""
    counts = counts_LE.to(torch.float64)
    mean = counts.mean(dim=1)
    safe = mean.clamp(min=1e-12)
    cv = torch.where(mean > 0, counts.std(dim=1, correction=0) / safe, torch.zeros_like(mean))
    peak = torch.where(mean > 0, counts.max(dim=1).values / safe, torch.zeros_like(mean))
    return cv.tolist(), peak.tolist()


@dataclass
class RouterStats:
    per_layer: dict  # "load_cv", "max_over_mean": [L] floats; "dead_experts": [L] lists of expert ids
    summary: dict  # scalars for metrics.jsonl: the worst layer's values and the total of dead experts


class RouterWatch:
    """Keeps the last DEAD_WINDOW steps' routed counts and each layer's run of collapsed steps."""

    def __init__(self, num_experts: int, top_k: int, window: int = DEAD_WINDOW, collapse_steps: int = COLLAPSE_STEPS,
                 warn: bool = True):
        self.ratio, self.warn = collapse_ratio(num_experts, top_k), warn
        self.window, self.collapse_steps = window, collapse_steps
        self.recent: deque[torch.Tensor] = deque(maxlen=window)
        self.hot_steps: list[int] | None = None
        self.warned_collapse: set[int] = set()
        self.warned_dead: set[int] = set()

    def observe(self, step: int, routed_per_expert_LE: list[list[int]]) -> RouterStats:
        """This step's statistics; logs the warnings that become due."""
        counts = torch.tensor(routed_per_expert_LE, dtype=torch.float64)
        self.recent.append(counts)
        cv, peak = layer_load_stats(counts)
        if self.hot_steps is None:
            self.hot_steps = [0] * len(peak)
        self.hot_steps = [h + 1 if p >= self.ratio else 0 for h, p in zip(self.hot_steps, peak)]
        unused = torch.stack(list(self.recent)).sum(dim=0) == 0  # [L, E]
        dead = [torch.nonzero(row).flatten().tolist() for row in unused]
        self._warn(step, peak, dead)
        return RouterStats(
            per_layer={"load_cv": cv, "max_over_mean": peak, "dead_experts": dead},
            summary={"router_load_cv_max": max(cv), "router_max_over_mean": max(peak),
                     "dead_experts": sum(len(d) for d in dead)})

    def _warn(self, step: int, peak: list[float], dead: list[list[int]]) -> None:
        if not self.warn:
            return
        for layer, hot in enumerate(self.hot_steps):
            if hot >= self.collapse_steps and layer not in self.warned_collapse:
                self.warned_collapse.add(layer)
                log.warning("routing collapse in layer %d at step %d: its busiest expert has taken >= %.1fx the "
                            "mean load for %d steps (now %.1fx); consider model.balance_coef or "
                            "model.balance_bias_rate", layer, step, self.ratio, hot, peak[layer])
        if len(self.recent) < self.window:
            return
        for layer, experts in enumerate(dead):
            if experts and layer not in self.warned_dead:
                self.warned_dead.add(layer)
                log.warning("dead experts in layer %d at step %d: %s chosen by no token in the last %d steps",
                            layer, step, experts, self.window)
