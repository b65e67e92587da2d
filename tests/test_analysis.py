"""Metrics on synthetic numbers with known answers: crossings, speedups, sensitivity."""

from __future__ import annotations

import math

import pytest

from llmvalley.bench.analysis import (
    CellMetrics,
    Curve,
    add_baseline_metrics,
    first_crossing,
    lr_sensitivity,
    mean_curve,
    mean_std,
    speedup,
)

TOKENS = [0.0, 100.0, 200.0, 300.0, 400.0]


def test_first_crossing_interpolates_between_evaluation_points() -> None:
    loss = [4.0, 3.0, 2.2, 2.0, 1.9]
    assert first_crossing(TOKENS, loss, 2.0) == pytest.approx(300.0)
    assert first_crossing(TOKENS, loss, 2.1) == pytest.approx(250.0)
    assert first_crossing(TOKENS, loss, 3.5) == pytest.approx(50.0)
    assert first_crossing(TOKENS, loss, 5.0) == 0.0
    assert first_crossing(TOKENS, loss, 1.0) is None  # did not reach


def test_first_crossing_takes_the_first_time_not_the_last() -> None:
    loss = [4.0, 2.0, 2.5, 1.5, 1.4]  # dips below 2.2 at 100 tokens, spikes, comes back
    assert first_crossing(TOKENS, loss, 2.2) == pytest.approx(90.0)  # 4.0 -> 2.0: 90% of 100


def test_speedup_is_baseline_over_other() -> None:
    assert speedup(400.0, 300.0) == pytest.approx(4 / 3)
    assert speedup(None, 300.0) is None
    assert speedup(400.0, None) is None


def cell(optimizer: str, loss: list[float], seconds: list[float], finals: list[float]
         ) -> CellMetrics:
    c = CellMetrics(model="nano", optimizer=optimizer)
    c.curves = [Curve(TOKENS, seconds, loss)]
    c.mean = mean_curve(c.curves)
    c.final_loss_mean, c.final_loss_std = mean_std(finals)
    c.final_loss_se = c.final_loss_std / math.sqrt(len(finals))
    return c


def test_token_and_wall_clock_speedups_against_adamw_on_known_curves() -> None:
    seconds = [0.0, 10.0, 20.0, 30.0, 40.0]
    adamw = cell("adamw", [4.0, 3.0, 2.5, 2.2, 2.0], seconds, [1.99, 2.0, 2.01])
    fast = cell("fast", [4.0, 2.8, 2.2, 2.0, 1.9], [2 * s for s in seconds], [1.89, 1.9, 1.91])
    slow = cell("slow", [4.0, 3.5, 3.0, 2.6, 2.4], seconds, [2.39, 2.4, 2.41])
    close = cell("close", [4.0, 3.0, 2.5, 2.2, 2.0], seconds, [1.98, 2.0, 2.02])
    add_baseline_metrics([adamw, fast, slow, close])
    assert adamw.token_speedup == pytest.approx(1.0) and adamw.tokens_to_target == 400.0
    # fast reaches 2.0 at 300 tokens: 400 / 300; its steps take twice as long: 40 s / 60 s
    assert fast.token_speedup == pytest.approx(4 / 3)
    assert fast.seconds_to_target == pytest.approx(60.0)
    assert fast.wall_speedup == pytest.approx(40 / 60)  # no optimizer shares: measured ratio
    assert slow.token_speedup is None and slow.tokens_to_target is None  # did not reach
    assert fast.delta_vs_baseline == pytest.approx(-0.1) and fast.significant
    assert slow.significant
    assert close.delta_vs_baseline == pytest.approx(0.0) and not close.significant


def test_sensitivity_width_of_a_v_shaped_loss_is_known() -> None:
    # loss = 2 + 0.01 * |log2(lr / 4e-3)|: within 0.02 nats for |x| <= 2, width 4 octaves
    lrs = [4e-3 * 2.0**k for k in range(-4, 5)]
    points = [(lr, 2 + 0.01 * abs(math.log2(lr / 4e-3))) for lr in lrs]
    s = lr_sensitivity(points, margin=0.02)
    assert s.width_log2 == pytest.approx(4.0)
    assert s.low_lr == pytest.approx(1e-3) and s.high_lr == pytest.approx(1.6e-2)
    assert not s.lower_bound
    # a margin between grid points is interpolated: 0.015 nats -> 1.5 octaves each side
    assert lr_sensitivity(points, margin=0.015).width_log2 == pytest.approx(3.0)


def test_sensitivity_stops_at_diverged_neighbours_and_flags_grid_edges() -> None:
    points = [(1e-3, 2.05), (2e-3, 2.0), (4e-3, 2.01), (8e-3, None)]
    s = lr_sensitivity(points, margin=0.02)
    # below: 2.02 is 40% of the way from 2.0 (2e-3) to 2.05 (1e-3); above: stops at 4e-3
    assert s.width_log2 == pytest.approx(0.4 + 1.0)
    assert not s.lower_bound
    edge = lr_sensitivity([(1e-3, 2.0), (2e-3, 2.01)], margin=0.02)
    assert edge.width_log2 == pytest.approx(1.0) and edge.lower_bound
    assert lr_sensitivity([(1e-3, None)]).width_log2 is None


def test_mean_curve_and_mean_std() -> None:
    a = Curve([1, 2, 3], [1, 2, 3], [3.0, 2.0, 1.0])
    b = Curve([1, 2], [3, 4], [5.0, 4.0])
    m = mean_curve([a, b])
    assert m.tokens == [1, 2] and m.seconds == [2, 3] and m.loss == [4.0, 3.0]
    assert mean_std([1.0, 3.0]) == (2.0, pytest.approx(math.sqrt(2)))
    assert mean_std([1.0]) == (1.0, None) and mean_std([]) == (None, None)


def test_wall_clock_speedup_uses_the_in_run_optimizer_share() -> None:
    from llmvalley.bench.analysis import wall_clock_speedup

    # AdamW's step is 2% optimizer, this one's 20%: steps take 0.98 / 0.8 as long
    assert wall_clock_speedup(1.5, 0.02, 0.2, measured=9.0) == pytest.approx(1.5 * 0.8 / 0.98)
    assert wall_clock_speedup(1.5, None, 0.2, measured=1.2) == 1.2
    assert wall_clock_speedup(None, 0.02, 0.2, measured=1.2) is None
