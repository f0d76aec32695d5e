"""Offload decision parts on their own: estimator math, breaker state machine, policy rules."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgefl.edge_agent import offload
from edgefl.edge_agent.offload import (
    CircuitBreaker,
    OffloadEstimates,
    OffloadPolicy,
    PolicyConfig,
    RollingEstimate,
)
from edgefl.edge_agent.offload.estimators import percentile


class FakeClock:
    """Injectable monotonic clock (the breaker and policy take one)."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _state(breaker: CircuitBreaker) -> str:
    # A function call, so that mypy does not narrow the property across assertions.
    return breaker.state


def test_public_names_are_pinned() -> None:
    assert offload.__all__ == sorted(offload.__all__)
    assert {"Predictor", "OffloadPolicy", "CircuitBreaker", "InferenceClient"} <= set(
        offload.__all__
    )


# --- estimators -------------------------------------------------------------------------


@given(
    st.lists(st.floats(0, 1e6, allow_nan=False), min_size=1, max_size=80),
    st.floats(0, 100),
)
def test_percentile_matches_numpy(values: list[float], q: float) -> None:
    assert percentile(values, q) == pytest.approx(
        float(np.percentile(values, q)), rel=1e-9, abs=1e-9
    )


def test_percentile_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError, match="no values"):
        percentile([], 50)
    with pytest.raises(ValueError, match=r"\[0, 100\]"):
        percentile([1.0], 101)


def test_ewma_and_p90_of_a_window() -> None:
    est = RollingEstimate(alpha=0.5, window=10)
    assert est.ewma is None
    assert est.p90 is None
    est.add(10.0)
    assert est.ewma == 10.0  # the first sample seeds the average
    est.add(20.0)
    assert est.ewma == 15.0
    est.add(30.0)
    assert est.ewma == 22.5
    est.extend(float(v) for v in range(100, 110))  # the window keeps the last 10
    assert est.p90 == pytest.approx(float(np.percentile(np.arange(100, 110), 90)))
    assert est.value("p90") == est.p90
    assert est.value("ewma") == est.ewma
    assert est.count == 13


def test_estimate_refuses_bad_samples_and_parameters() -> None:
    est = RollingEstimate()
    for bad in (-1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="finite"):
            est.add(bad)
    with pytest.raises(ValueError, match="alpha"):
        RollingEstimate(alpha=0.0)
    with pytest.raises(ValueError, match="window"):
        RollingEstimate(window=0)


def test_prior_until_the_first_sample() -> None:
    est = RollingEstimate(prior=3.0)
    assert est.p90 == 3.0
    assert est.ewma == 3.0
    est.add(1.0)
    assert est.p90 == 1.0


def test_uplink_from_predict_calls_net_of_rtt_and_server_time() -> None:
    est = OffloadEstimates(statistic="ewma", alpha=1.0, uplink_mbit_prior=8.0)
    # Prior: 8 Mbit/s = 1 KiB per 1.024 ms.
    assert est.upload_ms(1024) == pytest.approx(1.024)
    est.observe_rtt(10.0)
    # 30 ms round trip, 5 ms on the server, 10 ms RTT: 15 ms for 4 KiB.
    est.observe_predict(total_ms=30.0, server_ms=5.0, request_bytes=4096)
    assert est.upload_ms(4096) == pytest.approx(15.0)
    assert est.uplink_mbit_s() == pytest.approx(4096 * 8 / 15.0 / 1000.0)
    assert est.cloud.ewma == 5.0
    assert est.cloud_path_ms(4096) == pytest.approx(15.0 + 10.0 + 5.0)


def test_free_uplink_is_infinite_bandwidth_and_json_safe() -> None:
    est = OffloadEstimates(statistic="ewma", alpha=1.0)
    est.observe_rtt(10.0)
    est.observe_predict(total_ms=12.0, server_ms=3.0, request_bytes=300)  # 9 ms < RTT
    assert est.upload_ms(300) == 0.0
    assert est.uplink_mbit_s() == math.inf
    assert est.snapshot()["uplink_mbit_s"] is None


