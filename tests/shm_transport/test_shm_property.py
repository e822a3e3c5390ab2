"""Property tests: any schema round-trips; random publish/read/hold/release sequences keep
the invariants (order, gap accounting, leased data never changes, drops only when full)."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is a dev dependency")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402

from beampipe_shm import Frame, Producer, Reader, StreamSpec  # noqa: E402

_names = itertools.count()
SETTINGS = settings(
    max_examples=150,
    deadline=None,
    database=None,  # nothing written into the work tree
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)

dtypes = st.one_of(
    hnp.integer_dtypes(endianness="="),
    hnp.unsigned_integer_dtypes(endianness="="),
    hnp.floating_dtypes(endianness="=", sizes=(32, 64)),
    hnp.complex_number_dtypes(endianness="="),
    hnp.boolean_dtypes(),
    st.just(np.dtype([("t", "<f8"), ("x", "<i4"), ("ok", "?")])),
)


@st.composite
def schemas(draw: Any) -> list[StreamSpec]:
    n = draw(st.integers(1, 4))
    out = []
    for i in range(n):
        shape = tuple(draw(st.lists(st.integers(1, 6), min_size=0, max_size=3)))
        variable = bool(shape) and draw(st.booleans())
        out.append(
            StreamSpec(
                f"s{i}", draw(dtypes), shape, units=draw(st.text(max_size=5)), variable=variable
            )
        )
    return out


def frame_for(draw: Any, specs: list[StreamSpec]) -> dict[str, np.ndarray[Any, Any]]:
    data = {}
    for s in specs:
        shape = s.shape
        if s.variable:
            shape = (draw(st.integers(0, s.shape[0])), *s.shape[1:])
        data[s.name] = draw(hnp.arrays(s.dtype, shape))
    return data


def same(a: np.ndarray[Any, Any], b: np.ndarray[Any, Any]) -> bool:
    return a.shape == b.shape and a.tobytes() == b.tobytes()  # bitwise: NaNs compare equal


@SETTINGS
@given(data=st.data(), specs=schemas(), copy=st.booleans())
def test_any_schema_round_trips(
    shm_name: str, data: Any, specs: list[StreamSpec], copy: bool
) -> None:
    name = f"{shm_name}-{next(_names)}"
    frames = [frame_for(data.draw, specs) for _ in range(data.draw(st.integers(1, 3)))]
    ids = data.draw(st.lists(st.integers(-(2**63), 2**63 - 1), min_size=3, max_size=3))
    attrs = data.draw(
        st.dictionaries(st.text(max_size=8), st.integers() | st.text(max_size=8), max_size=3)
    )
    with (
        Producer(name, specs, slots=4) as p,
        Reader(name, mode="every", copy=copy, max_leases=4, expect=specs) as r,
    ):
        for i, fr in enumerate(frames):
            assert p.publish(fr, frame_id=ids[i], attrs=attrs) == i + 1
        got = [r.read(timeout=0) for _ in frames]
        for fr, g, fid in zip(frames, got, ids, strict=False):
            assert g is not None
            assert g.frame_id == fid
            assert g.attrs == attrs
            for n, a in fr.items():
                assert same(g[n], a), n
            g.release()
        assert r.read(timeout=0) is None


OPS = st.lists(
    st.sampled_from(["publish", "publish", "publish", "every", "latest", "release", "copy"]),
    min_size=1,
    max_size=60,
)


@SETTINGS
@given(ops=OPS, slots=st.integers(2, 5), rand=st.randoms(use_true_random=False))
def test_random_interleavings_keep_the_invariants(
    shm_name: str, ops: list[str], slots: int, rand: Any
) -> None:
    name = f"{shm_name}-{next(_names)}"
    spec = [StreamSpec("v", "int64", (16,))]
    with (
        Producer(name, spec, slots=slots) as p,
        Reader(name, mode="every", max_leases=slots) as every,
        Reader(name, mode="latest", copy=True) as latest,
    ):
        held: list[tuple[Frame, int]] = []
        delivered_every: list[int] = []
        missed_every = 0
        published = 0
        last_latest = 0
        for op in ops:
            if op == "publish":
                leased = {f.seq for f, _ in held if f.leased}
                seq = p.publish(np.full(16, published + 1, np.int64))
                if seq is None:
                    # dropped only when the reader leases every slot
                    assert len(leased) == slots
                else:
                    published += 1
                    assert seq == published
            elif op == "every":
                if len(held) >= slots:
                    continue
                f = every.read(timeout=0)
                if f is not None:
                    if delivered_every:
                        assert f.seq > delivered_every[-1]
                        assert f.missed == f.seq - delivered_every[-1] - 1
                    delivered_every.append(f.seq)
                    missed_every += f.missed
                    assert (f["v"] == f.seq).all()
                    held.append((f, f.seq))
            elif op == "latest":
                f = latest.read(timeout=0)
                if f is not None:
                    assert f.seq > last_latest
                    assert (f["v"] == f.seq).all()
                    last_latest = f.seq
            elif op == "release" and held:
                f, _ = held.pop(rand.randrange(len(held)))
                f.release()
            elif op == "copy":
                copies = [f.copy() for f, _ in held]
                assert all(c["v"].flags.writeable for c in copies)
            # leased data never changes, whatever the producer did meanwhile
            for f, seq in held:
                assert (f["v"] == seq).all()
        # everything published was delivered to the every-frame reader or counted as missed
        for f, _ in held:
            f.release()
        while (f := every.read(timeout=0)) is not None:
            missed_every += f.missed
            delivered_every.append(f.seq)
            f.release()
        if published:
            assert delivered_every[-1] == published
        assert len(delivered_every) + missed_every == published
