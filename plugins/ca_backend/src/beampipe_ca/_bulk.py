"""The bulk read API: many PVs in one wire batch, a failed PV is ``None`` and never fails the rest.

Single reads (:func:`caget`) go through the same Coalescer, so reads made at
the same time by many threads or coroutines leave together without anyone
asking for a batch.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from beampipe import Failed, Ok, Outcome

from ._libca import CaError, Reading, context, logger

__all__ = [
    "CaTimeoutError",
    "bulk_get",
    "bulk_get_async",
    "bulk_read",
    "bulk_read_async",
    "caget",
    "caget_async",
    "connect",
    "connect_async",
]


class CaTimeoutError(CaError, TimeoutError):
    """A PV that did not connect or answer in time; the message names it."""


def _names(names: Iterable[str]) -> list[str]:
    if isinstance(names, str | bytes):
        raise TypeError(f"names must be a collection of PV names, not one string: {names!r}")
    out = list(dict.fromkeys(names))
    bad = [n for n in out if not isinstance(n, str) or not n or len(n) > 1000]
    if bad:
        raise ValueError(f"invalid PV names (must be non-empty str): {bad[:5]!r}")
    return out


def _timeout(timeout: float) -> float:
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    return float(timeout)


def _read_reserve(timeout: float) -> float:
    """How much of a call's timeout is kept for the read after waiting for connections."""
    return min(0.25 * timeout, 1.0)


def _not_connected(name: str, timeout: float) -> Failed:
    return Failed(f"{name}: not connected within {timeout:g} s (no CA server answered its search)")


def _collect(
    names: list[str],
    down: set[str],
    timeout: float,
    reads: dict[str, Outcome[Any]],
    ctrls: dict[str, Outcome[Any]] | None,
    what: str,
) -> dict[str, Reading | None]:
    out: dict[str, Reading | None] = {}
    failures: list[str] = []
    for name in names:
        outcome = _not_connected(name, timeout) if name in down else reads.get(name)
        if outcome is None:
            outcome = Failed(f"{name}: out of time before the read was issued")
        if isinstance(outcome, Ok):
            reading: Reading = outcome.value
            if ctrls is not None:
                md = ctrls.get(name)
                if isinstance(md, Ok):
                    reading = reading._replace(ctrl=md.value)
                else:
                    failures.append(md.reason if isinstance(md, Failed) else f"{name}: no ctrl")
            out[name] = reading
        else:
            out[name] = None
            failures.append(outcome.reason)
    if failures:
        logger.warning(
            "%s: %d of %d PVs failed: %s", what, len(failures), len(names), "; ".join(failures)
        )
    return out


# -- connect -----------------------------------------------------------------------------
def connect(names: Iterable[str], timeout: float = 5.0) -> list[str]:
    """Connect many PVs at once (one search burst); returns the names that did not connect."""
    names, timeout = _names(names), _timeout(timeout)
    ctx = context()
    return [c.name for c in ctx.wait_connected(ctx.channels(names), timeout)]


async def connect_async(names: Iterable[str], timeout: float = 5.0) -> list[str]:
    """Like :func:`connect`, without blocking the event loop."""
    names, timeout = _names(names), _timeout(timeout)
    ctx = context()
    return [c.name for c in await ctx.wait_connected_async(ctx.channels(names), timeout)]


# -- readings --------------------------------------------------------------------------------
def bulk_read(
    names: Iterable[str], timeout: float = 5.0, *, ctrl: bool = False
) -> dict[str, Reading | None]:
    """Fresh readings (value, timestamp, severity, status; ctrl metadata if asked) of many PVs.

    A PV that does not connect or answer within ``timeout`` maps to ``None``
    and the reason is logged; the others are unaffected.
    """
    names, timeout = _names(names), _timeout(timeout)
    ctx = context()
    deadline = time.monotonic() + timeout
    chans = ctx.channels(names)
    reads: dict[str, Outcome[Any]] = {}
    ctrls: dict[str, Outcome[Any]] | None = {} if ctrl else None

    def read(wave: list[str]) -> None:
        left = deadline - time.monotonic()
        if wave and left > 0:
            reads.update(ctx.read_now(wave, left, ctx.io.plans["time"]))
            left = deadline - time.monotonic()
            if ctrls is not None and left > 0:
                ctrls.update(ctx.read_now(wave, left, ctx.io.plans["ctrl"]))

    # Wave 1: what is connected already is read at once; wave 2: what connects in time,
    # with part of the timeout kept back so a late connection still gets its read.
    read([c.name for c in chans if c.connected.is_set()])
    waiting = [c for c in chans if not c.connected.is_set()]
    down: set[str] = set()
    if waiting:
        budget = deadline - time.monotonic() - _read_reserve(timeout)
        down = {c.name for c in ctx.wait_connected(waiting, max(0.0, budget))}
        read([c.name for c in waiting if c.name not in down])
    return _collect(names, down, timeout, reads, ctrls, "bulk_read")