def test_without_health_checks_the_network_time_seeds_rtt() -> None:
    est = OffloadEstimates(statistic="ewma", alpha=1.0)
    assert est.cloud_path_ms(100) is None  # nothing known yet
    est.observe_predict(total_ms=25.0, server_ms=4.0, request_bytes=300)
    assert est.rtt.ewma == 21.0


def test_timeouts_push_the_rtt_tail_up() -> None:
    est = OffloadEstimates(statistic="p90", window=10)
    for _ in range(8):
        est.observe_rtt(2.0)
    assert est.rtt.p90 == pytest.approx(2.0)
    est.observe_timeout(55.0)
    est.observe_timeout(55.0)
    assert est.rtt.p90 is not None
    assert est.rtt.p90 > 50.0


def test_restarting_the_network_estimates_forgets_a_congestion_that_is_over() -> None:
    est = OffloadEstimates(statistic="p90", window=32, uplink_mbit_prior=8.0)
    for _ in range(24):
        est.observe_rtt(30.0)
    for _ in range(6):
        est.observe_rtt(300.0)  # 3 s of congestion at one health check per 0.5 s
    est.observe_predict(total_ms=320.0, server_ms=2.0, request_bytes=4096)
    for _ in range(6):
        est.observe_rtt(30.0)  # over: the p90 still remembers it
    assert est.rtt.p90 is not None
    assert est.rtt.p90 > 250.0
    upload = est.upload_ms(1024)
    assert upload is not None
    assert upload > 1.024  # the congested call measured a slow uplink
    assert est.latest_path_ms(1024) == pytest.approx(30.0 + upload + 2.0)
    est.restart_network(28.0)  # a probe that fitted
    assert est.rtt.p90 == 28.0
    assert est.rtt.count == 1
    assert est.upload_ms(1024) == pytest.approx(1.024)  # back to the prior
    assert est.cloud.p90 == 2.0  # the server did not change
    assert est.cloud_path_ms(1024) == pytest.approx(28.0 + 1.024 + 2.0)


def test_latest_path_is_unknown_before_any_rtt() -> None:
    est = OffloadEstimates()
    assert est.rtt.last is None
    assert est.latest_path_ms(100) is None
    est.observe_rtt(12.0)
    est.observe_rtt(7.0)
    assert est.rtt.last == 7.0


# --- circuit breaker --------------------------------------------------------------------


def test_breaker_counts_the_times_it_closed_again() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=2, open_s=2.0, clock=clock)
    breaker.record_success()
    breaker.record_failure()
    breaker.record_success()  # never opened
    assert breaker.recoveries == 0
    breaker.record_failure()
    breaker.record_failure()
    breaker.record_success()  # a health check passed while open: an outage ended
    assert breaker.recoveries == 1
    breaker.record_failure()
    breaker.record_failure()
    clock.now += 2.0
    assert breaker.allow()  # half-open probe
    breaker.record_success()
    assert breaker.recoveries == 2
    breaker.record_success()
    assert breaker.recoveries == 2


def test_breaker_opens_after_consecutive_failures_only() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=3, open_s=2.0, clock=clock)
    breaker.record_failure()
    breaker.record_failure()
    breaker.record_success()  # resets the count
    breaker.record_failure()
    breaker.record_failure()
    assert _state(breaker) == "closed"
    assert breaker.allow()
    breaker.record_failure()
    assert _state(breaker) == "open"
    assert not breaker.allow()
    assert breaker.opened_count == 1


def test_half_open_allows_exactly_one_probe_then_closes_on_success() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=1, open_s=2.0, clock=clock)
    breaker.record_failure()
    clock.now += 1.9
    assert not breaker.allow()
    clock.now += 0.2
    assert _state(breaker) == "half_open"
    assert breaker.allow()  # the probe
    assert not breaker.allow()  # nobody else while it is out
    breaker.record_success()
    assert _state(breaker) == "closed"
    assert breaker.allow()


