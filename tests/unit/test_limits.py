"""G5 in one process, driven by a fake clock: the rate limiter, the pair gate
and the retry policy's backoff."""

from __future__ import annotations

import bisect
import itertools
import random

import pytest

from worker.limits import PairGate, RateLimiter
from worker.retry import RetryPolicy


def drive(limiter: RateLimiter, times: list[float]) -> list[float]:
    """Ask for a token at each time; return the times it was granted."""
    return [t for t in times if limiter.try_acquire(t)]


def max_in_window(grants: list[float], window: float) -> int:
    """The most grants in any closed window [s, s + window]. The busiest
    window always starts at a grant."""
    best = 0
    for i, start in enumerate(grants):
        j = bisect.bisect_right(grants, start + window + 1e-12)
        best = max(best, j - i)
    return best


# --- RateLimiter ------------------------------------------------------------------


@pytest.mark.parametrize("rate", [0.5, 1.0, 7.0, 80.0])
def test_rate_limiter_never_exceeds_rate_in_any_window(rate: float) -> None:
    step = 0.001
    times = [k * step for k in range(int(20 / step))]  # asking as often as possible for 20 s
    grants = drive(RateLimiter(rate), times)
    for window in (0.01, 0.1, 0.5, 1.0, 2.0, 5.0, 10.0):
        assert max_in_window(grants, window) <= rate * window + 1, (rate, window)
    # ...and it does grant at the rate (not trivially by granting nothing).
    assert len(grants) >= rate * 20 * 0.95


def test_rate_limiter_with_an_irregular_clock() -> None:
    rng = random.Random(7)
    t, times = 0.0, []
    for _ in range(50_000):
        t += rng.choice([0.0, 0.0001, 0.003, 0.02, 0.2])  # bursts, repeats and gaps
        times.append(t)
    rate = 25.0
    grants = drive(RateLimiter(rate), times)
    for window in (0.04, 0.1, 1.0, 3.0):
        assert max_in_window(grants, window) <= rate * window + 1
    gaps = [b - a for a, b in itertools.pairwise(grants)]
    assert min(gaps) >= 1 / rate - 1e-9


def test_rate_limiter_first_token_is_free_then_spaced() -> None:
    rl = RateLimiter(10.0)
    assert rl.try_acquire(100.0)
    assert not rl.try_acquire(100.0)
    assert not rl.try_acquire(100.099)
    assert rl.try_acquire(100.1)
    assert rl.ready_at() == pytest.approx(100.2)


def test_rate_limiter_does_not_bank_tokens_while_idle() -> None:
    rl = RateLimiter(5.0)
    assert rl.try_acquire(0.0)
    # A long idle period does not let a burst through afterwards.
    grants = drive(rl, [1000.0 + k * 0.001 for k in range(1000)])
    assert max_in_window(grants, 0.5) <= 5 * 0.5 + 1
    assert len(grants) == 5  # 1000.0, .2, .4, .6, .8


def test_throttled_halves_the_rate_and_pauses() -> None:
    rl = RateLimiter(10.0)
    assert rl.try_acquire(0.0)
    rl.throttled(0.05, retry_after=2.0)
    assert rl.rate == 5.0
    assert not rl.try_acquire(0.5)
    assert not rl.try_acquire(2.04)
    assert rl.try_acquire(2.05)
    # After the pause the spacing is the halved rate's.
    assert not rl.try_acquire(2.05 + 0.19)
    assert rl.try_acquire(2.05 + 0.2)


def test_throttled_without_retry_after_pauses_one_second() -> None:
    rl = RateLimiter(100.0)
    rl.throttled(10.0, retry_after=None)
    assert rl.rate == 50.0
    assert not rl.try_acquire(10.99)
    assert rl.try_acquire(11.0)


def test_throttled_never_shortens_an_existing_pause() -> None:
    rl = RateLimiter(8.0)
    rl.throttled(0.0, retry_after=30.0)
    rl.throttled(1.0, retry_after=2.0)
    assert not rl.try_acquire(20.0)
    assert rl.try_acquire(30.0)


