"""Retries of model requests: exponential backoff with jitter, honouring retry-after."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from ._model import ModelFailure

T = TypeVar("T")
Sleep = Callable[[float], Awaitable[None]]


class RetryableFailure(Exception):
    """One attempt failed in a way another attempt may fix (transport error, 429, 5xx).

    ``retry_after`` is the server's requested wait in seconds, when it gave one.
    """

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently a model request is retried."""

    attempts: int = 5
    base_delay_s: float = 1.0
    max_delay_s: float = 60.0

    def delay(self, failed_attempts: int, retry_after: float | None, jitter: float) -> float:
        """Seconds to wait after ``failed_attempts`` failures; ``jitter`` is in [0, 1)."""
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.max_delay_s)
        backoff: float = min(self.base_delay_s * 2.0 ** (failed_attempts - 1), self.max_delay_s)
        return backoff * (0.5 + 0.5 * jitter)


def parse_retry_after(headers: object) -> float | None:
    """Seconds from ``retry-after-ms`` or ``retry-after`` (seconds form), else None."""
    get = getattr(headers, "get", None)
    if get is None:
        return None
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = get(name)
        if value is None:
            continue
        try:
            return float(value) * scale
        except ValueError:
            continue  # an HTTP date: fall back to backoff
    return None


async def with_retries(
    attempt: Callable[[], Awaitable[T]],
    policy: RetryPolicy,
    what: str,
    *,
    sleep: Sleep | None = None,
    jitter: Callable[[], float] = random.random,
) -> T:
    """Run ``attempt`` until it succeeds, retrying on RetryableFailure.

    Anything else propagates at once. After the last attempt, ModelFailure
    says what was tried and the last error.
    """
    for n in range(1, policy.attempts + 1):
        try:
            return await attempt()
        except RetryableFailure as exc:
            if n == policy.attempts:
                raise ModelFailure(f"{what} failed after {n} attempts; last error: {exc}") from None
            await (sleep or asyncio.sleep)(policy.delay(n, exc.retry_after, jitter()))
    raise AssertionError("unreachable")
