"""Server-side maximum of attempts and dead-letter topics (knsq only) with pynsq consumers.

The consumers have pynsq's own give-up turned off (``max_tries=0``) and requeue every message
without backoff, as a consumer with a poison message would. The broker must deliver each
message ``--max-attempts`` times, then move it once to the channel's dead-letter topic with its
ID and body, count it in ``/stats`` and ``/metrics``, keep it through a crash, and redrive it to
the one channel it came from.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import json
import time

import pytest

from conftest import Deliveries, Received, broker_flags, run_with_client_sets, run_with_clients

TOPIC = "orders"


def require_dead_letters() -> None:
    if "--max-attempts" not in broker_flags():
        pytest.fail("this knsq-broker build has no --max-attempts flag (issue 15: dead-letter topics)")


def failing_reader(clients, topic: str, channel: str, deliveries: Deliveries, **kwargs):
    """A reader whose handler records each delivery and requeues it at once, without backoff."""

    def handler(message):
        deliveries.add(Received(message, None))
        message.enable_async()
        message.requeue(backoff=False, delay=0)

    return clients.reader(topic, channel, handler, max_tries=0, max_in_flight=10, **kwargs)


async def json_call(broker, method: str, path: str, params: dict) -> dict:
    status, body = await broker.ahttp(method, path, params)
    assert status == 200, f"{method} {path} {params}: {status} {body!r}"
    return json.loads(body)


async def dead_lettered_metric(broker, topic: str, channel: str) -> float:
    samples = await broker.metrics()
    return samples[f'nsq_channel_dead_lettered_total{{channel="{channel}",topic="{topic}"}}']


def test_a_consumer_that_requeues_everything_sees_each_message_max_attempts_times(start_broker):
    require_dead_letters()
    broker = start_broker("--max-attempts=3")

    async def body(clients):
        for path, params in (("/topic/create", {"topic": TOPIC}), ("/channel/create", {"topic": TOPIC, "channel": "billing"})):
            status, answer = await broker.ahttp("POST", path, params)
            assert status == 200, f"POST {path}: {status} {answer!r}"
        deliveries = Deliveries()
        failing_reader(clients, TOPIC, "billing", deliveries)
        await broker.wait_for_consumers(TOPIC, "billing", 1)
        writer = await clients.writer()
        sent = [f"poison-{i}".encode() for i in range(5)]
        assert await writer.ampub(TOPIC, sent) == b"OK"

        chan = await broker.wait_for_channel(
            TOPIC, "billing", lambda c: c and c.get("dead_lettered_count") == 5, "5 messages dead-lettered"
        )
        await asyncio.sleep(0.5)  # nothing more may come
        attempts = collections.defaultdict(list)
        for d in deliveries.items:
            attempts[d.id].append(d.attempts)
        assert len(attempts) == 5, attempts
        assert all(a == [1, 2, 3] for a in attempts.values()), f"each message exactly 3 times: {dict(attempts)}"
        assert chan["max_attempts"] == 3 and chan["dead_letter_topic"] == "orders.billing.dlq", chan
        assert chan["requeue_count"] == 15 and chan["depth"] == 0 and chan["in_flight_count"] == 0, chan
        assert await dead_lettered_metric(broker, TOPIC, "billing") == 5.0

        dlq = await broker.topic_stats("orders.billing.dlq")
        assert dlq["depth"] == 5 and dlq["message_count"] == 5, dlq
        status, peeked = await broker.ahttp("GET", "/topic/peek", {"topic": "orders.billing.dlq", "count": 10})
        assert status == 200
        peeked = json.loads(peeked)["messages"]
        assert [base64.b64decode(m["body"]) for m in peeked] == sent
        assert {m["id"].encode() for m in peeked} == set(attempts)
        for m in peeked:
            assert m["dead_letter"]["topic"] == TOPIC and m["dead_letter"]["channel"] == "billing", m
            assert m["dead_letter"]["attempts"] == 3 and m["dead_letter"]["reason"] == "requeued", m

        # A pynsq consumer of the dead-letter topic gets the original bodies and IDs, once each.
        dead = Deliveries()
        clients.collecting_reader("orders.billing.dlq", "inspect", dead, max_in_flight=10)
        await dead.wait_count(5)
        await asyncio.sleep(0.3)
        assert sorted(dead.bodies()) == sorted(sent)
        assert {d.id for d in dead.items} == set(attempts)
        assert all(d.attempts == 1 for d in dead.items)
        assert clients.errors() == []

    run_with_clients(broker, body)


def test_redrive_brings_messages_back_to_their_channel_only(start_broker):
    require_dead_letters()
    broker = start_broker()

    async def body(clients):
        await broker.ahttp("POST", "/topic/create", {"topic": TOPIC})
        for channel in ("failing", "fine"):
            status, answer = await broker.ahttp("POST", "/channel/create", {"topic": TOPIC, "channel": channel})
            assert status == 200, answer
        config = await json_call(broker, "POST", "/channel/config",
                                 {"topic": TOPIC, "channel": "failing", "max_attempts": 2, "dead_letter_topic": "orders-poison"})
        assert config["max_attempts"] == 2 and config["dead_letter_topic"] == "orders-poison", config

        fine = Deliveries()
        clients.collecting_reader(TOPIC, "fine", fine, max_in_flight=10)
        failed = Deliveries()
        failing = failing_reader(clients, TOPIC, "failing", failed)
        await broker.wait_for_consumers(TOPIC, "fine", 1)
        await broker.wait_for_consumers(TOPIC, "failing", 1)
        writer = await clients.writer()
        sent = [f"order-{i}".encode() for i in range(6)]
        assert await writer.ampub(TOPIC, sent) == b"OK"
        await fine.wait_count(6)
        await broker.wait_for_channel(TOPIC, "failing", lambda c: c and c.get("dead_lettered_count") == 6, "6 dead letters")
        assert len(failed.items) == 12
        failing.close()
        await broker.wait_for_channel(TOPIC, "failing", lambda c: c and not c["clients"], "the failing consumer gone")

        # The consumer is fixed: no limit any more; replay through a channel of the dead-letter topic.
        await json_call(broker, "POST", "/channel/config", {"topic": TOPIC, "channel": "failing", "max_attempts": 0})
        status, answer = await broker.ahttp("POST", "/channel/create", {"topic": "orders-poison", "channel": "replay"})
        assert status == 200, answer
        moved = await json_call(broker, "POST", "/channel/redrive", {"topic": "orders-poison", "channel": "replay"})
        assert moved == {"moved": 6}

        fixed = Deliveries()
        clients.collecting_reader(TOPIC, "failing", fixed, max_in_flight=10)
        await fixed.wait_count(6)
        await asyncio.sleep(0.5)
        assert sorted(fixed.bodies()) == sorted(sent), "each redriven message once"
        assert all(d.attempts == 1 for d in fixed.items), [d.attempts for d in fixed.items]
        assert len(fine.items) == 6, "the other channel of the topic got nothing again"
        replay = await broker.channel_stats("orders-poison", "replay")
        assert replay["depth"] == 0 and replay["in_flight_count"] == 0, replay

    run_with_clients(broker, body)


def test_redrive_into_a_deleted_channel_is_refused_and_moves_nothing(start_broker):
    require_dead_letters()
    broker = start_broker("--max-attempts=1")

    async def body(clients):
        await broker.ahttp("POST", "/topic/create", {"topic": TOPIC})
        await broker.ahttp("POST", "/channel/create", {"topic": TOPIC, "channel": "old"})
        failed = Deliveries()
        reader = failing_reader(clients, TOPIC, "old", failed)
        await broker.wait_for_consumers(TOPIC, "old", 1)
        writer = await clients.writer()
        assert await writer.ampub(TOPIC, [b"a", b"b"]) == b"OK"
        await broker.wait_for_channel(TOPIC, "old", lambda c: c and c.get("dead_lettered_count") == 2, "2 dead letters")
        reader.close()
        await broker.ahttp("POST", "/channel/create", {"topic": "orders.old.dlq", "channel": "replay"})
        status, answer = await broker.ahttp("POST", "/channel/delete", {"topic": TOPIC, "channel": "old"})
        assert status == 200, answer
        status, answer = await broker.ahttp("POST", "/channel/redrive", {"topic": "orders.old.dlq", "channel": "replay"})
        assert (status, json.loads(answer)) == (404, {"message": "ORIGIN_CHANNEL_NOT_FOUND"})
        replay = await broker.channel_stats("orders.old.dlq", "replay")
        assert replay["depth"] == 2, replay

    run_with_clients(broker, body)


def test_a_restart_keeps_limits_counts_and_dead_letters(start_broker):
    require_dead_letters()
    broker = start_broker("--max-attempts=2")

    async def body(clients_for):
        clients = clients_for(broker)
        await broker.ahttp("POST", "/topic/create", {"topic": TOPIC})
        await broker.ahttp("POST", "/channel/create", {"topic": TOPIC, "channel": "kept"})
        await json_call(broker, "POST", "/channel/config", {"topic": TOPIC, "channel": "kept", "max_attempts": 1})
        failed = Deliveries()
        failing_reader(clients, TOPIC, "kept", failed)
        await broker.wait_for_consumers(TOPIC, "kept", 1)
        writer = await clients.writer()
        assert await writer.ampub(TOPIC, [b"x", b"y", b"z"]) == b"OK"
        await broker.wait_for_channel(TOPIC, "kept", lambda c: c and c.get("dead_lettered_count") == 3, "3 dead letters")
        clients.close()
        assert await broker.astop() == 0

        restarted = await asyncio.to_thread(start_broker.restart, broker)
        config = await json_call(restarted, "GET", "/channel/config", {"topic": TOPIC, "channel": "kept"})
        assert config["max_attempts"] == 1 and config["dead_lettered_count"] == 3, config
        assert config["configured"]["max_attempts"] == 1, config
        chan = await restarted.channel_stats(TOPIC, "kept")
        assert chan["dead_lettered_count"] == 3 and chan["max_attempts"] == 1, chan
        assert await dead_lettered_metric(restarted, TOPIC, "kept") == 3.0
        assert (await restarted.topic_stats("orders.kept.dlq"))["depth"] == 3

    run_with_client_sets(body)


BODY_TIMEOUT = 90.0


@pytest.mark.timeout(BODY_TIMEOUT + 60)
def test_sigkill_while_dead_lettering_with_sync_publish_loses_nothing(start_broker):
    require_dead_letters()
    flags = ("--sync-publish", "--max-attempts=2")
    broker = start_broker(*flags)
    per_round = 300

    async def body(clients_for):
        nonlocal broker
        sent: list[bytes] = []
        await broker.ahttp("POST", "/topic/create", {"topic": TOPIC})
        await broker.ahttp("POST", "/channel/create", {"topic": TOPIC, "channel": "c"})
        # Each round: publish, let a consumer requeue everything, and crash a different time in.
        for round_, kill_after in enumerate((0.02, 0.08, 0.15, 0.01)):
            clients = clients_for(broker)
            writer = await clients.writer()
            bodies = [f"r{round_}-{i:04d}".encode() for i in range(per_round)]
            for start in range(0, per_round, 100):
                assert await writer.ampub(TOPIC, bodies[start:start + 100]) == b"OK"
            sent.extend(bodies)
            failing_reader(clients, TOPIC, "c", Deliveries())
            await asyncio.sleep(kill_after)
            code = await broker.akill()
            assert code == -9, f"SIGKILL: exit code {code}"
            clients.close()
            broker = await asyncio.to_thread(start_broker.restart, broker)

        clients = clients_for(broker)
        failing_reader(clients, TOPIC, "c", Deliveries())
        await broker.wait_for_channel(
            TOPIC, "c", lambda c: c and c["depth"] == 0 and c["in_flight_count"] == 0 and c["deferred_count"] == 0,
            "every message dead-lettered", timeout=30,
        )
        dead = Deliveries()
        clients.collecting_reader("orders.c.dlq", "check", dead, max_in_flight=100)
        deadline = time.monotonic() + 30
        while not set(sent) <= set(dead.bodies()) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        missing = set(sent) - set(dead.bodies())
        duplicates = len(dead.items) - len(set(dead.bodies()))
        print(f"{len(sent)} messages, {len(dead.items)} dead letters ({duplicates} duplicates)")
        assert not missing, f"{len(missing)} lost, e.g. {sorted(missing)[:5]}"

    run_with_client_sets(body, BODY_TIMEOUT)