def test_repeated_throttles_stop_at_the_minimum_rate() -> None:
    rl = RateLimiter(80.0, min_rate=0.5, recover_after=float("inf"))
    for k in range(20):
        rl.throttled(float(k), retry_after=0.1)
    assert rl.rate == 0.5
    grants = drive(rl, [100 + k * 0.01 for k in range(2000)])
    assert max_in_window(grants, 10.0) <= 0.5 * 10 + 1
    assert len(grants) >= 9  # still sends: 20 s at 0.5/s


def test_rate_climbs_back_after_quiet_periods_never_above_the_setting() -> None:
    rl = RateLimiter(80.0, recover_after=30.0)
    rl.throttled(0.0, retry_after=1.0)
    rl.throttled(1.0, retry_after=1.0)
    assert rl.rate == 20.0
    assert rl.try_acquire(10.0) and rl.rate == 20.0  # not quiet long enough yet
    assert rl.try_acquire(31.0) and rl.rate == 25.0
    rates = []
    for k in range(1, 12):
        rl.try_acquire(31.0 + 30.0 * k)
        rates.append(rl.rate)
    assert rates == sorted(rates) and rates[-1] == 80.0
    rl.try_acquire(10_000.0)
    assert rl.rate == 80.0


def test_throttles_answered_together_halve_the_rate_once() -> None:
    rl = RateLimiter(80.0)
    for k in range(8):  # eight 429s for requests that were in flight together
        rl.throttled(5.0 + k * 0.01, retry_after=None)
    assert rl.rate == 40.0
    rl.throttled(6.5, retry_after=None)  # a new episode
    assert rl.rate == 20.0


def test_send_delay_spaces_requests_that_were_granted_together() -> None:
    rl = RateLimiter(20.0)
    # Five grants, then a slow fence commit releases their threads at the same instant.
    delays = [rl.send_delay(5.0) for _ in range(5)]
    assert delays == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2])
    assert rl.send_delay(10.0) == 0.0  # no credit saved up while idle


# --- PairGate ---------------------------------------------------------------------


def test_pair_gate_never_two_in_flight_for_one_recipient() -> None:
    gate = PairGate(6.0)
    assert gate.can_start("+51987654321", 0.0)
    gate.start("+51987654321")
    assert gate.ready_at("+51987654321", 0.0) is None
    assert not gate.can_start("+51987654321", 1000.0)  # however long it takes
    with pytest.raises(RuntimeError):
        gate.start("+51987654321")
    # Other recipients are independent.
    assert gate.can_start("+51987654322", 0.0)


def test_pair_gate_next_start_waits_interval_after_finish() -> None:
    gate = PairGate(6.0)
    gate.start("a")
    gate.finish("a", now=10.0)
    assert gate.ready_at("a", 10.0) == pytest.approx(16.0)
    assert not gate.can_start("a", 15.999)
    assert gate.can_start("a", 16.0)


def test_pair_gate_extra_wait_is_honoured_when_longer() -> None:
    gate = PairGate(6.0)
    gate.start("a")
    gate.finish("a", now=10.0, extra_wait=30.0)
    assert not gate.can_start("a", 39.9)
    assert gate.can_start("a", 40.0)
    # A shorter extra wait never cuts the interval.
    gate.start("b")
    gate.finish("b", now=10.0, extra_wait=1.0)
    assert not gate.can_start("b", 15.9)
    assert gate.can_start("b", 16.0)


def test_pair_gate_a_later_finish_never_shortens_an_earlier_wait() -> None:
    gate = PairGate(6.0)
    gate.start("a")
    gate.finish("a", now=0.0, extra_wait=100.0)
    gate.start("a")  # only a caller that ignores can_start would do this
    gate.finish("a", now=1.0)
    assert not gate.can_start("a", 50.0)


def test_pair_gate_cancel_adds_no_wait() -> None:
    gate = PairGate(6.0)
    gate.start("a")
    gate.cancel("a")
    assert gate.can_start("a", 0.0)
    assert gate.ready_at("a", 0.0) == 0.0
    # Cancel keeps a wait that was already there, and adds nothing to it.
    gate.start("b")
    gate.finish("b", now=0.0)
    gate.start("b")
    gate.cancel("b")
    assert not gate.can_start("b", 5.9)
    assert gate.can_start("b", 6.0)


