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
