"""pynsq's Reader finding brokers through knsq-lookupd, given only its HTTP address.

One lookupd, three brokers registered with it; the Reader must consume every message
published to any of them, as with nsqlookupd and nsqd.
"""

from __future__ import annotations

import asyncio

from conftest import Deliveries, Reader, Received, run

TOPIC = "lookupd_topic"
CHANNEL = "readers"
PER_BROKER = 20


def test_reader_with_lookupd_consumes_from_three_brokers(lookupd, start_broker):
    flags = [f"--lookupd-grpc-address={lookupd.grpc_address}", "--broadcast-address=127.0.0.1"]
    brokers = [start_broker(*flags) for _ in range(3)]

    async def body():
        # Each broker has the topic (and registers it) before the Reader starts.
        for b in brokers:
            status, _ = await b.ahttp("POST", "/topic/create", {"topic": TOPIC})
            assert status == 200
        await lookupd.wait_for_producers(TOPIC, [b.tcp_address for b in brokers])

        deliveries = Deliveries()
        holder: list[Reader] = []

        def handler(message):
            deliveries.add(Received(message, holder[0]))
            return True

        reader = Reader(
            topic=TOPIC,
            channel=CHANNEL,
            message_handler=handler,
            lookupd_http_addresses=[f"http://{lookupd.http_address}"],
            lookupd_poll_interval=1,
            max_in_flight=30,
        )
        holder.append(reader)
        try:
            # Half before the Reader is connected (held in the topic), half after.
            expected = set()
            for i, b in enumerate(brokers):
                for n in range(PER_BROKER // 2):
                    payload = f"b{i}-m{n}".encode()
                    expected.add(payload)
                    status, _ = await b.ahttp("POST", "/pub", {"topic": TOPIC}, payload)
                    assert status == 200
            for b in brokers:
                await b.wait_for_consumers(TOPIC, CHANNEL, 1)
            for i, b in enumerate(brokers):
                for n in range(PER_BROKER // 2, PER_BROKER):
                    payload = f"b{i}-m{n}".encode()
                    expected.add(payload)
                    status, _ = await b.ahttp("POST", "/pub", {"topic": TOPIC}, payload)
                    assert status == 200

            await deliveries.wait_count(len(expected), timeout=15)
            await asyncio.sleep(0.2)  # nothing more (no duplicates) should follow
            assert sorted(deliveries.bodies()) == sorted(expected)
            assert len(reader.conns) == 3, f"connected to {list(reader.conns)}"
            assert reader.errors == []
        finally:
            reader.close()
            await asyncio.sleep(0.05)

    run(body)
