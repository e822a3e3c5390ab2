"""zocalo bridge vs bare workflows PikaTransport, same broker, same run.

Measures (on the RabbitMQ at BEAMPIPE_AMQP_HOST/PORT, default 127.0.0.1:5672):

* publish rate: ReliableSender (persistent connection, publisher confirms,
  JSON of a processing request) vs PikaTransport.send (no confirms);
* round trip, one message at a time, p50/p99: bare PikaTransport send ->
  subscribed PikaTransport receive, vs the bridge's trigger -> result:
  ZocaloCallback -> BeampipeDispatcher -> BeampipeFrameAnalysis -> ResultsListener
  (two real ``zocalo.service`` processes, each hop a broker round trip);
* throughput of both paths with everything in flight at once.

Every message is checked to have arrived before any number is printed.
Run: .venv/bin/python benchmarks/zocalo_bench.py [--n 400]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pika
from workflows.transport.pika_transport import PikaTransport

from beampipe_zocalo import (
    BrokerParams,
    GuardedPikaTransport,
    PikaPublisher,
    ReliableSender,
    ResultsListener,
    TransportPublisher,
    TriggerRule,
    ZocaloCallback,
    delete_queues,
    dlq_name,
    ensure_queue,
    frame_analysis_recipe,
    go_headers,
)

BIN = Path(sys.executable).parent


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


def ms(x: float) -> str:
    return f"{1e3 * x:8.2f} ms"


class Bench:
    def __init__(self, broker: BrokerParams) -> None:
        self.broker = broker
        self.ns = f"bpbench.{secrets.token_hex(4)}"
        self.queues: list[str] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []

    def q(self, suffix: str) -> str:
        name = f"{self.ns}.{suffix}"
        self.queues += [name, dlq_name(name)]
        return name

    def conn(self) -> pika.BlockingConnection:
        return pika.BlockingConnection(self.broker.pika())

    def service(self, name: str, args: list[str], **settings: str) -> Path:
        env = {k: v for k, v in os.environ.items() if not k.startswith("BEAMPIPE_ZOCALO_")}
        env.pop("ZOCALO_CONFIG", None)
        env.update({f"BEAMPIPE_ZOCALO_{k.upper()}": v for k, v in settings.items()})
        log = Path(tempfile.gettempdir()) / f"{self.ns}-{name}-{len(self.procs)}.log"
        with open(log, "wb") as fh:
            self.procs.append(
                subprocess.Popen(
                    [str(BIN / "zocalo.service"), "-s", name, *args],
                    env=env,
                    stdout=fh,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        self.logs.append(log)
        return log

    @staticmethod
    def wait_line(log: Path, line: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while line not in log.read_text(errors="replace"):
            if time.monotonic() > deadline:
                raise SystemExit(f"service not ready ({log}):\n{log.read_text()[-2000:]}")
            time.sleep(0.1)

    def wait_consumer(self, queue: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            c = self.conn()
            try:
                if c.channel().queue_declare(queue, passive=True).method.consumer_count:
                    return
            except pika.exceptions.ChannelClosedByBroker:
                pass
            finally:
                if c.is_open:
                    c.close()
            time.sleep(0.2)
        raise SystemExit(f"no consumer on {queue} after {timeout} s")

    def close(self) -> None:
        self.stop_services()
        c = self.conn()
        delete_queues(c, self.queues)
        c.close()
        for log in self.logs:
            log.unlink(missing_ok=True)
        with contextlib.suppress(ImportError):
            from beampipe_shm import ShmTransport

            ShmTransport.remove_store(self.ns)

    def stop_services(self) -> None:
        for p in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)
        self.procs.clear()


def bare_pika(b: Bench, n: int, m: int) -> dict[str, Any]:
    q = b.q("bare")
    c = b.conn()
    ensure_queue(c, q)
    c.close()
    PikaTransport.config.update(
        {"--rabbit-host": b.broker.host, "--rabbit-port": str(b.broker.port)}
    )
    tx, rx = PikaTransport(), PikaTransport()
    tx.connect()
    rx.connect()
    got: dict[int, float] = {}
    cond = threading.Condition()

    def on(header: Any, msg: Any) -> None:
        with cond:
            got[msg["i"]] = time.perf_counter()
            cond.notify_all()

    rx.subscribe(q, on, prefetch_count=256)
    msg = {"recipes": ["r"], "parameters": {"ispyb_dcid": 1}}
    # Sequential round trips.
    lat = []
    for i in range(m):
        t0 = time.perf_counter()
        tx.send(q, {**msg, "i": i}, headers=go_headers())
        with cond:
            assert cond.wait_for(lambda i=i: i in got, 10), f"bare message {i} lost"
            lat.append(got[i] - t0)
    got.clear()
    # Publish rate and throughput with everything in flight.
    t0 = time.perf_counter()
    for i in range(n):
        tx.send(q, {**msg, "i": i}, headers=go_headers())
    t_pub = time.perf_counter() - t0
    with cond:
        assert cond.wait_for(lambda: len(got) == n, 60), f"bare: {len(got)} of {n} arrived"
    t_all = max(got.values()) - t0
    tx.disconnect()
    rx.disconnect()
    PikaTransport.config.clear()
    return {"lat": lat, "pub_rate": n / t_pub, "thru": n / t_all}


def confirmed_publish(b: Bench, n: int) -> float:
    """ReliableSender: messages/s until the broker confirmed every one of them."""
    q = b.q("confirmed")
    msg = {"recipes": ["r"], "parameters": {"ispyb_dcid": 1}}
    with ReliableSender(PikaPublisher(b.broker)) as sender:
        sender.send(q, msg, go_headers())  # connect + declare outside the timing
        assert sender.flush(30)
        t0 = time.perf_counter()
        for i in range(n):
            sender.send(q, {**msg, "i": i}, go_headers())
        assert sender.flush(60) and sender.stats.sent == n + 1, sender.stats
        rate = n / (time.perf_counter() - t0)
    c = b.conn()
    depth = c.channel().queue_declare(q, passive=True).method.message_count
    c.close()
    assert depth == n + 1, f"{depth} of {n + 1} confirmed messages in {q}"
    return rate


def bridge(b: Bench, n: int, m: int, kind: str) -> dict[str, Any]:
    """The bridge on RabbitMQ (GuardedPikaTransport) or on beampipe_shm's ShmTransport."""
    processing, analysis = b.q(f"{kind}.processing"), b.q(f"{kind}.analysis")
    factory: Any
    if kind == "pika":
        args = [
            "-t",
            "GuardedPikaTransport",
            "--rabbit-host",
            b.broker.host,
            "--rabbit-port",
            str(b.broker.port),
        ]
        publisher: Any = PikaPublisher(b.broker)

        def factory() -> Any:
            return GuardedPikaTransport(broker=b.broker)
    else:
        from beampipe_shm import ShmTransport

        args = ["-t", "ShmTransport", "--shm-namespace", b.ns]

        def factory() -> Any:
            return ShmTransport(namespace=b.ns)

        publisher = TransportPublisher(factory)
    d_log = b.service("BeampipeDispatcher", args, processing_queue=processing)
    a_log = b.service("BeampipeFrameAnalysis", args, analysis_queue=analysis)
    b.wait_line(d_log, "dispatching requests from")
    b.wait_line(a_log, "frame analysis on")
    recipe = frame_analysis_recipe(analysis)
    rule = TriggerRule(
        name="f", on=["event"], custom_recipe=recipe, parameters={"frame": "event.data.cam"}
    )
    listener = ResultsListener(factory, queue=b.q(f"{kind}.results")).start()
    sender = ReliableSender(publisher)
    cb = ZocaloCallback([rule], sender, queue=processing, reply_to=listener.queue)
    arrived: dict[str, float] = {}
    cond = threading.Condition()

    def on_result(run: str, tid: str) -> None:
        with cond:
            arrived[tid] = time.perf_counter()
            cond.notify_all()

    listener.on_result = on_result
    frame = np.random.default_rng(0).random((16, 16))

    def run(uid: str, count: int, sequential: bool) -> tuple[list[float], float, float]:
        cb("start", {"uid": uid, "time": 0})
        cb("descriptor", {"uid": uid + "d", "run_start": uid, "name": "primary"})
        lat, t0 = [], time.perf_counter()
        for i in range(1, count + 1):
            t = time.perf_counter()
            cb(
                "event",
                {
                    "uid": f"{uid}e{i}",
                    "descriptor": uid + "d",
                    "seq_num": i,
                    "data": {"cam": frame},
                    "timestamps": {},
                    "time": 0,
                },
            )
            if sequential:
                tid = f"{uid}/f/event/{i}"
                with cond:
                    assert cond.wait_for(lambda tid=tid: tid in arrived, 30), f"{tid} lost"
                    lat.append(arrived[tid] - t)
        t_pub = time.perf_counter() - t0
        with cond:
            assert cond.wait_for(lambda: sum(k.startswith(uid) for k in arrived) == count, 120), (
                f"bridge: {sum(k.startswith(uid) for k in arrived)} of {count} results"
            )
        t_all = max(v for k, v in arrived.items() if k.startswith(uid)) - t0
        cb("stop", {"uid": uid + "s", "run_start": uid})
        return lat, count / t_pub, count / t_all

    try:
        run("warmup", 20, True)
        lat, _, _ = run("seq", m, True)
        _, pub_rate, thru = run("burst", n, False)
        assert sender.flush(30) and sender.stats.to_fallback == 0
        assert not listener.rejected
        return {"lat": lat, "pub_rate": pub_rate, "thru": thru, "dups": listener.duplicates}
    finally:
        listener.close()
        sender.close()
        b.stop_services()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=400, help="messages for the throughput runs")
    ap.add_argument("--m", type=int, default=200, help="sequential round trips for latency")
    args = ap.parse_args()
    broker = BrokerParams(
        os.environ.get("BEAMPIPE_AMQP_HOST", "127.0.0.1"),
        int(os.environ.get("BEAMPIPE_AMQP_PORT", "5672")),
    )
    b = Bench(broker)
    t_start = time.monotonic()
    try:
        bare = bare_pika(b, args.n, args.m)
        confirmed = confirmed_publish(b, args.n)
        br = bridge(b, args.n, args.m, "pika")
        try:
            import beampipe_shm  # noqa: F401

            shm: dict[str, Any] | None = bridge(b, args.n, args.m, "shm")
        except ImportError:
            shm = None
    finally:
        b.close()
    print(
        f"zocalo bridge benchmark on {broker} (n={args.n} burst, m={args.m} sequential); "
        f"{time.monotonic() - t_start:.0f} s"
    )
    cols = ["bare PikaTransport", "bridge/pika", "ratio"] + (["bridge/shm", "ratio"] if shm else [])
    print(f"{'':34s}" + "".join(f"{c:>19s}" for c in cols))

    def row(label: str, x: float, y: float, z: float | None, fmt: Any) -> None:
        cells = [fmt(x), fmt(y), f"{y / x:.2f}"]
        if z is not None:
            cells += [fmt(z), f"{z / x:.2f}"]
        print(f"{label:34s}" + "".join(f"{c:>19s}" for c in cells))

    def rate(v: float) -> str:
        return f"{v:.0f}"

    row(
        "send, caller's view (msg/s)",
        bare["pub_rate"],
        br["pub_rate"],
        shm["pub_rate"] if shm else None,
        rate,
    )
    row("send, confirmed (msg/s)", bare["pub_rate"], confirmed, None, rate)
    row(
        "end-to-end throughput (msg/s)",
        bare["thru"],
        br["thru"],
        shm["thru"] if shm else None,
        rate,
    )
    for q in (50, 99):
        row(
            f"round trip p{q}",
            pct(bare["lat"], q),
            pct(br["lat"], q),
            pct(shm["lat"], q) if shm else None,
            ms,
        )
    print(
        "bare = PikaTransport.send -> subscribed PikaTransport (unconfirmed, one hop). "
        "bridge = trigger -> result: ZocaloCallback -> BeampipeDispatcher -> "
        "BeampipeFrameAnalysis -> ResultsListener (3 hops, 2 zocalo.service processes, "
        "16x16 frame). caller's view = RunEngine-thread cost of one trigger."
    )
    print(f"duplicates: pika {br['dups']}" + (f", shm {shm['dups']}" if shm else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
