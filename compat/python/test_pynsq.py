"""pynsq's Writer and Reader against the real knsq-broker.

Each test starts its own broker (see conftest.py) and checks what the client library observes:
the messages handed to its handlers (body, id, attempts, timing) and, where useful, /stats.
"""

from __future__ import annotations

import asyncio
import re
import time

import nsq

from conftest import Deliveries, Received, run_with_clients

TOPIC = "compat_topic"


def assert_no_client_errors(clients):
    assert clients.errors() == [], f"client saw error frames or connection errors: {clients.errors()}"


def test_pub_delivers_message_with_first_attempt(broker):
    async def body(clients):
        deliveries = Deliveries()
        clients.collecting_reader(TOPIC, "ch", deliveries)
        await broker.wait_for_consumers(TOPIC, "ch", 1)
        writer = await clients.writer()

        published_at_ns = time.time_ns()
        assert await writer.apub(TOPIC, b"hello knsq") == b"OK"

        [got] = await deliveries.wait_count(1)
        assert got.body == b"hello knsq"
        assert got.attempts == 1
        assert re.fullmatch(rb"[0-9a-f]{16}", got.id), got.id
        assert abs(got.message.timestamp - published_at_ns) < 5e9, "timestamp is not the publish time in ns"

        chan = await broker.wait_for_channel(
            TOPIC, "ch", lambda c: c and c["in_flight_count"] == 0, "the FIN to clear in-flight"
        )
        assert chan["message_count"] == 1
        assert chan["depth"] == 0
        topic = await broker.topic_stats(TOPIC)
        assert topic["message_count"] == 1
        assert_no_client_errors(clients)

    run_with_clients(broker, body)


def test_mpub_delivers_every_message_once(broker):
    async def body(clients):
        deliveries = Deliveries()
        clients.collecting_reader(TOPIC, "ch", deliveries, max_in_flight=20)
        await broker.wait_for_consumers(TOPIC, "ch", 1)
        writer = await clients.writer()

        bodies = [f"mpub-{i}".encode() for i in range(100)]
        assert await writer.ampub(TOPIC, bodies) == b"OK"

        await deliveries.wait_count(100)
        await asyncio.sleep(0.3)  # a duplicate would arrive right behind the batch
        assert sorted(deliveries.bodies()) == sorted(bodies)
        assert all(d.attempts == 1 for d in deliveries.items)
        assert len({d.id for d in deliveries.items}) == 100, "message IDs are not unique"
        assert (await broker.topic_stats(TOPIC))["message_count"] == 100
        assert_no_client_errors(clients)

    run_with_clients(broker, body)


def test_dpub_delivers_no_earlier_than_due(broker):
    delay_ms = 1500

    async def body(clients):
        deliveries = Deliveries()
        clients.collecting_reader(TOPIC, "ch", deliveries)
        await broker.wait_for_consumers(TOPIC, "ch", 1)
        writer = await clients.writer()

        sent_at = time.monotonic()
        assert await writer.adpub(TOPIC, delay_ms, b"deferred") == b"OK"
        assert await writer.apub(TOPIC, b"immediate") == b"OK"

        [first] = await deliveries.wait_count(1)
        assert first.body == b"immediate", "the deferred message overtook an immediate one"
        chan = await broker.channel_stats(TOPIC, "ch")
        assert chan["deferred_count"] == 1, chan

        _, deferred = await deliveries.wait_count(2, timeout=delay_ms / 1000 + 5)
        assert deferred.body == b"deferred"
        assert deferred.attempts == 1
        waited = deferred.at - sent_at
        assert waited >= delay_ms / 1000, f"deferred message delivered after {waited:.3f}s, before its {delay_ms} ms delay"
        assert waited < delay_ms / 1000 + 2, f"deferred message delivered {waited:.3f}s after DPUB"
        chan = await broker.wait_for_channel(
            TOPIC, "ch", lambda c: c and c["in_flight_count"] == 0, "the FIN to clear in-flight"
        )
        assert chan["deferred_count"] == 0
        assert_no_client_errors(clients)

    run_with_clients(broker, body)