def test_failed_probe_reopens_with_a_longer_wait() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=1, open_s=2.0, max_open_s=5.0, clock=clock)
    breaker.record_failure()
    clock.now += 2.0
    assert breaker.allow()
    breaker.record_failure()  # probe failed
    assert _state(breaker) == "open"
    clock.now += 3.9
    assert _state(breaker) == "open"  # waits 4 s now
    clock.now += 0.1
    assert _state(breaker) == "half_open"
    assert breaker.allow()
    breaker.record_failure()
    clock.now += 4.9
    assert _state(breaker) == "open"  # capped at max_open_s = 5
    clock.now += 0.1
    assert _state(breaker) == "half_open"
    breaker.record_success()  # e.g. a passing health check
    assert _state(breaker) == "closed"
    breaker.record_failure()
    clock.now += 2.0
    assert _state(breaker) == "half_open"  # the backoff was reset by the success


def test_breaker_refuses_bad_parameters() -> None:
    with pytest.raises(ValueError, match="failure_threshold"):
        CircuitBreaker(failure_threshold=0)
    with pytest.raises(ValueError, match="open_s"):
        CircuitBreaker(open_s=5.0, max_open_s=1.0)


# --- policy -----------------------------------------------------------------------------


def _policy(
    clock: FakeClock | None = None, *, rtt_ms: float | None = 10.0, **config: object
) -> OffloadPolicy:
    cfg = PolicyConfig.model_validate(
        {"mode": "adaptive", "margin_ms": 2.0, "fallback_reserve_ms": 3.0, **config}
    )
    est = OffloadEstimates(statistic=cfg.statistic, alpha=1.0, uplink_mbit_prior=1000.0)
    if rtt_ms is not None:
        est.observe_rtt(rtt_ms)
        est.cloud.add(1.0)
    clock = clock or FakeClock()
    return OffloadPolicy(cfg, est, CircuitBreaker(failure_threshold=1, clock=clock), clock=clock)


def _decide(
    policy: OffloadPolicy, budget: float = 60.0, confidence: float = 0.5
) -> offload.Decision:
    return policy.decide(
        budget_ms=budget, elapsed_ms=0.5, request_bytes=300, local_confidence=confidence
    )


def test_unsure_local_answer_that_fits_is_offloaded_with_the_right_deadline() -> None:
    decision = _decide(_policy())
    assert decision.offload
    assert decision.reason.startswith("fits")
    # deadline = budget - elapsed - fallback reserve (the local answer is already computed)
    assert decision.deadline_ms == pytest.approx(60.0 - 0.5 - 3.0)
    assert decision.estimate_ms is not None
    assert decision.estimate_ms == pytest.approx(10.0 + 1.0 + 2.0, abs=0.01)


def test_budget_too_small_for_the_cloud_stays_local() -> None:
    decision = _decide(_policy(explore_interval_s=0), budget=12.0)
    assert not decision.offload
    assert "does not fit" in decision.reason


def test_budget_smaller_than_the_fallback_time_stays_local_in_every_mode() -> None:
    for mode in ("adaptive", "cloud"):
        decision = _decide(_policy(mode=mode), budget=3.0)
        assert not decision.offload
        assert decision.reason.startswith("budget too small")


def test_pending_local_inference_counts_in_the_fallback_time() -> None:
    policy = _policy()
    policy.estimates.observe_local(7.0)
    assert policy.fallback_ms(local_done=True) == 3.0
    assert policy.fallback_ms(local_done=False) == 10.0
    decision = policy.decide(
        budget_ms=60.0, elapsed_ms=0.0, request_bytes=300, local_confidence=None, local_done=False
    )
    assert not decision.offload  # adaptive needs the confidence


