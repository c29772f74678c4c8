"""RateLimiter pacing on a fake clock, including simulations against the fake's sliding-window limiter."""

from __future__ import annotations

import pytest
from clocks import FakeClock

from auditor.fake.fleet import Fleet
from auditor.katapult import RateLimiter


def limiter(clock: FakeClock, per_minute: float = 1200, **kwargs: float) -> RateLimiter:
    return RateLimiter(per_minute, clock=clock, sleep=clock.sleep, **kwargs)  # type: ignore[arg-type]


async def starts(rl: RateLimiter, n: int) -> list[float]:
    return [await rl.acquire() for _ in range(n)]


def gaps(times: list[float]) -> list[float]:
    return [round(b - a, 9) for a, b in zip(times, times[1:], strict=False)]


async def test_spacing_is_sixty_over_rate() -> None:
    clock = FakeClock()
    rl = limiter(clock, 600, margin=0)
    times = await starts(rl, 6)
    assert times[0] == 1000.0
    assert gaps(times) == [0.1] * 5
    assert rl.interval == pytest.approx(0.1)


async def test_default_margin_is_small() -> None:
    clock = FakeClock()
    rl = limiter(clock, 1200)
    assert rl.interval == pytest.approx(0.05 * 1.02)
    assert gaps(await starts(rl, 3)) == pytest.approx([0.051, 0.051])


async def test_idle_gap_does_not_build_up_a_burst() -> None:
    clock = FakeClock()
    rl = limiter(clock, 600, margin=0)
    await starts(rl, 2)
    clock.now += 30
    times = await starts(rl, 3)
    assert gaps(times) == [0.1, 0.1]


async def test_rate_follows_x_ratelimit_permitted() -> None:
    clock = FakeClock()
    rl = limiter(clock, 1200, margin=0)
    assert rl.per_minute == 1200
    rl.observe(permitted=120, remaining=119)
    assert rl.per_minute == 120 and rl.permitted == 120
    await rl.acquire()
    assert gaps(await starts(rl, 3)) == [0.5, 0.5]
    # The configured maximum still caps a more generous server.
    rl.observe(permitted=6000, remaining=5990)
    assert rl.per_minute == 1200
    assert rl.interval == pytest.approx(0.05)
    # Missing or nonsense headers change nothing.
    rl.observe(permitted=None, remaining=None)
    rl.observe(permitted=0, remaining=None)
    assert rl.per_minute == 1200


async def test_low_remaining_slows_down() -> None:
    clock = FakeClock()
    rl = limiter(clock, 1200)
    # Someone else sharing the token has used all but 3 of this minute's budget.
    rl.observe(permitted=1200, remaining=3)
    # The unseen usage may be a recent burst: hold off for a while before assuming any of it aged out.
    first = await rl.acquire()
    assert first - 1000.0 > 5.0


async def test_plenty_remaining_does_not_slow_down() -> None:
    clock = FakeClock()
    rl = limiter(clock, 1200)
    rl.observe(permitted=1200, remaining=1100)
    times = await starts(rl, 10)
    assert times[0] == 1000.0
    assert gaps(times) == pytest.approx([rl.interval] * 9)


async def test_own_window_is_never_overfilled() -> None:
    clock = FakeClock()
    rl = limiter(clock, 600, margin=0, reserve=10, slack=1.0)
    times = await starts(rl, 700)
    budget = rl.window_budget
    assert budget == 590
    # The 591st start waits until the first one has aged out of the (60 s + 1 s slack) window.
    assert times[budget] >= times[0] + 61.0
    for i in range(len(times) - budget):
        assert times[i + budget] - times[i] >= 61.0 - 1e-9


async def test_rate_limited_pauses_everyone_and_doubles_only_for_new_requests() -> None:
    clock = FakeClock()
    rl = limiter(clock, 1200)
    first = await rl.acquire()
    in_flight = await rl.acquire()
    clock.now += 0.1  # the 429s arrive a little later
    assert rl.on_rate_limited(permitted=600, wait=1.0, started_at=first) == pytest.approx(1.0)
    assert rl.per_minute == 600
    # A request that was already in flight when the pause began does not double it.
    assert rl.on_rate_limited(permitted=600, wait=1.0, started_at=in_flight) == pytest.approx(1.0)
    probe = await rl.acquire()
    assert probe >= 1001.0
    # The first request after the pause is refused again: the pause doubles.
    assert rl.on_rate_limited(permitted=600, wait=1.0, started_at=probe) == pytest.approx(2.0)
    rl.on_success()
    assert rl.on_rate_limited(permitted=600, wait=1.0, started_at=await rl.acquire()) == pytest.approx(1.0)


async def test_explicit_pause() -> None:
    clock = FakeClock()
    rl = limiter(clock, 1200)
    rl.pause(7.5)
    assert await rl.acquire() == pytest.approx(1007.5)


def test_invalid_settings() -> None:
    with pytest.raises(ValueError):
        RateLimiter(0)
    with pytest.raises(ValueError):
        RateLimiter(100, margin=1.0)
    with pytest.raises(ValueError):
        RateLimiter(100, hold=60.0)
    assert "1200" in repr(RateLimiter(1200))


# ---------------------------------------------------------------- simulations against the fake's window


class Server:
    """The fake Katapult's per-token sliding window (Fleet.admit) with a limit that can change."""

    def __init__(self, clock: FakeClock, permitted: int) -> None:
        self.fleet = Fleet(clock=clock)
        self.permitted = permitted
        self.rate_limited = 0
        self.served = 0

    async def request(self, rl: RateLimiter, token: str = "t") -> None:
        started = await rl.acquire()
        admitted, remaining = self.fleet.admit(token, permitted=self.permitted)
        self.served += 1
        rl.observe(permitted=self.permitted, remaining=remaining)
        if admitted:
            rl.on_success()
        else:
            self.rate_limited += 1
            rl.on_rate_limited(permitted=self.permitted, wait=max(1.0, 240 / self.permitted), started_at=started)


async def test_steady_run_stays_near_the_floor_without_429s() -> None:
    clock = FakeClock()
    server = Server(clock, 1200)
    rl = limiter(clock, 1200)
    for _ in range(2400):
        await server.request(rl)
    elapsed = clock.now - 1000.0
    assert server.rate_limited == 0
    assert elapsed <= 120 * 1.06  # the floor is 2400 / 20 per second


async def test_limit_lowered_mid_run_gives_no_429_storm() -> None:
    clock = FakeClock()
    server = Server(clock, 6000)
    rl = limiter(clock, 6000)
    for i in range(1500):
        if i == 300:
            server.permitted = 1200
        await server.request(rl)
    assert server.rate_limited == 0
    assert rl.per_minute == 1200


async def test_burst_by_another_process_on_the_same_token() -> None:
    clock = FakeClock()
    server = Server(clock, 1200)
    # Another process spent 1150 of the budget in the last second.
    clock.now -= 1.0
    for _ in range(1150):
        server.fleet.admit("t", permitted=1200)
        clock.now += 1.0 / 1150
    rl = limiter(clock, 1200)
    for _ in range(400):
        await server.request(rl)
    assert server.rate_limited <= 2


async def test_two_processes_sharing_a_token() -> None:
    clock = FakeClock()
    server = Server(clock, 1200)
    a, b = limiter(clock, 1200), limiter(clock, 1200)
    for _ in range(1500):
        await server.request(a)
        await server.request(b)
    elapsed = clock.now - 1000.0
    assert server.rate_limited <= 5
    # 3000 requests under one 1200/min budget take at least 150 s; pacing should not waste much more.
    assert elapsed <= 150 * 1.25