def test_handler_returning_false_requeues_with_incremented_attempts(broker):
    async def body(clients):
        deliveries = Deliveries()

        def handler(message):
            deliveries.add(Received(message, None))
            return message.attempts >= 3  # False → REQ (requeue_delay=0: immediately)

        clients.reader(TOPIC, "ch", handler, requeue_delay=0)
        await broker.wait_for_consumers(TOPIC, "ch", 1)
        writer = await clients.writer()
        assert await writer.apub(TOPIC, b"retry me") == b"OK"

        await deliveries.wait_count(3)
        assert [d.attempts for d in deliveries.items] == [1, 2, 3]
        assert len({d.id for d in deliveries.items}) == 1, "a requeued message must keep its ID"
        assert all(d.body == b"retry me" for d in deliveries.items)

        chan = await broker.wait_for_channel(
            TOPIC, "ch", lambda c: c and c["in_flight_count"] == 0 and c["requeue_count"] == 2,
            "two requeues and a FIN",
        )
        assert chan["depth"] == 0 and chan["deferred_count"] == 0
        assert chan["timeout_count"] == 0
        await asyncio.sleep(0.3)
        assert len(deliveries.items) == 3, "a finished message was delivered again"
        assert_no_client_errors(clients)

    run_with_clients(broker, body)


def test_max_tries_gives_up_on_a_message_requeued_past_it(broker):
    async def body(clients):
        deliveries = Deliveries()
        given_up = []

        def handler(message):
            deliveries.add(Received(message, None))
            return False  # always fails

        reader = clients.reader(TOPIC, "ch", handler, max_tries=2)
        reader.giving_up = lambda message: given_up.append(message.attempts)
        await broker.wait_for_consumers(TOPIC, "ch", 1)
        writer = await clients.writer()
        assert await writer.apub(TOPIC, b"poison") == b"OK"

        # Reader finishes (FIN) the third delivery without calling the handler.
        chan = await broker.wait_for_channel(
            TOPIC, "ch", lambda c: c and c["requeue_count"] == 2 and c["in_flight_count"] == 0 and len(given_up) == 1,
            "two requeues and the give-up FIN",
        )
        assert [d.attempts for d in deliveries.items] == [1, 2]
        assert given_up == [3], "the third delivery must carry attempts 3"
        assert chan["depth"] == 0 and chan["deferred_count"] == 0
        assert_no_client_errors(clients)

    run_with_clients(broker, body)


def test_requeue_with_delay_redelivers_after_the_delay(broker):
    async def body(clients):
        deliveries = Deliveries()

        def handler(message):
            deliveries.add(Received(message, None))
            if message.attempts == 1:
                message.requeue(delay=1, backoff=False)  # REQ <id> 1000
                return None
            return True

        clients.reader(TOPIC, "ch", handler)
        await broker.wait_for_consumers(TOPIC, "ch", 1)
        writer = await clients.writer()
        assert await writer.apub(TOPIC, b"later") == b"OK"

        [first] = await deliveries.wait_count(1)
        chan = await broker.wait_for_channel(
            TOPIC, "ch", lambda c: c and c["deferred_count"] == 1, "the requeued message to be deferred"
        )
        assert chan["in_flight_count"] == 0
        _, second = await deliveries.wait_count(2, timeout=6)
        assert second.id == first.id
        assert second.attempts == 2
        waited = second.at - first.at
        assert waited >= 0.95, f"requeued with a 1000 ms delay but redelivered after {waited:.3f}s"
        assert waited < 3.0, f"requeued with a 1000 ms delay but redelivered after {waited:.3f}s"
        chan = await broker.wait_for_channel(
            TOPIC, "ch", lambda c: c and c["in_flight_count"] == 0, "the FIN to clear in-flight"
        )
        assert chan["requeue_count"] == 1
        assert chan["deferred_count"] == 0
        assert_no_client_errors(clients)

    run_with_clients(broker, body)


