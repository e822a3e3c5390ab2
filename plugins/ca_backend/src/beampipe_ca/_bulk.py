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


#: Name lists already checked (a scan reads the same list again and again), as checked.
_CHECKED: dict[tuple[Any, ...], list[str]] = {}


def _names(names: Iterable[str]) -> list[str]:
    if isinstance(names, (str, bytes)):
        raise TypeError(f"names must be a collection of PV names, not one string: {names!r}")
    key = tuple(names)
    try:
        return _CHECKED[key]
    except (KeyError, TypeError):  # (TypeError: an unhashable name, which the check names)
        pass
    if not all(type(n) is str and 0 < len(n) <= 1000 for n in key):
        bad = [n for n in key if not isinstance(n, str) or not n or len(n) > 1000]
        raise ValueError(f"invalid PV names (must be non-empty str): {bad[:5]!r}")
    out = list(dict.fromkeys(key))
    if len(_CHECKED) >= 64:
        _CHECKED.clear()
    _CHECKED[key] = out
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


def _finish(
    names: list[str],
    ok: dict[str, Any],
    failed: dict[str, str],
    what: str,
) -> dict[str, Any]:
    """Every name mapped to its result or ``None``; the reasons for the ``None`` are logged."""
    if len(ok) == len(names):
        # The common case: everything answered; keep the caller's order.
        return ok if list(ok) == names else {name: ok[name] for name in names}
    out = {name: ok.get(name) for name in names}
    reasons = [failed.get(n, f"{n}: no result") for n in names if n not in ok]
    logger.warning(
        "%s: %d of %d PVs failed: %s", what, len(reasons), len(names), "; ".join(reasons)
    )
    return out


def _with_ctrl(
    ok: dict[str, Reading], failed: dict[str, str], ctrls: dict[str, Outcome[Any]]
) -> None:
    for name, reading in list(ok.items()):
        md = ctrls.get(name)
        if isinstance(md, Ok):
            ok[name] = reading._replace(ctrl=md.value)
        else:
            del ok[name]
            failed[name] = md.reason if isinstance(md, Failed) else f"{name}: no ctrl metadata"


def _read_sync(
    names: list[str], timeout: float, ctrl: bool, readings: bool
) -> tuple[dict[str, Any], dict[str, str]]:
    ctx = context()
    deadline = time.monotonic() + timeout
    # Names read before and all still connected need no channel made or waited for.
    chans = [] if ctx.plan(names).ready else ctx.channels(names)
    ok: dict[str, Any] = {}
    failed: dict[str, str] = {}

    def read(wave: list[str]) -> None:
        left = deadline - time.monotonic()
        if not wave or left <= 0:
            return
        got, bad = ctx.read_time_now(wave, left, readings=readings)
        if ctrl:
            left = deadline - time.monotonic()
            ctrls = ctx.read_now(list(got), left, ctx.io.plans["ctrl"]) if left > 0 else {}
            _with_ctrl(got, bad, ctrls)
        ok.update(got)
        failed.update(bad)

    # Wave 1: what is connected already is read at once; wave 2: what connects in time,
    # with part of the timeout kept back so a late connection still gets its read.
    waiting = [c for c in chans if not c.up]
    read([c.name for c in chans if c.up] if waiting else names)
    if waiting:
        budget = deadline - time.monotonic() - _read_reserve(timeout)
        down = {c.name for c in ctx.wait_connected(waiting, max(0.0, budget))}
        for name in down:
            failed[name] = _not_connected(name, timeout).reason
        read([c.name for c in waiting if c.name not in down])
    return ok, failed


async def _read_async(
    names: list[str], timeout: float, ctrl: bool
) -> tuple[dict[str, Reading], dict[str, str]]:
    import asyncio

    from ._libca import _split

    ctx = context()
    deadline = time.monotonic() + timeout
    chans = ctx.channels(names)
    ok: dict[str, Reading] = {}
    failed: dict[str, str] = {}

    async def read(wave: list[str]) -> None:
        left = deadline - time.monotonic()
        if not wave or left <= 0:
            return
        if ctrl:
            times, ctrls = await asyncio.gather(
                ctx.read_now_async(wave, left, ctx.io.plans["time"]),
                ctx.read_now_async(wave, left, ctx.io.plans["ctrl"]),
            )
        else:
            times, ctrls = await ctx.read_now_async(wave, left, ctx.io.plans["time"]), {}
        got, bad = _split(times, True)
        if ctrl:
            _with_ctrl(got, bad, ctrls)
        ok.update(got)
        failed.update(bad)

    waiting = [c for c in chans if not c.up]
    await read([c.name for c in chans if c.up] if waiting else names)
    if waiting:
        budget = deadline - time.monotonic() - _read_reserve(timeout)
        down = {c.name for c in await ctx.wait_connected_async(waiting, max(0.0, budget))}
        for name in down:
            failed[name] = _not_connected(name, timeout).reason
        await read([c.name for c in waiting if c.name not in down])
    return ok, failed


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


# -- readings and values -------------------------------------------------------------------
def bulk_read(
    names: Iterable[str], timeout: float = 5.0, *, ctrl: bool = False
) -> dict[str, Reading | None]:
    """Fresh readings (value, timestamp, severity, status; ctrl metadata if asked) of many PVs.

    A PV that does not connect or answer within ``timeout`` maps to ``None``
    and the reason is logged; the others are unaffected.
    """
    names, timeout = _names(names), _timeout(timeout)
    return _finish(names, *_read_sync(names, timeout, ctrl, True), "bulk_read")


async def bulk_read_async(
    names: Iterable[str], timeout: float = 5.0, *, ctrl: bool = False
) -> dict[str, Reading | None]:
    """Like :func:`bulk_read` for coroutines, without blocking the event loop."""
    names, timeout = _names(names), _timeout(timeout)
    return _finish(names, *await _read_async(names, timeout, ctrl), "bulk_read_async")


def bulk_get(names: Iterable[str], timeout: float = 5.0) -> dict[str, Any | None]:
    """Fresh values of many PVs in one batch: scalars as Python numbers/str, arrays as numpy.

    A PV that fails is ``None`` (reason logged), never a failed batch.
    """
    names, timeout = _names(names), _timeout(timeout)
    return _finish(names, *_read_sync(names, timeout, False, False), "bulk_get")


async def bulk_get_async(names: Iterable[str], timeout: float = 5.0) -> dict[str, Any | None]:
    """Like :func:`bulk_get` for coroutines."""
    names, timeout = _names(names), _timeout(timeout)
    ok, failed = await _read_async(names, timeout, False)
    return _finish(names, {n: r.value for n, r in ok.items()}, failed, "bulk_get_async")


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
    if not chan.up and ctx.wait_connected([chan], timeout - _read_reserve(timeout)):
        raise CaTimeoutError(_not_connected(name, timeout).reason)
    left = max(1e-3, deadline - time.monotonic())
    return _raise(ctx.reads.get("time", name, left, ctx.route(name)), name)


async def caget_async(name: str, timeout: float = 5.0) -> Reading:
    """One fresh reading from a coroutine; a ``gather`` over many leaves as one batch."""
    _single(name, timeout)
    ctx = context()
    deadline = time.monotonic() + timeout
    chan = ctx.channel(name)
    if await ctx.wait_connected_async([chan], timeout - _read_reserve(timeout)):
        raise CaTimeoutError(_not_connected(name, timeout).reason)
    left = max(1e-3, deadline - time.monotonic())
    return _raise(await ctx.reads.get_async("time", name, left, ctx.route(name)), name)