async def bulk_read_async(
    names: Iterable[str], timeout: float = 5.0, *, ctrl: bool = False
) -> dict[str, Reading | None]:
    """Like :func:`bulk_read` for coroutines; concurrent calls in one loop turn share a batch."""
    import asyncio

    names, timeout = _names(names), _timeout(timeout)
    ctx = context()
    deadline = time.monotonic() + timeout
    chans = ctx.channels(names)
    reads: dict[str, Outcome[Any]] = {}
    ctrls: dict[str, Outcome[Any]] | None = {} if ctrl else None

    async def read(wave: list[str]) -> None:
        left = deadline - time.monotonic()
        if not wave or left <= 0:
            return
        if ctrls is None:
            reads.update(await ctx.read_now_async(wave, left, ctx.io.plans["time"]))
            return
        got, md = await asyncio.gather(
            ctx.read_now_async(wave, left, ctx.io.plans["time"]),
            ctx.read_now_async(wave, left, ctx.io.plans["ctrl"]),
        )
        reads.update(got)
        ctrls.update(md)

    await read([c.name for c in chans if c.connected.is_set()])
    waiting = [c for c in chans if not c.connected.is_set()]
    down: set[str] = set()
    if waiting:
        budget = deadline - time.monotonic() - _read_reserve(timeout)
        down = {c.name for c in await ctx.wait_connected_async(waiting, max(0.0, budget))}
        await read([c.name for c in waiting if c.name not in down])
    return _collect(names, down, timeout, reads, ctrls, "bulk_read_async")


# -- values ------------------------------------------------------------------------------------
def bulk_get(names: Iterable[str], timeout: float = 5.0) -> dict[str, Any | None]:
    """Fresh values of many PVs in one batch: scalars as Python numbers/str, arrays as numpy.

    A PV that fails is ``None`` (reason logged), never a failed batch.
    """
    return {n: (r.value if r is not None else None) for n, r in bulk_read(names, timeout).items()}


async def bulk_get_async(names: Iterable[str], timeout: float = 5.0) -> dict[str, Any | None]:
    """Like :func:`bulk_get` for coroutines."""
    readings = await bulk_read_async(names, timeout)
    return {n: (r.value if r is not None else None) for n, r in readings.items()}


def _single(name: str, timeout: float) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError(f"PV name must be a non-empty str, got {name!r}")
    _timeout(timeout)


def _raise(outcome: Outcome[Any], name: str) -> Reading:
    if isinstance(outcome, Ok):
        value: Reading = outcome.value
        return value
    assert isinstance(outcome, Failed)
    if "timed out" in outcome.reason or "not connected" in outcome.reason:
        raise CaTimeoutError(outcome.reason)
    raise CaError(outcome.reason)


def caget(name: str, timeout: float = 5.0) -> Reading:
    """One fresh reading; raises :class:`CaTimeoutError` naming the PV when it cannot be read.

    Calls made at the same time from many threads share wire batches.
    """
    _single(name, timeout)
    ctx = context()
    deadline = time.monotonic() + timeout
    chan = ctx.channel(name)
    if not chan.connected.is_set() and not chan.connected.wait(timeout - _read_reserve(timeout)):
        raise CaTimeoutError(_not_connected(name, timeout).reason)
    return _raise(ctx.reads.get("time", name, max(1e-3, deadline - time.monotonic())), name)


async def caget_async(name: str, timeout: float = 5.0) -> Reading:
    """One fresh reading from a coroutine; a ``gather`` over many leaves as one batch."""
    _single(name, timeout)
    ctx = context()
    deadline = time.monotonic() + timeout
    chan = ctx.channel(name)
    if await ctx.wait_connected_async([chan], timeout - _read_reserve(timeout)):
        raise CaTimeoutError(_not_connected(name, timeout).reason)
    left = max(1e-3, deadline - time.monotonic())
    return _raise(await ctx.reads.get_async("time", name, left), name)