def test_touch_keeps_message_past_msg_timeout(start_broker):
    broker = start_broker("--msg-timeout=2s")
    hold_for = 4.5  # more than twice the msg timeout

    async def body(clients):
        deliveries = Deliveries()
        done = asyncio.Event()

        async def keep_touching(message):
            deadline = time.monotonic() + hold_for
            while time.monotonic() < deadline:
                await asyncio.sleep(0.4)
                message.touch()
            message.finish()
            done.set()

        def handler(message):
            deliveries.add(Received(message, None))
            message.enable_async()
            if message.attempts == 1:
                asyncio.ensure_future(keep_touching(message))
            else:
                message.finish()

        clients.reader(TOPIC, "ch", handler)
        await broker.wait_for_consumers(TOPIC, "ch", 1)
        writer = await clients.writer()
        assert await writer.apub(TOPIC, b"slow work") == b"OK"

        await deliveries.wait_count(1)
        await asyncio.wait_for(done.wait(), hold_for + 5)
        chan = await broker.wait_for_channel(
            TOPIC, "ch", lambda c: c and c["in_flight_count"] == 0, "the FIN to clear in-flight"
        )
        assert [d.attempts for d in deliveries.items] == [1], "a touched message was redelivered"
        assert chan["timeout_count"] == 0
        assert chan["depth"] == 0
        assert_no_client_errors(clients)  # would include E_TOUCH_FAILED / E_FIN_FAILED

    run_with_clients(broker, body)


def test_unfinished_message_is_redelivered_after_msg_timeout(start_broker):
    broker = start_broker("--msg-timeout=2s")

    async def body(clients):
        deliveries = Deliveries()

        def handler(message):
            deliveries.add(Received(message, None))
            if message.attempts == 1:
                message.enable_async()  # never answered: must time out
                return None
            return True

        clients.reader(TOPIC, "ch", handler)
        await broker.wait_for_consumers(TOPIC, "ch", 1)
        writer = await clients.writer()
        assert await writer.apub(TOPIC, b"forgotten") == b"OK"

        [first] = await deliveries.wait_count(1)
        chan = await broker.channel_stats(TOPIC, "ch")
        assert chan["in_flight_count"] == 1
        _, second = await deliveries.wait_count(2, timeout=8)
        assert second.id == first.id
        assert second.body == b"forgotten"
        assert second.attempts == 2
        waited = second.at - first.at
        assert waited >= 1.8, f"msg-timeout is 2s but the message was redelivered after {waited:.3f}s"
        assert waited < 4.0, f"msg-timeout is 2s but the message was redelivered after {waited:.3f}s"
        chan = await broker.wait_for_channel(
            TOPIC, "ch", lambda c: c and c["in_flight_count"] == 0, "the FIN to clear in-flight"
        )
        assert chan["timeout_count"] == 1
        assert chan["requeue_count"] == 0
        assert_no_client_errors(clients)

    run_with_clients(broker, body)


def test_two_consumers_on_one_channel_share_every_message_once(broker):
    count = 40

    async def body(clients):
        deliveries = Deliveries()
        loop = asyncio.get_running_loop()

        def slow_handler(reader_name):
            # Each consumer holds its message for 20 ms (RDY 1), so the other one must take some.
            def handler(message):
                deliveries.add(Received(message, reader_name))
                message.enable_async()
                loop.call_later(0.02, message.finish)

            return handler

        clients.reader(TOPIC, "shared", slow_handler("a"))
        clients.reader(TOPIC, "shared", slow_handler("b"))
        await broker.wait_for_consumers(TOPIC, "shared", 2)
        writer = await clients.writer()

        bodies = [f"shared-{i}".encode() for i in range(count)]
        assert await writer.ampub(TOPIC, bodies) == b"OK"

        await deliveries.wait_count(count, timeout=15)
        chan = await broker.wait_for_channel(
            TOPIC, "shared", lambda c: c and c["in_flight_count"] == 0 and c["depth"] == 0, "every FIN"
        )
        await asyncio.sleep(0.3)
        per_reader = {name: sorted(d.body for d in deliveries.items if d.reader == name) for name in ("a", "b")}
        assert per_reader["a"] and per_reader["b"], f"one consumer got nothing: {per_reader}"
        assert sorted(deliveries.bodies()) == sorted(bodies), "the union is not every message exactly once"
        assert all(d.attempts == 1 for d in deliveries.items)
        assert chan["message_count"] == count
        assert sorted(c["finish_count"] for c in chan["clients"]) == sorted(len(v) for v in per_reader.values())
        assert_no_client_errors(clients)

    run_with_clients(broker, body)


