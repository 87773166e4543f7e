"""pynsq's Writer and Reader with ``deflate=True`` against the real knsq-broker.

pynsq carries on with a plain connection when the broker's IDENTIFY response does not grant
deflate, so each test checks from /stats, while the clients are connected, that deflate really
was in use, and from the IDENTIFY responses pynsq got which level. (pynsq 0.9.1's TLS and snappy
do not work with today's tornado and python-snappy, so only deflate is tested here; the nsqjs
suite covers TLS and snappy.)
"""

from __future__ import annotations

import asyncio

from conftest import Deliveries, run_with_clients

TOPIC = "deflate_topic"


def big_body() -> bytes:
    """300 KiB of pseudo-random letters: many deflate blocks, not trivially compressible."""
    x = 12345
    out = bytearray(300 * 1024)
    for i in range(len(out)):
        x = (x * 1103515245 + 12345) & 0x7FFFFFFF
        out[i] = 97 + (x >> 16) % 26
    return bytes(out)


async def round_trip(broker, clients, **options):
    """A Reader and a Writer with ``options`` publish (PUB, MPUB, a 300 KiB PUB) and consume.

    Returns, read while both are connected, the consumer's and the producer's /stats entries and
    the IDENTIFY responses of the reader and the writer.
    """
    deliveries = Deliveries()
    reader = clients.collecting_reader(TOPIC, "ch", deliveries, **options)
    await broker.wait_for_consumers(TOPIC, "ch", 1)
    writer = await clients.writer(**options)

    bodies = [b"hello deflate"] + [f"mpub-{i} ".encode() * 50 for i in range(5)] + [big_body()]
    assert await writer.apub(TOPIC, bodies[0]) == b"OK"
    assert await writer.ampub(TOPIC, bodies[1:6]) == b"OK"
    assert await writer.apub(TOPIC, bodies[6]) == b"OK"
    await deliveries.wait_count(len(bodies), timeout=15.0)
    await asyncio.sleep(0.1)  # a duplicate would arrive right behind
    assert sorted(deliveries.bodies()) == sorted(bodies)
    assert clients.errors() == [], f"client saw error frames or connection errors: {clients.errors()}"

    chan = await broker.channel_stats(TOPIC, "ch")
    assert len(chan["clients"]) == 1, chan["clients"]
    producers = (await broker.stats()).get("producers") or []
    assert len(producers) == 1, producers
    assert len(reader.identify_responses) == 1, reader.identify_responses
    assert len(writer.identify_responses) == 1, writer.identify_responses
    return chan["clients"][0], producers[0], reader.identify_responses[0], writer.identify_responses[0]


def assert_connection(who: str, client: dict, deflate: bool) -> None:
    assert client["deflate"] is deflate, f"{who} /stats entry: {client}"
    assert client["snappy"] is False, f"{who} /stats entry: {client}"
    assert client["tls"] is False, f"{who} /stats entry: {client}"


def test_deflate_reader_and_writer(broker):
    async def body(clients):
        consumer, producer, reader_identify, writer_identify = await round_trip(
            broker, clients, deflate=True, deflate_level=3
        )
        assert_connection("consumer", consumer, True)
        assert_connection("producer", producer, True)
        for identify in (reader_identify, writer_identify):
            assert identify["deflate"] is True, identify
            assert identify["deflate_level"] == 3, identify
            assert identify["max_deflate_level"] == 6, identify
            assert identify["snappy"] is False, identify

    run_with_clients(broker, body)


def test_deflate_level_is_clamped_to_max_deflate_level(start_broker):
    broker = start_broker("--max-deflate-level=1")

    async def body(clients):
        consumer, producer, reader_identify, writer_identify = await round_trip(
            broker, clients, deflate=True, deflate_level=9
        )
        assert_connection("consumer", consumer, True)
        assert_connection("producer", producer, True)
        for identify in (reader_identify, writer_identify):
            assert identify["deflate"] is True, identify
            assert identify["deflate_level"] == 1, identify
            assert identify["max_deflate_level"] == 1, identify

    run_with_clients(broker, body)


def test_deflate_disabled_by_flag_gives_a_plain_connection(start_broker):
    broker = start_broker("--deflate=false")

    async def body(clients):
        consumer, producer, reader_identify, writer_identify = await round_trip(broker, clients, deflate=True)
        assert_connection("consumer", consumer, False)
        assert_connection("producer", producer, False)
        for identify in (reader_identify, writer_identify):
            assert identify["deflate"] is False, identify

    run_with_clients(broker, body)
