"""bulk_get over real servers: QSRV in a softIoc and p4p's Server."""

from __future__ import annotations

import asyncio
import logging
import time

import numpy as np
import pytest

import beampipe_pva
from beampipe_pva import NDArrayFrame

from .conftest import IMAGE, PvaServer, require_codec


def test_bulk_get_scalars_from_qsrv(ioc) -> None:
    names = [ioc.pv(s) for s in ("ao", "long", "str", "enum", "wf", "alarmed")]
    values = beampipe_pva.bulk_get(names)
    assert list(values) == names
    assert values[ioc.pv("ao")] == pytest.approx(1.5)
    assert values[ioc.pv("long")] == 42
    assert values[ioc.pv("str")] == "hello"
    assert values[ioc.pv("enum")] == "On"
    assert isinstance(values[ioc.pv("wf")], np.ndarray)
    assert values[ioc.pv("alarmed")] == pytest.approx(5.0)


def test_pva_prefix_is_accepted_and_kept_as_key(ioc) -> None:
    name = "pva://" + ioc.pv("ao")
    assert beampipe_pva.bulk_get([name]) == {name: pytest.approx(1.5)}


def test_unknown_pv_is_none_with_reason_and_does_not_sink_the_batch(ioc, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="beampipe.pva")
    good, bad = ioc.pv("ao"), ioc.pv("does_not_exist")
    t0 = time.monotonic()
    values = beampipe_pva.bulk_get([good, bad], timeout=1.0)
    elapsed = time.monotonic() - t0
    assert values == {good: pytest.approx(1.5), bad: None}
    assert elapsed < 1.5
    assert any(bad in r.message and "no answer" in r.message for r in caplog.records)


def test_bad_arguments_fail_clearly() -> None:
    with pytest.raises(TypeError, match="single string"):
        beampipe_pva.bulk_get("X:ao")
    with pytest.raises(ValueError, match="not a PV name"):
        beampipe_pva.bulk_get(["ok", ""])
    with pytest.raises(ValueError, match="timeout"):
        beampipe_pva.bulk_get(["X:ao"], timeout=0)


def test_many_reads_are_one_batch(ioc) -> None:
    names = [ioc.pv(s) for s in ("ao", "long", "str", "enum")]
    co = beampipe_pva.coalescer()
    beampipe_pva.bulk_get(names)
    before = co.batches_issued
    beampipe_pva.bulk_get(names * 3)
    assert co.batches_issued == before + 1


async def test_concurrent_async_gets_coalesce(ioc) -> None:
    names = [ioc.pv(s) for s in ("ao", "long", "str", "enum")]
    co = beampipe_pva.coalescer()
    await beampipe_pva.bulk_get_async(names)
    before = co.batches_issued
    results = await asyncio.gather(*(beampipe_pva.bulk_get_async([n]) for n in names))
    assert co.batches_issued == before + 1
    assert results[0] == {names[0]: pytest.approx(1.5)}
    assert results[3] == {names[3]: "On"}


def test_reads_are_fresh_not_cached(ioc) -> None:
    from p4p.client.thread import Context

    name = ioc.pv("ao")
    with Context("pva", nt=False) as ctx:
        for v in (2.0, -4.5, 7.25):
            ctx.put(name, v)
            assert beampipe_pva.bulk_get([name]) == {name: pytest.approx(v)}


def test_server_restart_mid_test(ioc) -> None:
    name = ioc.pv("ao")
    assert beampipe_pva.bulk_get([name]) == {name: pytest.approx(1.5)}
    ioc.stop()
    assert beampipe_pva.bulk_get([name], timeout=0.5) == {name: None}
    ioc.start()
    deadline = time.monotonic() + 20
    value = None
    while value is None and time.monotonic() < deadline:
        value = beampipe_pva.bulk_get([name], timeout=2.0)[name]
    assert value == pytest.approx(1.5)


def test_nt_types_from_p4p_server(pva_server: PvaServer) -> None:
    p = pva_server.pv
    values = beampipe_pva.bulk_get([p("table"), p("enum"), p("scalar"), p("image")])
    table = values[p("table")]
    assert list(table) == ["name", "x", "count"]
    assert list(table["name"]) == ["a", "b", "c"]
    np.testing.assert_array_equal(table["x"], [1.5, 2.5, -3.0])
    assert values[p("enum")] == "High"
    assert values[p("scalar")] == pytest.approx(3.25)
    frame = values[p("image")]
    assert isinstance(frame, NDArrayFrame)
    assert frame.shape == IMAGE.shape
    assert frame.dtype == np.uint16
    np.testing.assert_array_equal(frame.data, IMAGE)
    assert frame.unique_id == 17
    assert frame.timestamp == pytest.approx(1_700_000_000.5)
    assert frame.attributes["Gain"] == pytest.approx(2.5)
    assert frame.dims[0].size == 48 and frame.dims[1].size == 64


@pytest.mark.parametrize("codec", ["lz4", "bslz4", "blosc"])
def test_compressed_ndarray(pva_server: PvaServer, codec: str) -> None:
    require_codec(codec)
    name = pva_server.pv(f"image_{codec}")
    frame = beampipe_pva.bulk_get([name])[name]
    assert frame.codec == codec
    assert frame.dtype == np.uint16
    np.testing.assert_array_equal(frame.data, IMAGE)


def test_malformed_ndarray_is_an_error_never_a_wrong_shape(pva_server: PvaServer, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="beampipe.pva")
    name = pva_server.pv("badshape")
    assert beampipe_pva.bulk_get([name]) == {name: None}
    assert any("dimensions [50, 64] need 3200 elements" in r.message for r in caplog.records)
    raw = beampipe_pva.bulk_get_raw([name])[name]
    with pytest.raises(beampipe_pva.DecodeError, match=name):
        beampipe_pva.decode(raw.value, name)


def test_enum_index_out_of_range_is_an_error(pva_server: PvaServer) -> None:
    name = pva_server.pv("badenum")
    raw = beampipe_pva.bulk_get_raw([name])[name]
    with pytest.raises(beampipe_pva.DecodeError, match="outside its 2 choices"):
        beampipe_pva.decode(raw.value, name)
