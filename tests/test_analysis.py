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


# ---------------------------------------------------------------------- tuning cost, profiles
def test_expected_best_is_the_exact_bootstrap_expectation() -> None:
    import itertools

    from llmvalley.bench.analysis import expected_best

    losses = [2.0, 1.0, 3.0]
    assert expected_best(losses, 1) == pytest.approx(2.0)
    assert expected_best(losses, 2) == pytest.approx(14 / 9)  # (5*1 + 3*2 + 1*3) / 9
    for k in (1, 2, 3):  # every k-tuple drawn with replacement, equally likely
        draws = list(itertools.product(losses, repeat=k))
        assert expected_best(losses, k) == pytest.approx(
            sum(min(d) for d in draws) / len(draws))
    assert expected_best(losses, 60) == pytest.approx(1.0, abs=1e-9)


def test_tuning_curve_counts_diverged_trials_as_the_cap_and_falls_with_k() -> None:
    from llmvalley.bench.analysis import tuning_curve

    curve = tuning_curve([2.1, None, 2.0, 2.3], cap=2.5)
    assert [k for k, *_ in curve] == [1, 2, 3, 4]
    assert curve[0][1] == pytest.approx((2.1 + 2.5 + 2.0 + 2.3) / 4)
    expected = [e for _, e, _, _ in curve]
    assert expected == sorted(expected, reverse=True)
    for _, e, low, high in curve:
        assert low <= e <= high
    assert tuning_curve([2.1, None, 2.0, 2.3], cap=2.5) == curve  # seeded: reproducible


def test_performance_profile_ratios_score_and_rho() -> None:
    from llmvalley.bench.analysis import geometric_mean, performance_profile

    profile = performance_profile({"w1": {"a": 100.0, "b": 200.0, "c": None},
                                   "w2": {"a": 300.0, "b": 150.0, "c": 600.0}})
    assert profile.ratios == {"a": [1.0, 2.0], "b": [2.0, 1.0], "c": [math.inf, 4.0]}
    assert profile.rho("a", 1.0) == 0.5 and profile.rho("a", 2.0) == 1.0
    assert profile.rho("c", 3.9) == 0.0 and profile.rho("c", 4.0) == 0.5
    assert profile.score("a") == pytest.approx((1 + 2 / 3) / 2)  # area under rho on [1, 4]
    assert profile.score("c") == pytest.approx(0.0)
    assert performance_profile({"w1": {"a": 1.0}}) is None  # one workload: no profile
    assert geometric_mean([2.0, 8.0]) == pytest.approx(4.0) and geometric_mean([]) is None


def test_step_time_ratio_comes_from_the_in_run_shares() -> None:
    seconds = [0.0, 10.0, 20.0, 30.0, 40.0]
    adamw = cell("adamw", [4.0, 3.0, 2.5, 2.2, 2.0], seconds, [1.99, 2.0, 2.01])
    other = cell("other", [4.0, 3.0, 2.5, 2.2, 2.0], seconds, [1.99, 2.0, 2.01])
    adamw.optimizer_share, other.optimizer_share = 0.02, 0.2
    add_baseline_metrics([adamw, other])
    assert adamw.step_time_ratio == pytest.approx(1.0)
    assert other.step_time_ratio == pytest.approx(0.98 / 0.8)


# ---------------------------------------------------------------------- complexity
def test_complexity_comes_from_the_registry() -> None:
    from llmvalley.bench.complexity import complexity, fit_formula

    adamw, muon = complexity("adamw"), complexity("muon")
    assert adamw.extra_hyperparameters == [] and adamw.decompositions_per_step == 0
    assert (adamw.matrix_state, adamw.vector_state) == ("2·mn", "2·n")
    assert "momentum" in muon.extra_hyperparameters and "lr" not in muon.extra_hyperparameters
    assert muon.matrix_state == "mn" and "AdamW fallback" in muon.vector_state
    assert muon.decompositions == ["Newton-Schulz (5 iterations)"]
    assert muon.decompositions_per_step == 1.0
    assert complexity("adafactor").matrix_state == "m + n"
    conda = complexity("conda")  # an SVD every update_proj_gap = 2000 steps, amortized
    assert conda.decompositions_per_step == pytest.approx(1 / 2000)
    assert conda.matrix_state == "2·mn + min(m,n)^2"
    assert fit_formula(lambda s: 3 * s[0] * s[1] + 7) == "3·mn + 7"
    # the curvature and low-rank families' decompositions, amortized over their refreshes
    assert complexity("shampoo").decompositions_per_step == 2.0  # two roots every step
    assert complexity("soap").decompositions_per_step == pytest.approx(2 / 10)
    assert complexity("splus").decompositions_per_step == pytest.approx(2 / 100)
    assert complexity("galore").decompositions_per_step == pytest.approx(1 / 200)
