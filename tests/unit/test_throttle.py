"""Token bucket: rate accuracy and burst bounds with a fake clock (no real sleeping)."""

from __future__ import annotations

import pytest

from replq.throttle import MB, TokenBucket


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.slept = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.now += seconds
        self.slept += seconds


def make(rate: float | None, **kw: object) -> tuple[TokenBucket, FakeClock]:
    clock = FakeClock()
    return TokenBucket.from_mbps(rate, clock=clock, sleep=clock.sleep, **kw), clock


@pytest.mark.parametrize("rate_mb", [1, 5, 20, 50, 123.5])
@pytest.mark.parametrize("chunk", [4096, 65536, 1 << 20, 8 << 20])
def test_average_rate_is_the_limit(rate_mb: float, chunk: int) -> None:
    bucket, clock = make(rate_mb)
    start = clock.now
    total = 0
    while total < 200 * MB:
        bucket.consume(chunk)
        total += chunk
    achieved = total / (clock.now - start)
    assert achieved == pytest.approx(rate_mb * MB, rel=0.005)


def test_unlimited_never_sleeps() -> None:
    bucket, clock = make(None)
    for _ in range(1000):
        assert bucket.consume(1 << 20) == 0.0
    assert clock.slept == 0.0
    assert bucket.unlimited
    assert bucket.chunk_size(1 << 20) == 1 << 20


def test_idle_time_earns_at_most_the_burst() -> None:
    bucket, clock = make(10)
    bucket.consume(1000)
    clock.now += 3600  # a long pause (zfs send slow to start) must not buy an hour of full speed
    start = clock.now
    sent = 0
    while sent < 100 * MB:
        bucket.consume(65536)
        sent += 65536
    elapsed = clock.now - start
    assert elapsed >= (sent - bucket.burst) / (10 * MB) - 1e-9
    assert bucket.burst <= 16 * 1024 * 1024


def test_slow_producer_is_not_slowed_further() -> None:
    """A stream below the limit passes without waiting (after the first share)."""
    bucket, clock = make(100)
    bucket.consume(65536)
    waits = []
    for _ in range(100):
        clock.now += 0.01  # 64 KiB every 10 ms = 6.5 MB/s, far under 100 MB/s
        waits.append(bucket.consume(65536))
    assert sum(waits) == 0.0


def test_burst_and_chunk_size_scale_with_rate() -> None:
    small, _ = make(1)
    big, _ = make(1000)
    assert small.burst == 200_000  # 200 ms of 1 MB/s
    assert big.burst == 16 * 1024 * 1024
    assert small.chunk_size(1 << 20) == 200_000


def test_rejects_non_positive_rate() -> None:
    with pytest.raises(ValueError):
        TokenBucket(0)
