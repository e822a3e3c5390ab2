"""Queues on RabbitMQ: declare what we use, or check it exists and say so clearly.

A publish to a queue nobody declared is dropped by the broker; with workflows
3.3 nothing notices.  Every queue the bridge touches goes through here first.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import pika
import pika.exceptions

from ._wire import dlq_name

__all__ = ["BrokerParams", "QueueMissing", "delete_queues", "ensure_queue", "queue_exists"]

log = logging.getLogger("beampipe_zocalo.queues")

#: How often a quorum queue hands a message out before dead-lettering it:
#: bounds the requeue loop a nack would otherwise spin at thousands per second.
DEFAULT_DELIVERY_LIMIT = 5


class QueueMissing(LookupError):
    """A queue we were told to use does not exist and we were not allowed to create it."""


@dataclass(frozen=True)
class BrokerParams:
    """Where RabbitMQ is.  The defaults are zocalo's (and the test broker's)."""

    host: str = "127.0.0.1"
    port: int = 5672
    username: str = "guest"
    password: str = "guest"
    vhost: str = "/"
    heartbeat: int = 30

    def __post_init__(self) -> None:
        if not self.host:
            raise ValueError("broker host must not be empty")
        if not 0 < int(self.port) < 65536:
            raise ValueError(f"broker port {self.port!r} out of range")

    def pika(self) -> pika.ConnectionParameters:
        return pika.ConnectionParameters(
            host=self.host,
            port=int(self.port),
            virtual_host=self.vhost,
            credentials=pika.PlainCredentials(self.username, self.password),
            heartbeat=self.heartbeat,
            blocked_connection_timeout=30,
            connection_attempts=1,
            socket_timeout=5,
        )

    def __str__(self) -> str:
        return f"amqp://{self.username}@{self.host}:{self.port}{self.vhost}"


def _passively_declared(connection: pika.BlockingConnection, kind: str, name: str) -> bool:
    """Ask the broker whether a queue or exchange exists without creating it (404 = no)."""
    ch = connection.channel()
    try:
        if kind == "queue":
            ch.queue_declare(name, passive=True)
        else:
            ch.exchange_declare(name, passive=True)
    except pika.exceptions.ChannelClosedByBroker as exc:
        if exc.reply_code == 404:
            return False  # the broker closed that channel; the connection stays usable
        raise
    ch.close()
    return True


def queue_exists(connection: pika.BlockingConnection, name: str) -> bool:
    return _passively_declared(connection, "queue", name)


def exchange_exists(connection: pika.BlockingConnection, name: str) -> bool:
    return _passively_declared(connection, "exchange", name)


def ensure_queue(
    connection: pika.BlockingConnection,
    name: str,
    *,
    create: bool = True,
    delivery_limit: int = DEFAULT_DELIVERY_LIMIT,
    reply_queue_ttl: float | None = None,
) -> bool:
    """Make sure ``name`` exists; return True if we created it.

    New work queues are durable quorum queues with ``x-delivery-limit`` and a
    dead-letter route to ``dlq.<name>`` (zocalo's naming), so a poison message
    is parked after ``delivery_limit`` deliveries instead of spinning.  An
    existing queue is used as it is (a site's own declaration wins, and a
    differing re-declaration would be refused by the broker anyway).
    ``reply_queue_ttl`` instead makes a classic durable queue that the broker
    deletes after that many idle seconds, for per-client result queues.
    """
    if not name or len(name) > 255:
        raise ValueError(f"invalid queue name {name!r}")
    if queue_exists(connection, name):
        return False
    if not create:
        raise QueueMissing(
            f"queue {name!r} does not exist on the broker; declare it "
            "(e.g. zocalo.configure_rabbitmq) or let beampipe_zocalo create it"
        )
    ch = connection.channel()
    try:
        if reply_queue_ttl is not None:
            ch.queue_declare(
                name, durable=True, arguments={"x-expires": int(reply_queue_ttl * 1000)}
            )
        else:
            dlq = dlq_name(name)
            if not queue_exists(connection, dlq):
                ch.queue_declare(dlq, durable=True)
            ch.queue_declare(
                name,
                durable=True,
                arguments={
                    "x-queue-type": "quorum",
                    "x-delivery-limit": int(delivery_limit),
                    "x-dead-letter-exchange": "",
                    "x-dead-letter-routing-key": dlq,
                },
            )
    finally:
        if ch.is_open:
            ch.close()
    log.info("declared queue %s", name)
    return True


def delete_queues(connection: pika.BlockingConnection, names: Iterable[str]) -> None:
    """Delete queues (and nothing else); missing ones are fine."""
    for name in names:
        ch = connection.channel()
        try:
            ch.queue_delete(name)
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code != 404:
                raise
            continue
        ch.close()
