"""An asyncio face on paho-mqtt's network thread, used by both the aggregator and the agents.

paho runs the socket in its own thread and reconnects with backoff (also when the broker is down at start);
this wrapper re-subscribes on every connect and hands each message to the event loop. QoS 1 everywhere,
persistent sessions (clean_session=False) so the broker queues messages while a client is away.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable

import paho.mqtt.client as mqtt
import structlog
from paho.mqtt.enums import CallbackAPIVersion

from federation.transport import BrokerConfig

log = structlog.get_logger(__name__)
MessageHandler = Callable[[str, bytes], None]


class MqttLink:
    def __init__(
        self,
        client_id: str,
        broker: BrokerConfig,
        on_message: MessageHandler,
        subscriptions: Iterable[str],
        will: tuple[str, bytes] | None = None,
        on_connect: Callable[[], None] | None = None,
        log_context: dict[str, str] | None = None,
    ) -> None:
        # paho's thread does not see the caller's structlog contextvars: bind the identity here.
        self._log = log.bind(client=client_id, **(log_context or {}))
        self._broker = broker
        self._handler = on_message
        self._subscriptions = list(subscriptions)
        self._on_connect_cb = on_connect
        self._loop: asyncio.AbstractEventLoop | None = None
        self.connected = asyncio.Event()
        self.bytes_sent = 0
        self.bytes_received = 0
        c = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False, protocol=mqtt.MQTTv311
        )
        c.max_queued_messages_set(0)
        c.max_inflight_messages_set(100)
        c.reconnect_delay_set(min_delay=broker.reconnect_min_s, max_delay=broker.reconnect_max_s)  # type: ignore[arg-type]
        if broker.tls is not None:
            c.tls_set_context(broker.tls.client_context())
        if will is not None:
            c.will_set(will[0], will[1], qos=1, retain=True)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        self._client = c

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._client.connect_async(self._broker.host, self._broker.port, keepalive=self._broker.keepalive_s)
        self._client.loop_start()

    async def stop(self, final: tuple[str, bytes] | None = None) -> None:
        if final is not None and self._client.is_connected():
            info = self._client.publish(final[0], final[1], qos=1, retain=True)
            await asyncio.to_thread(info.wait_for_publish, 2.0)
        self._client.disconnect()
        self._client.loop_stop()

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        """Queue a QoS 1 message; paho delivers it now or after the next reconnect."""
        self.bytes_sent += len(payload) + len(topic)
        self._client.publish(topic, payload, qos=1, retain=retain)

    # paho callbacks run on paho's thread: only hand work over to the loop from here.
    def _on_connect(self, client: mqtt.Client, _u: object, _f: object, rc: object, _p: object) -> None:
        if getattr(rc, "is_failure", False):
            self._log.warning("mqtt_connect_refused", reason=str(rc))
            return
        for topic in self._subscriptions:
            client.subscribe(topic, qos=1)
        self._log.info("mqtt_connected", host=self._broker.host, port=self._broker.port)
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.connected.set)
            if self._on_connect_cb is not None:
                self._loop.call_soon_threadsafe(self._on_connect_cb)

    def _on_disconnect(self, _c: mqtt.Client, _u: object, _f: object, rc: object, _p: object) -> None:
        self._log.warning("mqtt_disconnected", reason=str(rc))
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.connected.clear)

    def _on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        self.bytes_received += len(msg.payload) + len(msg.topic)
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._handler, msg.topic, bytes(msg.payload))