def test_pair_gate_zero_interval() -> None:
    gate = PairGate(0.0)
    gate.start("a")
    assert not gate.can_start("a", 0.0)
    gate.finish("a", now=5.0)
    assert gate.can_start("a", 5.0)


def test_pair_gate_simulated_dispatch_keeps_both_rules() -> None:
    """A dispatcher that starts whatever the gate allows, with random request
    durations, on 5 recipients for 10 simulated minutes."""
    rng = random.Random(3)
    interval = 6.0
    gate = PairGate(interval)
    recipients = [f"r{k}" for k in range(5)]
    in_flight: dict[str, float] = {}  # recipient -> end time
    history: dict[str, list[tuple[float, float]]] = {r: [] for r in recipients}
    started_at: dict[str, float] = {}
    t = 0.0
    while t < 600.0:
        for r, end in list(in_flight.items()):
            if end <= t:
                gate.finish(r, end)
                history[r].append((started_at[r], end))
                del in_flight[r]
        for r in recipients:
            if gate.can_start(r, t) and rng.random() < 0.5:
                gate.start(r)
                started_at[r] = t
                in_flight[r] = t + rng.uniform(0.01, 3.0)
        t += 0.05
    for r, spans in history.items():
        assert len(spans) >= 40, r  # it did keep sending
        for (_, end), (start, _) in itertools.pairwise(spans):
            assert start >= end + interval - 1e-9
            assert start > end  # never overlapping


def test_pair_gate_forgets_only_waits_that_are_over() -> None:
    gate = PairGate(6.0)
    for k in range(10_001):
        gate.start(f"old{k}")
        gate.finish(f"old{k}", now=0.0)
    gate.start("recent")
    gate.finish("recent", now=99.0)  # ready at 105
    gate.start("busy")
    gate.start("trigger")
    gate.finish("trigger", now=100.0)  # more than 10000 known: prune
    assert len(gate._ready) < 100
    assert not gate.can_start("recent", 104.0)
    assert gate.can_start("recent", 105.0)
    assert not gate.can_start("busy", 200.0)
    assert gate.can_start("old5", 100.0)


# --- RetryPolicy ------------------------------------------------------------------


class FixedRandom(random.Random):
    def __init__(self, value: float) -> None:
        super().__init__(0)
        self.value = value

    def random(self) -> float:
        return self.value


@pytest.mark.parametrize("attempt", range(1, 15))
def test_backoff_within_half_and_full_delay(attempt: int) -> None:
    policy = RetryPolicy(base=30.0, cap=3600.0)
    d = min(3600.0, 30.0 * 2 ** (attempt - 1))
    rng = random.Random(attempt)
    samples = [policy.backoff(attempt, rng) for _ in range(500)]
    assert all(d / 2 <= s <= d for s in samples)
    assert max(samples) - min(samples) > d / 4  # jitter really spreads the retries


def test_backoff_doubles_each_attempt_until_the_cap() -> None:
    policy = RetryPolicy(base=30.0, cap=1000.0)
    top = FixedRandom(1.0)
    bottom = FixedRandom(0.0)
    assert [policy.backoff(n, top) for n in range(1, 8)] == [30, 60, 120, 240, 480, 960, 1000]
    assert [policy.backoff(n, bottom) for n in range(1, 5)] == [15, 30, 60, 120]
    assert policy.backoff(6, bottom) == 480


def test_backoff_is_capped_even_for_huge_attempt_counts() -> None:
    policy = RetryPolicy(base=30.0, cap=3600.0)
    for n in (20, 64, 1000, 10**6):
        assert 1800.0 <= policy.backoff(n, random.Random(n)) <= 3600.0


def test_backoff_of_attempt_zero_is_the_first_delay() -> None:
    policy = RetryPolicy(base=10.0, cap=100.0)
    assert policy.backoff(0, FixedRandom(1.0)) == policy.backoff(1, FixedRandom(1.0)) == 10.0


def test_throttle_delay_is_at_least_retry_after_and_the_floor() -> None:
    policy = RetryPolicy()
    assert policy.throttle_delay(None, 6.0) == 6.0
    assert policy.throttle_delay(2.0, 6.0) == 6.0
    assert policy.throttle_delay(45.0, 6.0) == 45.0
    assert policy.throttle_delay(0.0, 1.0) == 1.0
