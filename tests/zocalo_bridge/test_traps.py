"""The workflows 3.3 + RabbitMQ traps from issue 7, each shown and guarded, on the real broker."""

from __future__ import annotations

import json
import queue
import time
from typing import Any

import pika
import pytest
import workflows
from workflows.transport.pika_transport import PikaTransport

from beampipe_zocalo import (
    NO_HEADERS,
    GuardedPikaTransport,
    PublishRefused,
    ensure_queue,
    go_headers,
)

pytestmark = pytest.mark.broker


@pytest.fixture
def transport(broker: Any) -> Any:
    t = GuardedPikaTransport(broker=broker)
    assert t.connect()
    yield t
    t.disconnect()


def test_send_to_undeclared_queue_raises_and_connection_survives(
    transport: Any, queues: Any
) -> None:
    missing = queues("never-declared")
    with pytest.raises(PublishRefused, match="never-declared"):
        transport.send(missing, {"x": 1}, headers=go_headers())
    assert transport.is_connected()
    real = queues("real")
    transport.ensure_queue(real)
    transport.send(real, {"x": 2}, headers=go_headers())
    ((_, body),) = queues.get_all(real)
    assert json.loads(body) == {"x": 2}


def test_send_without_headers_gets_zocalo_headers(transport: Any, queues: Any) -> None:
    q = queues("headers")
    transport.ensure_queue(q)
    transport.send(q, {"x": 1})
    ((props, _),) = queues.get_all(q)
    assert props.headers["zocalo.go.user"] and props.headers["zocalo.go.host"]


def test_delay_without_plugin_is_an_error_not_a_loss(transport: Any, queues: Any) -> None:
    q = queues("delayed")
    transport.ensure_queue(q)
    with pytest.raises(workflows.Error, match="no 'delayed' exchange"):
        transport.send(q, {"x": 1}, headers=go_headers(), delay=2)
    assert transport.is_connected()


def test_headerless_message_kills_stock_pika_but_not_guarded(broker: Any, queues: Any) -> None:
    q = queues("noheaders")
    conn = pika.BlockingConnection(broker.pika())
    ensure_queue(conn, q)
    conn.close()

    got: queue.Queue[Any] = queue.Queue()
    guarded = GuardedPikaTransport(broker=broker)
    guarded.connect()
    try:
        guarded.subscribe(q, lambda h, m: got.put((h, m)), acknowledgement=False)
        queues.publish_raw(q, b'{"a": 1}', None)
        header, message = got.get(timeout=10)
        assert header[NO_HEADERS] is True and message == {"a": 1}
        assert guarded.is_connected()
    finally:
        guarded.disconnect()

    # The trap itself, so we notice when workflows fixes it.
    PikaTransport.config.update({"--rabbit-host": broker.host, "--rabbit-port": broker.port})
    stock = PikaTransport()
    stock.connect()
    try:
        stock.subscribe(q, lambda h, m: got.put((h, m)))
        queues.publish_raw(q, b'{"a": 2}', None)
        deadline = time.monotonic() + 10
        while stock.is_connected() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not stock.is_connected(), "workflows PikaTransport survives header-less messages now"
    finally:
        stock.disconnect()
        PikaTransport.config.clear()


def test_nack_requeue_loop_is_bounded_by_the_queue(broker: Any, queues: Any) -> None:
    """A consumer that always nacks: the quorum queue's delivery limit parks the message."""
    q = queues("poison")
    conn = pika.BlockingConnection(broker.pika())
    try:
        ensure_queue(conn, q, delivery_limit=3)
        ch = conn.channel()
        ch.basic_publish("", q, b"{}", pika.BasicProperties(headers={"h": 1}, delivery_mode=2))
        deliveries = 0
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            method, _, _ = ch.basic_get(q)
            if method is None:
                if queues.depth(f"dlq.{q}")[0] == 1:
                    break
                time.sleep(0.05)
                continue
            deliveries += 1
            ch.basic_nack(method.delivery_tag, requeue=True)
        assert queues.depth(f"dlq.{q}")[0] == 1
        assert 3 <= deliveries <= 4, deliveries
    finally:
        conn.close()


def test_transactions_outside_subscriptions_still_work(transport: Any, queues: Any) -> None:
    """The shared channel confirms; a transaction must not try to switch it to tx mode."""
    q = queues("txn")
    transport.ensure_queue(q)
    txn = transport.transaction_begin()
    transport.send(q, {"n": 1}, headers=go_headers(), transaction=txn)
    transport.transaction_abort(txn)
    txn = transport.transaction_begin()
    transport.send(q, {"n": 2}, headers=go_headers(), transaction=txn)
    transport.transaction_commit(txn)
    transport.send(q, {"n": 3}, headers=go_headers())  # confirmed, outside the transaction
    got = [json.loads(b)["n"] for _, b in queues.get_all(q, expect=2)]
    assert got == [2, 3]
    assert transport.is_connected()
