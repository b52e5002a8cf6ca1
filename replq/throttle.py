"""Token-bucket rate limiter for replication streams (job `rate` in MB/s, 1 MB = 1,000,000 bytes).

The bucket holds at most `burst` bytes of credit and may go into debt by one chunk: a caller
takes the chunk it already holds, and waits until the debt is paid back. So any chunk size
works, the long-run average is exactly the rate, and the state is three numbers (bounded
memory: nothing is queued here).
"""

from __future__ import annotations

import time
from collections.abc import Callable

MB = 1_000_000
# Credit for 200 ms of rate (64 KiB .. 16 MiB): enough to catch up after the short stalls of
# zfs send/recv (txg syncs), which would otherwise pull the average below the limit (bench:
# 50 MB/s came out at 47 with 50 ms), and still a small, bounded excess over the limit.
BURST_SECONDS = 0.2
MIN_BURST = 64 * 1024
MAX_BURST = 16 * 1024 * 1024


class TokenBucket:
    """Limit a byte stream to `rate` bytes per second; `rate=None` means unlimited."""

    def __init__(
        self,
        rate: float | None,
        burst: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if rate is not None and rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        if burst is None and rate is not None:
            burst = int(min(MAX_BURST, max(MIN_BURST, rate * BURST_SECONDS)))
        self.burst = burst or 0
        self._clock = clock
        self._sleep = sleep
        # Start empty: the first chunk waits for its share, so short streams are not
        # measurably faster than the limit.
        self._tokens = 0.0
        self._last = clock()

    @classmethod
    def from_mbps(cls, rate_mb: float | None, **kw: object) -> TokenBucket:
        """A bucket for a job's `rate` (megabytes per second, decimal)."""
        return cls(None if rate_mb is None else float(rate_mb) * MB, **kw)  # type: ignore[arg-type]

    @property
    def unlimited(self) -> bool:
        return self.rate is None

    def chunk_size(self, default: int) -> int:
        """A read size that keeps the stream smooth under this limit."""
        if self.rate is None:
            return default
        return max(4096, min(default, self.burst))

    def consume(self, n: int) -> float:
        """Account for `n` bytes; sleep until they fit under the rate. Returns the time slept."""
        if self.rate is None or n <= 0:
            return 0.0
        now = self._clock()
        self._tokens = min(float(self.burst), self._tokens + (now - self._last) * self.rate)
        self._last = now
        self._tokens -= n
        if self._tokens >= 0:
            return 0.0
        wait = -self._tokens / self.rate
        self._sleep(wait)
        # The debt is paid by the time we wake; refill starts from there on the next call.
        now = self._clock()
        self._tokens = min(float(self.burst), self._tokens + (now - self._last) * self.rate)
        self._last = now
        return wait