def test_two_channels_each_receive_every_message(broker):
    count = 30

    async def body(clients):
        first, second = Deliveries(), Deliveries()
        clients.collecting_reader(TOPIC, "first", first, max_in_flight=10)
        clients.collecting_reader(TOPIC, "second", second, max_in_flight=10)
        await broker.wait_for_consumers(TOPIC, "first", 1)
        await broker.wait_for_consumers(TOPIC, "second", 1)
        writer = await clients.writer()

        bodies = [f"fanout-{i}".encode() for i in range(count)]
        assert await writer.ampub(TOPIC, bodies[:10]) == b"OK"
        for message in bodies[10:]:
            assert await writer.apub(TOPIC, message) == b"OK"

        await first.wait_count(count)
        await second.wait_count(count)
        await asyncio.sleep(0.3)
        assert sorted(first.bodies()) == sorted(bodies)
        assert sorted(second.bodies()) == sorted(bodies)
        ids_first = {d.body: d.id for d in first.items}
        ids_second = {d.body: d.id for d in second.items}
        assert ids_first == ids_second, "each channel's copy of a message must carry the same ID"

        topic = await broker.topic_stats(TOPIC)
        assert topic["message_count"] == count
        assert sorted(c["channel_name"] for c in topic["channels"]) == ["first", "second"]
        assert all(c["message_count"] == count for c in topic["channels"])
        assert_no_client_errors(clients)

    run_with_clients(broker, body)


def test_ephemeral_channel_receives_and_disappears_after_consumer_leaves(broker):
    channel = "tmp#ephemeral"

    async def body(clients):
        deliveries = Deliveries()
        reader = clients.collecting_reader(TOPIC, channel, deliveries)
        await broker.wait_for_consumers(TOPIC, channel, 1)
        writer = await clients.writer()
        for i in range(3):
            assert await writer.apub(TOPIC, f"eph-{i}".encode()) == b"OK"

        await deliveries.wait_count(3)
        assert sorted(deliveries.bodies()) == [b"eph-0", b"eph-1", b"eph-2"]
        await broker.wait_for_channel(
            TOPIC, channel, lambda c: c and c["in_flight_count"] == 0, "the FINs to clear in-flight"
        )
        assert_no_client_errors(clients)

        reader.close()
        await broker.wait_for_channel(
            TOPIC, channel, lambda c: c is None, "the ephemeral channel to be deleted after its consumer left"
        )
        topic = await broker.topic_stats(TOPIC)
        assert topic is not None, "a normal topic must survive the deletion of its ephemeral channel"

    run_with_clients(broker, body)


def test_client_msg_timeout_from_identify_governs_redelivery(broker):
    # The broker's default msg-timeout is 60 s; the Reader negotiates 1 s in IDENTIFY.
    async def body(clients):
        deliveries = Deliveries()

        def handler(message):
            deliveries.add(Received(message, None))
            if message.attempts == 1:
                message.enable_async()  # never answered
                return None
            return True

        clients.reader(TOPIC, "ch", handler, msg_timeout=1)
        await broker.wait_for_consumers(TOPIC, "ch", 1)
        writer = await clients.writer()
        assert await writer.apub(TOPIC, b"short lease") == b"OK"

        first, second = await deliveries.wait_count(2, timeout=6)
        assert second.id == first.id and second.attempts == 2
        waited = second.at - first.at
        assert 0.8 <= waited < 3.0, f"msg_timeout 1000 ms negotiated, but redelivered after {waited:.3f}s"
        assert_no_client_errors(clients)

    run_with_clients(broker, body)


