"""A per-key rate limit for server mode (the `limits` library, moving window, in memory).

Keyed by a hash of the API key, or by the client address when the API is open. On Lambda,
API Gateway's throttling and usage plans do this job, so the limiter is off there.
"""

from __future__ import annotations

import hashlib
import math
import time

from function.errors import RateLimitedError


class RateLimiter:
    def __init__(self, limit: str) -> None:
        from limits import parse
        from limits.storage import MemoryStorage
        from limits.strategies import MovingWindowRateLimiter

        self.description = limit
        self._limit = parse(limit)
        self._limiter = MovingWindowRateLimiter(MemoryStorage())

    def hit(self, key: str | None, client: str | None) -> None:
        identity = "key:" + hashlib.sha256(key.encode()).hexdigest()[:24] if key else f"ip:{client or '-'}"
        if self._limiter.hit(self._limit, identity):
            return
        reset_at = self._limiter.get_window_stats(self._limit, identity).reset_time
        retry_after = max(1, math.ceil(reset_at - time.time()))
        raise RateLimitedError(
            f"rate limit of {self.description} exceeded; retry in {retry_after} s",
            retry_after=retry_after,
            limit=self.description,
        )
