"""workflows' PikaTransport with the traps of workflows 3.3 on RabbitMQ closed.

Seen here with workflows 3.3 and Debian's RabbitMQ 3.10:

* a message published without headers raised TypeError inside the pika
  thread (``dict(None)``) and killed the connection, so one bad message took
  every consumer of the queue down in turn;
* ``send`` published with ``mandatory=True`` but without publisher confirms,
  so a send to an undeclared queue was returned by the broker and dropped;
* ``send(delay=...)`` publishes to an exchange named ``delayed`` that only
  exists with the delayed-message plugin: the channel error killed the thread.

``GuardedPikaTransport`` (entry point ``workflows.transport``) fixes those
without changing anything else: ``zocalo.service -s X -t GuardedPikaTransport``
takes the same ``--rabbit-*`` options.  It relies on workflows 3.3 internals,
hence the ``<3.4`` pin.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

import pika
import pika.exceptions
import workflows
import workflows.transport.pika_transport as _pt
from workflows.transport.pika_transport import PikaTransport

from ._queues import (
    DEFAULT_DELIVERY_LIMIT,
    BrokerParams,
    ensure_queue,
    exchange_exists,
    queue_exists,
)
from ._wire import go_headers

__all__ = ["NO_HEADERS", "GuardedPikaTransport", "PublishRefused", "prepare_queue"]

log = logging.getLogger("beampipe_zocalo.transport")
T = TypeVar("T")

#: Header a GuardedPikaTransport adds when the publisher sent none, so a
#: service can dead-letter the message instead of the transport dying of it.
NO_HEADERS = "beampipe.no-headers"


class PublishRefused(workflows.Disconnected):
    """The broker did not take a message (no queue bound, or a negative confirm)."""


class _GuardedPikaThread(_pt._PikaThread):
    def _get_shared_channel(self) -> Any:
        if not self._pika_shared_channel:
            assert self._connection is not None
            channel = self._connection.channel()
            channel.confirm_delivery()
            self._pika_shared_channel = channel
        return self._pika_shared_channel

    def send(
        self,
        exchange: str,
        routing_key: str,
        body: str | bytes,
        properties: Any = None,
        mandatory: bool = True,
        transaction_id: int | None = None,
    ) -> Future[None]:
        if not self._connection:
            raise RuntimeError("Cannot send on unstarted connection")
        future: Future[None] = Future()

        def _send() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                if transaction_id:
                    channel = self._transaction_on_channel.inverse[transaction_id]
                    self._channel_has_active_tx[channel] = True
                else:
                    channel = self._get_shared_channel()
                channel.basic_publish(
                    exchange=exchange,
                    routing_key=routing_key,
                    body=body,
                    properties=properties,
                    mandatory=mandatory,
                )
                future.set_result(None)
            except pika.exceptions.UnroutableError:
                # Not a connection problem: report it, keep the thread alive.
                future.set_exception(
                    PublishRefused(f"no queue {routing_key!r} on exchange {exchange!r}: not sent")
                )
            except pika.exceptions.NackError:
                future.set_exception(PublishRefused(f"broker refused message for {routing_key!r}"))
            except BaseException as e:
                future.set_exception(e)
                raise

        self._register_future_and_callback(future, _send)
        return future

    def tx_select(self, transaction_id: int, subscription_id: int | None) -> Future[None]:
        if subscription_id:
            return super().tx_select(transaction_id, subscription_id)
        # The shared channel is in confirm mode, which AMQP cannot switch to tx mode:
        # transactions not tied to a subscription get a channel of their own.
        if not self._connection:
            raise RuntimeError("Cannot transact on unstarted connection")
        future: Future[None] = Future()

        def _tx_select() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                channel = getattr(self, "_tx_channel", None)
                if channel is None or not channel.is_open:
                    assert self._connection is not None
                    channel = self._tx_channel = self._connection.channel()
                if channel in self._transaction_on_channel:
                    raise KeyError(
                        f"a transaction ({self._transaction_on_channel[channel]}) is already "
                        f"open outside subscriptions; cannot start {transaction_id}"
                    )
                channel.tx_select()
                self._transaction_on_channel[channel] = transaction_id
                self._channel_has_active_tx.setdefault(channel, False)
                self._channel_is_transactional[channel] = True
                future.set_result(None)
            except BaseException as e:  # noqa: BLE001 - to the caller, not the pika thread
                future.set_exception(e)

        self._register_future_and_callback(future, _tx_select)
        return future

    def call(self, fn: Callable[[pika.BlockingConnection], T]) -> Future[T]:
        """Run ``fn(connection)`` on the pika thread; its errors go to the future only."""
        if not self._connection:
            raise RuntimeError("transport is not connected")
        future: Future[T] = Future()

        def _call() -> None:
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(self._connection))
                except BaseException as e:  # noqa: BLE001 - to the caller, not the pika thread
                    future.set_exception(e)

        self._register_future_and_callback(future, _call)
        return future


#: Fanout exchanges workflows' frontend needs (zocalo.configure_rabbitmq's defaults).
ZOCALO_EXCHANGES = ("command", "transient.status")


def _ensure_fanout_exchanges(conn: pika.BlockingConnection) -> None:
    for name in ZOCALO_EXCHANGES:
        ch = conn.channel()
        try:
            ch.exchange_declare(name, passive=True)
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code != 404:
                raise
            ch = conn.channel()
            ch.exchange_declare(name, exchange_type="fanout", durable=True)
            log.info("declared fanout exchange %s", name)
        ch.close()


class GuardedPikaTransport(PikaTransport):
    """PikaTransport with confirmed sends, header-less messages survived, queue checks."""

    def __init__(self, *args: Any, broker: BrokerParams | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # workflows 3.3 keeps subscriptions in a class-level dict shared by every
        # transport in the process, and numbers them per instance from 1: a second
        # transport's subscription 1 would replace the first's callback, and its
        # messages would go to the wrong consumer.  Each instance gets its own.
        self._CommonTransport__subscriptions: dict[int, dict[str, Any]] = {}
        self._CommonTransport__transactions: set[int] = set()
        self._broker = broker
        self._delayed_ok: bool | None = None

    @classmethod
    def add_command_line_options(cls, parser: Any) -> None:
        # PikaTransport registers --rabbit-*; its class-level config is ours too.
        return None

    def _generate_connection_parameters(self) -> list[pika.ConnectionParameters]:
        if self._broker is not None:
            return [self._broker.pika()]
        return super()._generate_connection_parameters()

    def connect(self) -> bool:
        with self._lock:
            if not hasattr(self, "_pika_thread"):
                self._pika_thread = _GuardedPikaThread(self._generate_connection_parameters())
        if not super().connect():
            return False
        # zocalo.service's frontend binds to 'command' and broadcasts on
        # 'transient.status'; on a broker zocalo.configure_rabbitmq never saw,
        # the missing exchange kills the connection.  Declare them if absent.
        self._thread().call(_ensure_fanout_exchanges).result(10)
        return True

    def _call_message_callback(
        self, subscription_id: int, _channel: Any, method: Any, properties: Any, body: bytes
    ) -> None:
        if properties.headers is None:
            properties.headers = {NO_HEADERS: True}
        super()._call_message_callback(subscription_id, _channel, method, properties, body)

    def _thread(self) -> _GuardedPikaThread:
        thread = getattr(self, "_pika_thread", None)
        if not isinstance(thread, _GuardedPikaThread):
            raise workflows.Disconnected("GuardedPikaTransport used before connect()")
        return thread

    def ensure_queue(
        self,
        name: str,
        *,
        create: bool = True,
        delivery_limit: int = DEFAULT_DELIVERY_LIMIT,
        reply_queue_ttl: float | None = None,
        timeout: float = 10.0,
    ) -> bool:
        """Declare ``name`` (quorum, bounded deliveries, ``dlq.<name>``) unless it exists."""
        return (
            self._thread()
            .call(
                lambda c: ensure_queue(
                    c,
                    name,
                    create=create,
                    delivery_limit=delivery_limit,
                    reply_queue_ttl=reply_queue_ttl,
                )
            )
            .result(timeout)
        )

    def queue_exists(self, name: str, timeout: float = 10.0) -> bool:
        return self._thread().call(lambda c: queue_exists(c, name)).result(timeout)

    def _exchange_exists(self, name: str) -> bool:
        return self._thread().call(lambda c: exchange_exists(c, name)).result(10)

    def _send(
        self,
        destination: Any,
        message: Any,
        headers: Any = None,
        delay: Any = None,
        expiration: Any = None,
        transaction: int | None = None,
        exchange: str | None = None,
        **kwargs: Any,
    ) -> Any:
        if not headers:
            # Stock workflows 3.3 consumers die on a header-less message: never send one.
            headers = go_headers()
        if delay:
            if self._delayed_ok is None:
                self._delayed_ok = self._exchange_exists("delayed")
            if not self._delayed_ok:
                raise workflows.Error(
                    f"send to {destination!r} with delay={delay}: the broker has no 'delayed' "
                    "exchange (rabbitmq_delayed_message_exchange plugin); the message would be lost"
                )
        return super()._send(
            destination,
            message,
            headers=headers,
            delay=delay,
            expiration=expiration,
            transaction=transaction,
            exchange=exchange,
            **kwargs,
        )

    def _broadcast(
        self,
        destination: Any,
        message: Any,
        headers: Any = None,
        delay: Any = None,
        expiration: int | None = None,
        transaction: int | None = None,
        **kwargs: Any,
    ) -> Any:
        # Status broadcasts go out header-less in workflows 3.3; a stock listener dies of it.
        return super()._broadcast(
            destination,
            message,
            headers=headers or go_headers(),
            delay=delay,
            expiration=expiration,
            transaction=transaction,
            **kwargs,
        )

    def delete_queue(self, name: str, timeout: float = 10.0) -> None:
        from ._queues import delete_queues

        self._thread().call(lambda c: delete_queues(c, [name])).result(timeout)


def prepare_queue(
    transport: Any,
    name: str,
    *,
    create: bool = True,
    delivery_limit: int = DEFAULT_DELIVERY_LIMIT,
    reply_queue_ttl: float | None = None,
) -> bool:
    """Declare (or check) a queue on whatever workflows transport this is.

    Returns False when the transport cannot declare queues (stock PikaTransport):
    then sends to a missing queue may be lost, and the caller should say so.
    """
    ensure = getattr(transport, "ensure_queue", None)
    if ensure is not None:  # GuardedPikaTransport
        ensure(name, create=create, delivery_limit=delivery_limit, reply_queue_ttl=reply_queue_ttl)
        return True
    declare = getattr(transport, "declare_queue", None)
    if declare is not None:  # beampipe_shm.ShmTransport
        if reply_queue_ttl is not None:
            declare(name, delivery_limit=None, dead_letter_queue=None)
        else:
            declare(name, delivery_limit=delivery_limit)
        return True
    return False