def test_heartbeats_at_negotiated_interval_keep_idle_connections_open(broker):
    async def body(clients):
        deliveries = Deliveries()
        reader = clients.collecting_reader(TOPIC, "ch", deliveries, heartbeat_interval=1)
        await broker.wait_for_consumers(TOPIC, "ch", 1)
        writer = await clients.writer(heartbeat_interval=1)

        await asyncio.sleep(3.5)  # idle: longer than the 2 s read deadline of two heartbeats
        assert reader.heartbeats >= 2, f"{reader.heartbeats} heartbeats in 3.5 s at a 1 s interval"
        assert not writer.closed.is_set(), "the idle writer connection was closed"
        chan = await broker.channel_stats(TOPIC, "ch")
        assert len(chan["clients"]) == 1, "the idle reader connection was dropped"

        assert await writer.apub(TOPIC, b"still here") == b"OK"
        await deliveries.wait_count(1)
        assert deliveries.bodies() == [b"still here"]
        assert_no_client_errors(clients)

    run_with_clients(broker, body)


def test_clients_requesting_deflate_still_work(broker):
    # With the broker's defaults deflate is negotiated; test_deflate.py checks that in /stats.
    async def body(clients):
        deliveries = Deliveries()
        clients.collecting_reader(TOPIC, "ch", deliveries, deflate=True)
        await broker.wait_for_consumers(TOPIC, "ch", 1)
        writer = await clients.writer(deflate=True)
        bodies = [f"deflate-{i}".encode() * 20 for i in range(5)]
        assert await writer.ampub(TOPIC, bodies) == b"OK"
        await deliveries.wait_count(5)
        assert sorted(deliveries.bodies()) == sorted(bodies)
        assert_no_client_errors(clients)

    run_with_clients(broker, body)


def test_message_of_max_msg_size_round_trips_byte_for_byte(broker):
    payload = bytes(range(256)) * 4096  # 1 MiB = the default --max-msg-size, every byte value

    async def body(clients):
        deliveries = Deliveries()
        clients.collecting_reader(TOPIC, "ch", deliveries)
        await broker.wait_for_consumers(TOPIC, "ch", 1)
        writer = await clients.writer()
        assert await writer.apub(TOPIC, payload) == b"OK"
        [got] = await deliveries.wait_count(1)
        assert len(got.body) == len(payload)
        assert got.body == payload
        assert_no_client_errors(clients)

    run_with_clients(broker, body)


def test_fatal_publish_errors_reach_the_writer_and_close_its_connection(start_broker):
    broker = start_broker("--max-req-timeout=1s", "--max-msg-size=1024")

    async def body(clients):
        writer = await clients.writer()
        result = await writer.adpub(TOPIC, 5000, b"too far ahead")
        assert isinstance(result, nsq.Error), result
        assert result.args[0] == b"E_INVALID DPUB timeout 5000 out of range 0-1000"
        await asyncio.wait_for(writer.closed.wait(), 5)  # E_INVALID is fatal: the broker closes

        writer = await clients.writer()
        result = await writer.apub(TOPIC, b"x" * 1025)
        assert isinstance(result, nsq.Error), result
        assert result.args[0] == b"E_BAD_MESSAGE PUB message too big 1025 > 1024"
        await asyncio.wait_for(writer.closed.wait(), 5)

        topic = await broker.topic_stats(TOPIC)
        assert topic is None or topic["message_count"] == 0, topic

    run_with_clients(broker, body)
