"""Draining with pynsq's own clients: a Reader finding brokers through knsq-lookupd keeps
consuming from a broker that drains, and gets what that broker hands off from the peer; a
Writer publishing to the draining broker is told so and publishes to the other broker.
"""

from __future__ import annotations

import asyncio
import time

import nsq

from conftest import Deliveries, Reader, Received, run

TOPIC = "drain_topic"


def test_reader_and_writer_across_a_drain(lookupd, start_broker):
    flags = [f"--lookupd-grpc-address={lookupd.grpc_address}", "--broadcast-address=127.0.0.1"]
    draining, peer = start_broker(*flags, "--drain-timeout=5s"), start_broker(*flags)

    async def body():
        for b in (draining, peer):
            status, _ = await b.ahttp("POST", "/topic/create", {"topic": TOPIC})
            assert status == 200
            status, _ = await b.ahttp("POST", "/channel/create", {"topic": TOPIC, "channel": "read"})
            assert status == 200
            status, _ = await b.ahttp("POST", "/channel/create", {"topic": TOPIC, "channel": "idle"})
            assert status == 200
            status, _ = await b.ahttp("POST", "/channel/create", {"topic": TOPIC, "channel": "hold"})
            assert status == 200
        await lookupd.wait_for_producers(TOPIC, [b.tcp_address for b in (draining, peer)])
        before = [f"before-{n}".encode() for n in range(40)]
        for payload in before:
            status, _ = await draining.ahttp("POST", "/pub", {"topic": TOPIC}, payload)
            assert status == 200

        deliveries = Deliveries()
        holder: list[Reader] = []

        def handler(message):
            deliveries.add(Received(message, holder[0]))
            return True

        reader = Reader(
            topic=TOPIC,
            channel="read",
            message_handler=handler,
            lookupd_http_addresses=[f"http://{lookupd.http_address}"],
            lookupd_poll_interval=1,
            max_in_flight=5,
        )
        holder.append(reader)

        def hold(message):
            # Never finished: the drain lasts until --drain-timeout, when it is handed off.
            message.enable_async()

        holding = Reader(
            topic=TOPIC,
            channel="hold",
            message_handler=hold,
            nsqd_tcp_addresses=[draining.tcp_address],
            max_in_flight=1,
        )
        writer = None
        try:
            await draining.wait_for_consumers(TOPIC, "read", 1)
            await draining.wait_for_consumers(TOPIC, "hold", 1)
            status, _ = await draining.ahttp("PUT", "/config/drain", body=b"true")
            assert status == 200

            # pynsq's Writer gets nsqd's publish error and can go elsewhere.
            writer = nsq.Writer([draining.tcp_address])
            deadline = time.monotonic() + 10
            while not writer.conns and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            done = asyncio.get_running_loop().create_future()
            writer.pub(TOPIC, b"refused", lambda conn, data: done.done() or done.set_result(data))
            answer = await asyncio.wait_for(done, 10)
            assert isinstance(answer, nsq.Error), answer
            text = str(answer)
            assert "E_PUB_FAILED" in text and "draining" in text, text
            status, _ = await peer.ahttp("POST", "/pub", {"topic": TOPIC}, b"elsewhere")
            assert status == 200

            # Everything reaches the Reader once: what the draining broker had, the message
            # published elsewhere; the channel nobody reads is handed off to the peer.
            await deliveries.wait_count(len(before) + 1, timeout=20)
            await asyncio.sleep(0.3)
            assert sorted(deliveries.bodies()) == sorted(before + [b"elsewhere"])
            code = await draining.aexited(20)
            assert code == 0, f"the drained broker: exit status {code}"
            idle = await peer.channel_stats(TOPIC, "idle")
            assert idle["depth"] == len(before) + 1, idle
            # What the holding consumer never finished was handed off at the drain timeout.
            hold_stats = await peer.channel_stats(TOPIC, "hold")
            assert hold_stats["depth"] == len(before) + 1, hold_stats
        finally:
            reader.close()
            holding.close()
            for conn in list(writer.conns.values()) if writer else []:
                conn.close()
            await asyncio.sleep(0.05)

    run(body, timeout=60)
