"""ShmTransport vs PikaTransport (local RabbitMQ), same run, same machine.

Run: ``.venv/bin/python benchmarks/shm_workflows_bench.py`` (20-40 s).

Measures, for each transport through workflows' public API (send/subscribe/ack):
  * small JSON messages/s, auto-ack and with manual ack (prefetch 100), producer and consumer
    in one process (as a service that forwards messages is);
  * request/reply round-trip latency to an echo responder in another process;
  * 8 MiB numpy arrays/s (raw_send; Shm hands the receiver a memory-mapped array whose file
    is reused once acked and unmapped, Pika bytes).
Every message is checked (all indices present, array contents spot-checked) before a time
counts.  RabbitMQ queues are classic non-durable (its fastest setting; zocalo's quorum
queues are slower), so the ratios flatter Pika if anything.  Medians of several repeats.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from workflows.transport.common_transport import CommonTransport

from beampipe_shm import ShmTransport

HOST, PORT = os.environ.get("BEAMPIPE_AMQP_HOST", "127.0.0.1"), 5672
NAMESPACE = f"bench{secrets.token_hex(3)}"
REPEATS = 5


def broker_up() -> bool:
    try:
        with socket.create_connection((HOST, PORT), timeout=1):
            return True
    except OSError:
        return False


def make(kind: str) -> CommonTransport:
    t: CommonTransport
    if kind == "shm":
        t = ShmTransport(namespace=NAMESPACE)
    else:
        from workflows.transport.pika_transport import PikaTransport

        t = PikaTransport()
        t.config = {"--rabbit-host": HOST, "--rabbit-port": PORT}  # type: ignore[misc]
        # workflows shares subscription ids between instances of a process: keep them apart
        t._CommonTransport__subscriptions = {}  # type: ignore[attr-defined]
    t.connect()
    return t


_declared: list[str] = []


def queue(kind: str, name: str) -> str:
    name = f"bench.{NAMESPACE}.{name}"
    if kind == "pika":
        import pika

        with pika.BlockingConnection(pika.ConnectionParameters(HOST, PORT)) as conn:
            conn.channel().queue_declare(name, durable=False)
        _declared.append(name)
    return name


def cleanup() -> None:
    ShmTransport.remove_store(NAMESPACE)
    if _declared and broker_up():
        import pika

        with pika.BlockingConnection(pika.ConnectionParameters(HOST, PORT)) as conn:
            ch = conn.channel()
            for name in _declared:
                ch.queue_delete(name)


class Counter:
    def __init__(self, n: int, check: Callable[[Any], int]) -> None:
        self.n, self.check = n, check
        self.seen: set[int] = set()
        self.done = threading.Event()

    def __call__(self, header: dict[str, Any], message: Any) -> None:
        self.seen.add(self.check(message))
        if len(self.seen) == self.n:
            self.done.set()


def throughput(kind: str, n: int, ack: bool) -> float:
    q = queue(kind, f"tp{'ack' if ack else ''}{secrets.token_hex(2)}")
    tx, rx = make(kind), make(kind)
    try:
        counter = Counter(n, lambda m: m["i"])
        if ack:

            def on(h: dict[str, Any], m: Any) -> None:
                counter(h, m)
                rx.ack(h)

            rx.subscribe(q, on, acknowledgement=True, prefetch_count=100)
        else:
            rx.subscribe(q, counter)
        payload = "x" * 100
        start = time.perf_counter()
        for i in range(n):
            tx.send(q, {"i": i, "payload": payload})
        if not counter.done.wait(120):
            raise AssertionError(f"{kind}: only {len(counter.seen)} of {n} messages arrived")
        return n / (time.perf_counter() - start)
    finally:
        tx.disconnect()
        rx.disconnect()


def throughput_2proc(kind: str, n: int) -> float:
    """Producer in another process, as zocalo.go and a service are: rate at the consumer."""
    q = queue(kind, f"tp2{secrets.token_hex(2)}")
    rx = make(kind)
    producer = subprocess.Popen(
        [sys.executable, __file__, "produce", kind, NAMESPACE, q, str(n)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert producer.stdin is not None and producer.stdout is not None
        counter = Counter(n, lambda m: m["i"])
        rx.subscribe(q, counter)
        assert producer.stdout.readline().strip() == "ready"
        producer.stdin.write("go\n")
        producer.stdin.flush()
        start = float(producer.stdout.readline())
        if not counter.done.wait(120):
            raise AssertionError(f"{kind}: only {len(counter.seen)} of {n} messages arrived")
        end = time.perf_counter()  # CLOCK_MONOTONIC: the same clock in both processes
        return n / (end - start)
    finally:
        rx.disconnect()
        producer.communicate(timeout=60)


def produce(kind: str, namespace: str, q: str, n: int) -> None:
    global NAMESPACE
    NAMESPACE = namespace
    t = make(kind)
    payload = "x" * 100
    print("ready", flush=True)
    sys.stdin.readline()
    print(time.perf_counter(), flush=True)
    for i in range(n):
        t.send(q, {"i": i, "payload": payload})
    t.disconnect()


def round_trip(kind: str, n: int) -> list[float]:
    q = queue(kind, f"echo{secrets.token_hex(2)}")
    responder = subprocess.Popen(
        [sys.executable, __file__, "echo", kind, NAMESPACE, q],
        stdout=subprocess.PIPE,
        text=True,
    )
    t = make(kind)
    try:
        assert responder.stdout is not None and responder.stdout.readline().strip() == "ready"
        got: list[Any] = []
        arrived = threading.Event()

        def on(h: dict[str, Any], m: Any) -> None:
            got.append(m)
            arrived.set()

        reply = t.subscribe_temporary("bench", on).queue_name
        times = []
        for i in range(n):
            arrived.clear()
            start = time.perf_counter()
            t.send(q, {"i": i, "reply_to": reply})
            if not arrived.wait(30):
                raise AssertionError(f"{kind}: no reply to request {i}")
            times.append(time.perf_counter() - start)
            assert got[-1]["i"] == i
        return times
    finally:
        t.disconnect()
        responder.terminate()
        responder.wait(30)


def echo(kind: str, namespace: str, q: str) -> None:
    """Answer requests from the main thread, as a workflows service does.

    Callbacks are handed to the main thread like CommonService's interceptor does: a Pika
    callback runs on the pika thread, where a send() would wait for itself.
    """
    import queue as queue_module
    import signal

    global NAMESPACE
    NAMESPACE = namespace
    t = make(kind)
    work: queue_module.Queue[Any] = queue_module.Queue()
    t.subscription_callback_set_intercept(lambda cb: lambda h, m: work.put((cb, h, m)))
    t.subscribe(q, lambda h, m: t.send(m["reply_to"], {"i": m["i"]}))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print("ready", flush=True)
    while not stop.is_set():
        try:
            cb, h, m = work.get(timeout=0.2)
        except queue_module.Empty:
            continue
        cb(h, m)
    t.disconnect()


def arrays(kind: str, n: int) -> float:
    q = queue(kind, f"arr{secrets.token_hex(2)}")
    tx, rx = make(kind), make(kind)
    frame = np.zeros(1024 * 1024, dtype=np.float64)  # 8 MiB

    def index(m: Any) -> int:
        arr = m if isinstance(m, np.ndarray) else np.frombuffer(m, dtype=np.float64)
        assert arr.nbytes == frame.nbytes and arr[-1] == arr[0]
        return int(arr[0])

    try:
        counter = Counter(n, index)
        rx.subscribe(q, counter, disable_mangling=True)
        start = time.perf_counter()
        for i in range(n):
            frame[0] = frame[-1] = i
            tx.raw_send(q, frame if kind == "shm" else frame.tobytes())
        if not counter.done.wait(120):
            raise AssertionError(f"{kind}: only {len(counter.seen)} of {n} arrays arrived")
        return n / (time.perf_counter() - start)
    finally:
        tx.disconnect()
        rx.disconnect()


def memcpy_rate() -> float:
    src, dst = np.ones(1024 * 1024), np.empty(1024 * 1024)
    start = time.perf_counter()
    for _ in range(50):
        np.copyto(dst, src)
    return 50 / (time.perf_counter() - start)


def main() -> None:
    kinds = ["shm", "pika"] if broker_up() else ["shm"]
    if "pika" not in kinds:
        print(f"!! no RabbitMQ on {HOST}:{PORT}: PikaTransport not measured")
    results: dict[str, dict[str, float]] = {k: {} for k in kinds}
    try:
        for kind in kinds:
            n = 20000 if kind == "shm" else 2000
            results[kind]["msgs/s 1 proc"] = statistics.median(
                throughput(kind, n, False) for _ in range(REPEATS)
            )
            results[kind]["msgs/s 1p acked"] = statistics.median(
                throughput(kind, n, True) for _ in range(REPEATS)
            )
            results[kind]["msgs/s 2 procs"] = statistics.median(
                throughput_2proc(kind, 2 * n) for _ in range(REPEATS)
            )
            rtt = round_trip(kind, 300)
            results[kind]["RTT median us"] = statistics.median(rtt) * 1e6
            results[kind]["RTT p99 us"] = sorted(rtt)[int(len(rtt) * 0.99)] * 1e6
            results[kind]["8MiB arrays/s"] = statistics.median(arrays(kind, 30) for _ in range(3))
    finally:
        cleanup()
    copy = memcpy_rate()
    print(
        f"{'metric':<18}"
        + "".join(f"{k:>14}" for k in kinds)
        + ("  shm/pika" if len(kinds) > 1 else "")
    )
    for metric in results["shm"]:
        row = f"{metric:<18}" + "".join(f"{results[k][metric]:>14.1f}" for k in kinds)
        if len(kinds) > 1:
            ratio = results["shm"][metric] / results["pika"][metric]
            if "RTT" in metric:
                ratio = 1 / ratio
            row += f"  {ratio:8.1f}x"
        print(row)
    print(f"{'8MiB memcpy/s':<18}{copy:>14.1f}   (np.copyto, this machine's memory speed)")
    print(json.dumps({"results": results, "memcpy_8MiB_per_s": copy}))


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "echo":
        echo(sys.argv[2], sys.argv[3], sys.argv[4])
    elif len(sys.argv) == 6 and sys.argv[1] == "produce":
        produce(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
    else:
        main()
