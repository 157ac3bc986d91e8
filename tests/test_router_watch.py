"""Routing guardrails (floe.run.router_watch): statistics by hand, each warning once, naming the layer."""
import logging

import pytest
import torch

from floe.run.router_watch import COLLAPSE_STEPS, DEAD_WINDOW, RouterWatch, collapse_ratio, layer_load_stats


def test_layer_load_stats_by_hand():
    # Layer 0: [6, 2, 0, 0]: mean 2, population std sqrt((16 + 0 + 4 + 4) / 4) = sqrt(6), max/mean 3.
    cv, peak = layer_load_stats(torch.tensor([[6, 2, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]]))
    assert cv == pytest.approx([6 ** 0.5 / 2, 0.0, 0.0])
    assert peak == pytest.approx([3.0, 1.0, 0.0])


def test_collapse_ratio():
    assert collapse_ratio(128, 2) == 4.0  # Arctic: 4x the fair share (64x is the most possible)
    assert collapse_ratio(8, 2) == 2.5  # tiny: 4x is the most possible
    assert collapse_ratio(2, 2) == 1.0


def _loads(num_layers, hot_layer=None, dead=()):
    """One step's routed counts [L][E] for 8 experts: even, except a hot layer (expert 0 takes 30 of 40 tokens: 6x the
    mean, 6x) and experts in `dead` ((layer, expert) pairs) that get nothing."""
    rows = []
    for layer in range(num_layers):
        row = [30, 2, 2, 2, 2, 2, 0, 0] if layer == hot_layer else [5] * 8
        for dl, de in dead:
            if dl == layer:
                row[de] = 0
        rows.append(row)
    return rows


def test_collapse_is_warned_once_naming_the_layer_after_the_stated_steps(caplog):
    watch = RouterWatch(num_experts=8, top_k=2)
    caplog.set_level(logging.WARNING, logger="floe")
    for step in range(1, COLLAPSE_STEPS):
        stats = watch.observe(step, _loads(3, hot_layer=1))
        assert stats.summary["router_max_over_mean"] == pytest.approx(6.0)  # 30 of a mean of 5
    assert not [r for r in caplog.records if "collapse" in r.message]  # 9 steps: not yet
    for step in range(COLLAPSE_STEPS, COLLAPSE_STEPS + 5):
        watch.observe(step, _loads(3, hot_layer=1))
    warned = [r.message for r in caplog.records if "collapse" in r.message]
    assert len(warned) == 1 and "layer 1 " in warned[0] and f"step {COLLAPSE_STEPS}:" in warned[0]


def test_a_balanced_step_restarts_the_collapse_count(caplog):
    watch = RouterWatch(num_experts=8, top_k=2)
    caplog.set_level(logging.WARNING, logger="floe")
    for step in range(1, 3 * COLLAPSE_STEPS):
        watch.observe(step, _loads(2, hot_layer=0 if step % COLLAPSE_STEPS else None))
    assert not [r for r in caplog.records if "collapse" in r.message]


def test_dead_experts_are_counted_and_warned_once_the_window_is_full(caplog):
    watch = RouterWatch(num_experts=8, top_k=2)
    caplog.set_level(logging.WARNING, logger="floe")
    for step in range(1, DEAD_WINDOW + 3):
        # expert 3 of layer 2 never chosen; expert 5 of layer 0 only at step 1 (alive within the window
        # until step DEAD_WINDOW + 1, when step 1 leaves it)
        dead = [(2, 3)] + ([(0, 5)] if step > 1 else [])
        stats = watch.observe(step, _loads(3, dead=dead))
        if step == DEAD_WINDOW - 1:
            assert not caplog.records  # the window is not full yet
            assert stats.per_layer["dead_experts"] == [[], [], [3]]
        if step == DEAD_WINDOW:
            assert stats.per_layer["dead_experts"] == [[], [], [3]]
    assert stats.per_layer["dead_experts"] == [[5], [], [3]] and stats.summary["dead_experts"] == 2
    warned = [r.message for r in caplog.records if "dead experts" in r.message]
    assert len(warned) == 2
    assert warned[0].startswith(f"dead experts in layer 2 at step {DEAD_WINDOW}: [3]")
    assert warned[1].startswith(f"dead experts in layer 0 at step {DEAD_WINDOW + 1}: [5]")


def test_no_warnings_on_other_ranks(caplog):
    watch = RouterWatch(num_experts=8, top_k=2, warn=False)
    caplog.set_level(logging.WARNING, logger="floe")
    for step in range(1, DEAD_WINDOW + 2):
        stats = watch.observe(step, _loads(2, hot_layer=0, dead=[(1, 2)]))
    assert not caplog.records and stats.summary["dead_experts"] == 3  # layer 0's experts 6, 7 and layer 1's 2
