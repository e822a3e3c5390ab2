"""beampipe's pytest plugin: real IOC and broker fixtures, EPICS pinned to loopback, leak guards.

Registered through the ``pytest11`` entry point, so any project that installs
``beampipe[testing]`` gets these fixtures without a conftest.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ._broker import Broker, BrokerUnavailable, find_broker
from ._guards import new_segments, new_threads, snapshot_segments, snapshot_threads, wrap_task_guard
from ._ioc import Ioc, pin_epics_to_loopback

IocFactory = Callable[..., Ioc]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        "beampipe_allowed_threads",
        "names of threads a test may leave running (process-wide helpers); "
        "a trailing * matches a prefix",
        type="linelist",
        default=[],
    )


def pytest_configure(config: pytest.Config) -> None:
    # Before any test imports pyepics/aioca/p4p: their contexts read the environment once.
    if os.environ.get("BEAMPIPE_PIN_LOOPBACK", "1") != "0":
        pin_epics_to_loopback()
    # One libca per process (ophyd-async #291): make pyepics load epicscorelibs' libca,
    # the one aioca uses, before any test imports epics.
    with contextlib.suppress(ImportError):
        import epicscorelibs.path.pyepics  # noqa: F401
    config.addinivalue_line(
        "markers", "broker: needs RabbitMQ on 127.0.0.1:5672 (skips without it, fails under CI)"
    )
    config.addinivalue_line(
        "markers", "allow_leaks(*kinds): let a test leave 'threads', 'tasks' or 'shm' behind"
    )


def _allowed(item: pytest.Item) -> set[str]:
    return {kind for m in item.iter_markers("allow_leaks") for kind in m.args}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        func = getattr(item, "obj", None)
        if (
            isinstance(item, pytest.Function)
            and inspect.iscoroutinefunction(func)
            and "tasks" not in _allowed(item)
        ):
            item.obj = wrap_task_guard(func, item.nodeid)


@pytest.fixture(autouse=True)
def _beampipe_leak_guard(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail the test that leaves threads or shared-memory segments behind."""
    allowed = _allowed(request.node)
    threads, segments = snapshot_threads(), snapshot_segments()
    yield
    problems = []
    if "threads" not in allowed:
        leaked = new_threads(threads, request.config.getini("beampipe_allowed_threads"))
        if leaked:
            problems.append(f"threads still running: {', '.join(t.name for t in leaked)}")
    if "shm" not in allowed:
        left = new_segments(segments)
        if left:
            problems.append(f"shared memory left in /dev/shm: {', '.join(left)}")
    if problems:
        pytest.fail(f"{request.node.nodeid} leaked: " + "; ".join(problems), pytrace=False)


def _ioc_factory() -> Iterator[IocFactory]:
    started: list[Ioc] = []

    def start(db: str | Path, **kwargs: Any) -> Ioc:
        ioc = Ioc(db, **kwargs)
        started.append(ioc)
        return ioc.start()

    yield start
    for ioc in started:
        ioc.close()


@pytest.fixture
def ioc_factory() -> Iterator[IocFactory]:
    """Start real softIocs from .db files, each with a random PV prefix; all stop at teardown.

    ``ioc_factory("my.db", macros={...})`` returns an :class:`Ioc` (``.pv()``,
    ``.restart()``, ``.kill()``) once iocInit has finished.
    """
    yield from _ioc_factory()


@pytest.fixture(scope="session")
def session_ioc_factory() -> Iterator[IocFactory]:
    """Like ``ioc_factory``, for IOCs shared by a whole test session."""
    yield from _ioc_factory()


@pytest.fixture
def rabbitmq() -> Broker:
    """The real RabbitMQ on loopback, with private names; skips without it, fails under CI."""
    try:
        return find_broker()
    except BrokerUnavailable as exc:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"CI=true and the broker tests cannot run: {exc}", pytrace=False)
        pytest.skip(str(exc))