def test_open_breaker_keeps_it_local() -> None:
    policy = _policy()
    policy.breaker.record_failure()  # threshold 1
    decision = _decide(policy)
    assert not decision.offload
    assert decision.reason == "circuit breaker open"


def test_confident_local_answer_is_kept_in_adaptive_mode() -> None:
    decision = _decide(_policy(confidence_threshold=0.9), confidence=0.97)
    assert not decision.offload
    assert "confidence 0.970" in decision.reason


def test_prefer_cloud_offloads_even_confident_answers() -> None:
    assert _decide(_policy(prefer_cloud=True), confidence=0.999).offload


def test_cloud_mode_offloads_whatever_the_estimates_and_breaker_say() -> None:
    policy = _policy(mode="cloud", rtt_ms=500.0)
    policy.breaker.record_failure()
    decision = _decide(policy, confidence=1.0)
    assert decision.offload
    assert decision.reason == "mode cloud"
    assert decision.deadline_ms == pytest.approx(56.5)


def test_local_mode_and_missing_cloud_never_offload() -> None:
    assert not _decide(_policy(mode="local")).offload
    policy = _policy()
    policy.cloud_available = False
    assert _decide(policy).reason == "no cloud configured"


def test_unknown_estimates_try_the_cloud_under_the_deadline() -> None:
    decision = _decide(_policy(rtt_ms=None))
    assert decision.offload
    assert decision.reason.startswith("no estimate yet")


def test_exploration_probes_a_slow_path_once_per_interval() -> None:
    clock = FakeClock()
    policy = _policy(clock, rtt_ms=100.0, explore_interval_s=5.0)
    first = _decide(policy)
    assert first.offload  # never tried: one probe
    assert first.reason.startswith("explore")
    clock.now += 1.0
    assert not _decide(policy).offload
    clock.now += 4.0
    assert _decide(policy).offload


def test_a_probe_is_flagged_and_a_fitting_request_is_not() -> None:
    assert not _decide(_policy(rtt_ms=10.0)).explore
    probe = _decide(_policy(rtt_ms=100.0))
    assert probe.offload
    assert probe.explore
    assert not _decide(_policy(rtt_ms=100.0, explore_interval_s=0)).offload


def test_the_first_sample_after_an_outage_probes_at_once() -> None:
    clock = FakeClock()
    policy = _policy(clock, rtt_ms=100.0, explore_interval_s=5.0)
    policy.estimates.observe_rtt(100.0)  # the latest check does not fit either
    assert _decide(policy).explore  # the first probe
    clock.now += 1.0
    assert not _decide(policy).offload  # paced: 5 s between probes
    policy.breaker.record_failure()  # threshold 1: open (an outage)
    clock.now += 0.5
    assert not _decide(policy).offload
    policy.breaker.record_success()  # a health check passed: the outage is over
    decision = _decide(policy)  # 1.5 s after the last probe
    assert decision.offload
    assert decision.explore
    clock.now += 0.5
    assert not _decide(policy).offload  # one probe per recovery, then the pace again


def test_probes_come_sooner_when_the_latest_health_check_fits() -> None:
    clock = FakeClock()
    policy = _policy(clock, rtt_ms=200.0, explore_interval_s=5.0)
    for _ in range(5):
        policy.estimates.observe_rtt(200.0)  # a congestion: the p90 says no
    assert _decide(policy).explore
    clock.now += 2.0
    assert not _decide(policy).offload  # the latest check is still slow: wait 5 s
    policy.estimates.observe_rtt(10.0)  # the congestion is over
    assert policy.estimates.rtt.p90 == pytest.approx(200.0)
    decision = _decide(policy)
    assert decision.offload
    assert decision.explore
    assert decision.reason.startswith("explore")
    fast = offload.policy.FAST_EXPLORE_S
    clock.now += fast / 2
    assert not _decide(policy).offload  # not twice within FAST_EXPLORE_S
    clock.now += fast / 2
    assert _decide(policy).explore
