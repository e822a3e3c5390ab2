from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).parent
TEST_DB = HERE / "ca_test.db"
BANK_SIZE = 200


def bank_db(path: Path, n: int = BANK_SIZE) -> Path:
    """A database of ``n`` ao records ``$(P)s<i>`` (VAL=i) and ``n`` 1000-double waveforms."""
    lines = [
        f'record(ao, "$(P)s{i}") {{ field(VAL, "{i}") field(PREC, "2") field(EGU, "V") }}'
        for i in range(n)
    ]
    lines += [
        f'record(waveform, "$(P)w{i}") {{ field(FTVL, "DOUBLE") field(NELM, "1000") }}'
        for i in range(n)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="session")
def ioc(session_ioc_factory):
    """The typed-records IOC, shared by the session (tests that restart it use their own)."""
    return session_ioc_factory(TEST_DB)


@pytest.fixture(scope="session")
def bank_ioc(session_ioc_factory, tmp_path_factory):
    return session_ioc_factory(bank_db(tmp_path_factory.mktemp("bank") / "bank.db"))


@pytest.fixture(autouse=True)
def _purge_aioca_channels():
    """aioca caches channels per event loop and pytest-asyncio gives each test a new loop.

    Channels of a closed loop would call into it on the next connection event,
    so clear them after every test (a real session has one loop and never needs this).
    """
    yield
    import sys

    if "aioca" in sys.modules:
        sys.modules["aioca"].purge_channel_caches()
