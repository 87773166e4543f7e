"""Durability of the real knsq-broker, driven by pynsq: restarts, the exclusive data directory
and a disk that fills up.

Every test publishes unique bodies, so a lost message, a duplicate or a damaged body shows up
as a difference between the multiset of bodies published and the multiset delivered. A broker
is restarted by stopping it (SIGTERM, must exit 0) and starting a new process on the same
``--data-path`` (on fresh ports; the old pynsq clients are closed first).

The fsync-before-acknowledge mode and SIGKILL are covered in ``test_durability_sync.py``.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import os
import subprocess
import time
from pathlib import Path

import nsq
import pytest

from conftest import Deliveries, Received, run_broker_to_exit, run_with_client_sets

# Restarts, thousands of messages and a 4 s defer: more than the default 30 s per body.
BODY_TIMEOUT = 120.0
pytestmark = pytest.mark.timeout(BODY_TIMEOUT + 60)


# --- helpers --------------------------------------------------------------------------------


def make_body(tag: str, i: int, size: int | None = None) -> bytes:
    """A unique, self-describing body; lengths vary (or are ``size`` bytes) so torn data shows."""
    head = f"{tag}-{i:06d}-".encode()
    digest = hashlib.sha256(head).hexdigest().encode()
    if size is None:
        return head + digest * (1 + i % 4)
    return (head + digest * (size // len(digest) + 1))[:size]


async def publish_mix(writer, topic: str, bodies: list[bytes], batch: int = 50) -> None:
    """Publish ``bodies`` in order, alternating a run of pipelined PUBs and one MPUB per batch."""
    for start in range(0, len(bodies), batch):
        chunk = bodies[start : start + batch]
        if (start // batch) % 2 == 0:
            results = await asyncio.gather(*(writer.apub(topic, b) for b in chunk))
            bad = [r for r in results if r != b"OK"]
            assert not bad, f"PUB to {topic} failed: {bad[:3]}"
        else:
            result = await writer.ampub(topic, chunk)
            assert result == b"OK", f"MPUB to {topic} failed: {result!r}"


def describe_difference(expected: list[bytes], got: list[bytes]) -> str:
    want, have = collections.Counter(expected), collections.Counter(got)
    missing = want - have
    extra = have - want
    dups = {b: n for b, n in have.items() if n > 1}
    return (
        f"expected {len(expected)} deliveries, got {len(got)}; "
        f"missing {sum(missing.values())} (e.g. {[b[:24] for b in list(missing)[:5]]}), "
        f"unexpected/duplicate {sum(extra.values())} (e.g. {[b[:24] for b in list(extra)[:5]]}), "
        f"bodies delivered more than once: {len(dups)}"
    )


async def consume_exactly(clients, topic: str, channel: str, expected: list[bytes], timeout: float = 30.0) -> Deliveries:
    """Consume with one reader (FIN each) until ``len(expected)`` arrive; then require that no
    more arrive and that the delivered bodies are exactly ``expected`` (no loss, no duplicate,
    byte for byte)."""
    deliveries = Deliveries()
    clients.collecting_reader(topic, channel, deliveries, max_in_flight=200)
    try:
        await deliveries.wait_count(len(expected), timeout=timeout)
    except AssertionError:
        raise AssertionError(
            f"{topic}/{channel}: timed out after {timeout}s: " + describe_difference(expected, deliveries.bodies())
        ) from None
    await clients.broker.wait_for_channel(
        topic, channel, lambda c: c and c["in_flight_count"] == 0 and c["depth"] == 0, f"{topic}/{channel} drained"
    )
    await asyncio.sleep(1.0)  # a duplicate would arrive right behind
    got = deliveries.bodies()
    assert sorted(got) == sorted(expected), f"{topic}/{channel}: " + describe_difference(expected, got)
    return deliveries


def segments(data_path: Path, queue: str) -> list[str]:
    return sorted(p.name for p in data_path.glob(f"{queue}.diskqueue.*.dat"))


async def wait_until(predicate, what: str, timeout: float = 10.0, interval: float = 0.05):
    """Poll the async ``predicate()`` until it returns something truthy; returns it."""
    deadline = time.monotonic() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


async def stop_cleanly(broker) -> None:
    code = await broker.astop()
    assert code == 0, f"SIGTERM: {broker.stop_problem}\n{broker.log_text()[-3000:]}"


async def create_channel(broker, topic: str, channel: str) -> None:
    """Create the topic (``/channel/create`` needs an existing one) and the channel."""
    for path, params in (("/topic/create", {"topic": topic}), ("/channel/create", {"topic": topic, "channel": channel})):
        status, answer = await broker.ahttp("POST", path, params)
        assert status == 200, f"POST {path} {params}: {status} {answer!r}"


async def restart(start_broker, old):
    return await asyncio.to_thread(start_broker.restart, old)


# --- 1. SIGTERM + restart keeps every message ------------------------------------------------


@pytest.mark.parametrize("mem_queue_size", [100, 0])
def test_sigterm_then_restart_delivers_exactly_every_message(start_broker, mem_queue_size):
    with_channel, no_channel = "dur_with_channel", "dur_no_channel"
    n_with, n_without = 1500, 500  # N = 2000, far above --mem-queue-size
    broker = start_broker(f"--mem-queue-size={mem_queue_size}", "--max-bytes-per-file=16384")
    bodies_with = [make_body("with", i) for i in range(n_with)]
    bodies_without = [make_body("without", i) for i in range(n_without)]

    async def body(clients_for):
        before = clients_for(broker)
        await create_channel(broker, with_channel, "pre")
        writer = await before.writer()
        await publish_mix(writer, with_channel, bodies_with)
        await publish_mix(writer, no_channel, bodies_without)

        chan = await broker.wait_for_channel(
            with_channel, "pre", lambda c: c and c["depth"] == n_with, f"{n_with} messages in {with_channel}/pre"
        )
        assert chan["backend_depth"] >= n_with - mem_queue_size, f"messages beyond the memory queue are not on disk: {chan}"
        topic = await broker.topic_stats(no_channel)
        assert topic["depth"] == n_without, topic
        assert topic["backend_depth"] >= n_without - mem_queue_size, topic
        before.close()

        await stop_cleanly(broker)
        files = segments(broker.data_path, f"{with_channel}:pre")
        assert len(files) >= 2, f"--max-bytes-per-file=16384 should have rolled the channel's queue: {files}"

        restarted = await restart(start_broker, broker)
        chan = await restarted.channel_stats(with_channel, "pre")
        assert chan is not None, "the pre-created channel was not restored"
        assert chan["depth"] == n_with, f"after the restart: {chan}"
        topic = await restarted.topic_stats(no_channel)
        assert topic is not None and topic["depth"] == n_without, f"after the restart: {topic}"

        after = clients_for(restarted)
        await consume_exactly(after, with_channel, "pre", bodies_with)
        # The channel-less topic kept its messages; the first channel created gets them all.
        await consume_exactly(after, no_channel, "late", bodies_without)
        topic = await restarted.topic_stats(no_channel)
        assert topic["depth"] == 0, topic

        # Fully consumed segments are deleted.
        queue = f"{with_channel}:pre"
        await wait_until(
            lambda: asyncio.sleep(0, len(segments(restarted.data_path, queue)) <= 1),
            f"consumed segments of {queue} to be deleted (have {segments(restarted.data_path, queue)})",
        )
        assert after.errors() == [], after.errors()

    run_with_client_sets(body, BODY_TIMEOUT)


# --- 2. in-flight and deferred messages pending at shutdown ----------------------------------


def test_inflight_and_deferred_messages_survive_sigterm(start_broker):
    topic = "dur_pending"
    defer_ms = 4000
    broker = start_broker("--mem-queue-size=100")
    inflight_bodies = [f"inflight-{i}".encode() for i in range(5)]
    queued_bodies = [f"queued-{i}".encode() for i in range(3)]
    deferred_bodies = [f"deferred-{i}".encode() for i in range(5)]

    async def body(clients_for):
        before = clients_for(broker)
        held = Deliveries()

        def hold(message):  # never FIN: stays in flight until the shutdown
            held.add(Received(message, "holder"))
            message.enable_async()

        before.reader(topic, "ch", hold, max_in_flight=len(inflight_bodies))
        await broker.wait_for_consumers(topic, "ch", 1)
        writer = await before.writer()
        for b in inflight_bodies:
            assert await writer.apub(topic, b) == b"OK"
        await held.wait_count(len(inflight_bodies))
        assert await writer.ampub(topic, queued_bodies) == b"OK"  # RDY is used up: these wait
        due = {}
        for b in deferred_bodies:
            sent = time.time()
            assert await writer.adpub(topic, defer_ms, b) == b"OK"
            due[b] = sent + defer_ms / 1000
        await broker.wait_for_channel(
            topic,
            "ch",
            lambda c: c and c["in_flight_count"] == 5 and c["deferred_count"] == 5 and c["depth"] == 3,
            "5 in flight, 5 deferred, 3 queued",
        )
        held_ids = {d.body: d.id for d in held.items}

        await stop_cleanly(broker)
        before.close()
        assert time.time() < min(due.values()) - 1, "setup too slow: the deferred messages were due before the restart"

        restarted = await restart(start_broker, broker)
        after = clients_for(restarted)
        chan = await restarted.channel_stats(topic, "ch")
        # Deferred records read back from disk may count in depth until they are loaded.
        assert chan is not None and chan["depth"] + chan["deferred_count"] == 13, f"after the restart: {chan}"
        got: list[tuple[Received, float]] = []
        deliveries = Deliveries()

        def collect(message):
            got.append((Received(message, "after"), time.time()))
            deliveries.add(got[-1][0])
            return True

        after.reader(topic, "ch", collect, max_in_flight=20)
        await deliveries.wait_count(len(inflight_bodies) + len(queued_bodies), timeout=10)
        expected = inflight_bodies + queued_bodies + deferred_bodies
        await deliveries.wait_count(len(expected), timeout=max(due.values()) - time.time() + 5)
        await restarted.wait_for_channel(
            topic, "ch", lambda c: c and c["in_flight_count"] == 0 and c["depth"] == 0 and c["deferred_count"] == 0, "drained"
        )
        await asyncio.sleep(0.5)
        assert sorted(deliveries.bodies()) == sorted(expected), describe_difference(expected, deliveries.bodies())

        by_body = {r.body: (r, at) for r, at in got}
        for b in inflight_bodies:
            r, _ = by_body[b]
            assert r.id == held_ids[b], f"{b!r} came back with another ID: {r.id!r} != {held_ids[b]!r}"
            assert r.attempts >= 2, f"{b!r} was delivered before the shutdown, but came back with attempts {r.attempts}"
        for b in queued_bodies:
            assert by_body[b][0].attempts == 1, (b, by_body[b][0].attempts)
        for b in deferred_bodies:
            r, at = by_body[b]
            early = due[b] - at
            assert at >= due[b], f"{b!r} arrived {early:.3f}s before its due time (DPUB {defer_ms} ms before the restart)"
            assert at < due[b] + 3, f"{b!r} arrived {at - due[b]:.3f}s after its due time"
            assert r.attempts == 1, (b, r.attempts)
        assert after.errors() == [], after.errors()

    run_with_client_sets(body, BODY_TIMEOUT)


# --- 3. metadata: topics, channels and paused flags ------------------------------------------


def test_restart_keeps_topics_channels_and_paused_flags(start_broker):
    broker = start_broker()

    async def post(b, path, **params):
        status, answer = await b.ahttp("POST", path, params)
        assert status == 200, f"POST {path} {params}: {status} {answer!r}"

    def layout(stats: dict) -> dict:
        return {
            t["topic_name"]: (t["paused"], {c["channel_name"]: c["paused"] for c in t["channels"] or []})
            for t in stats.get("topics") or []
        }

    async def body(clients_for):
        before = clients_for(broker)
        await post(broker, "/topic/create", topic="meta_a")
        await post(broker, "/channel/create", topic="meta_a", channel="c1")
        await post(broker, "/channel/create", topic="meta_a", channel="c2")
        await post(broker, "/topic/create", topic="meta_b")
        await post(broker, "/topic/create", topic="meta_c")
        await post(broker, "/channel/create", topic="meta_c", channel="c")
        await post(broker, "/topic/pause", topic="meta_a")
        await post(broker, "/channel/pause", topic="meta_c", channel="c")
        # Ephemeral channel and topic, with consumers connected at the shutdown.
        before.collecting_reader("meta_a", "x#ephemeral", Deliveries())
        before.collecting_reader("meta_tmp#ephemeral", "c", Deliveries())
        await broker.wait_for_consumers("meta_a", "x#ephemeral", 1)
        await broker.wait_for_consumers("meta_tmp#ephemeral", "c", 1)
        expected = {
            "meta_a": (True, {"c1": False, "c2": False}),
            "meta_b": (False, {}),
            "meta_c": (False, {"c": True}),
        }
        now = layout(await broker.stats())
        assert now == {
            **expected,
            "meta_a": (True, {"c1": False, "c2": False, "x#ephemeral": False}),
            "meta_tmp#ephemeral": (False, {"c": False}),
        }, now

        await stop_cleanly(broker)
        before.close()
        second = await restart(start_broker, broker)
        restored = layout(await second.stats())
        assert restored == expected, f"restored {restored}, expected {expected} (ephemeral ones must not come back)"

        # The restored flags act: a message to the paused topic stays in the topic, and one to the
        # paused channel is not delivered until the channel is unpaused.
        clients = clients_for(second)
        writer = await clients.writer()
        assert await writer.apub("meta_a", b"held by the paused topic") == b"OK"
        assert await writer.apub("meta_c", b"held by the paused channel") == b"OK"
        deliveries = Deliveries()
        clients.collecting_reader("meta_c", "c", deliveries)
        await second.wait_for_consumers("meta_c", "c", 1)
        await asyncio.sleep(1.0)
        assert deliveries.bodies() == [], "a restored paused channel delivered a message"
        assert (await second.topic_stats("meta_a"))["depth"] == 1
        assert (await second.channel_stats("meta_a", "c1"))["depth"] == 0, "a restored paused topic fed its channels"
        await post(second, "/channel/unpause", topic="meta_c", channel="c")
        await deliveries.wait_count(1)
        assert deliveries.bodies() == [b"held by the paused channel"]

        # Unpausing is persisted too, and the message held by the paused topic survives.
        await post(second, "/topic/unpause", topic="meta_a")
        await second.wait_for_channel("meta_a", "c1", lambda c: c and c["depth"] == 1, "meta_a to feed c1 once unpaused")
        await post(second, "/channel/pause", topic="meta_a", channel="c2")
        clients.close()
        await stop_cleanly(second)
        # Same ports this time: what an operator's restart does.
        third = await asyncio.to_thread(start_broker.restart, second, same_ports=True)
        assert (third.tcp_address, third.http_address) == (second.tcp_address, second.http_address)
        restored = layout(await third.stats())
        assert restored == {
            "meta_a": (False, {"c1": False, "c2": True}),
            "meta_b": (False, {}),
            "meta_c": (False, {"c": False}),
        }, restored
        assert (await third.channel_stats("meta_a", "c1"))["depth"] == 1
        assert (await third.channel_stats("meta_a", "c2"))["depth"] == 1

    run_with_client_sets(body, BODY_TIMEOUT)


# --- 4. exclusive data directory ----------------------------------------------------------


def test_second_broker_on_same_data_path_refuses_to_start(start_broker):
    topic = "dur_exclusive"
    broker = start_broker("--mem-queue-size=10")
    first_bodies = [make_body("first", i) for i in range(30)]
    later_bodies = [make_body("later", i) for i in range(30)]

    async def body(clients_for):
        clients = clients_for(broker)
        writer = await clients.writer()
        await publish_mix(writer, topic, first_bodies, batch=10)
        for attempt in range(2):  # a refused start must not release the first broker's lock
            code, output = await asyncio.to_thread(run_broker_to_exit, [], broker.data_path, 15.0)
            assert code is not None, f"attempt {attempt + 1}: a second broker on the same --data-path kept running:\n{output}"
            assert code != 0, f"attempt {attempt + 1}: the second broker exited 0:\n{output}"
            assert "in use by another knsq-broker" in output, f"attempt {attempt + 1}: unclear message:\n{output}"
        assert broker.proc.poll() is None, "the first broker died"
        assert await broker.ping() == (200, b"OK")
        assert (broker.data_path / "knsq-broker.lock").exists()

        await publish_mix(writer, topic, later_bodies, batch=10)
        await consume_exactly(clients, topic, "ch", first_bodies + later_bodies)
        assert clients.errors() == [], clients.errors()

    run_with_client_sets(body, BODY_TIMEOUT)


# --- 5. disk full ---------------------------------------------------------------------------


async def check_consumed(clients, topic: str, channel: str, must: list[bytes], failed: list[bytes]) -> None:
    """Every body of ``must`` is delivered exactly once; bodies whose publish failed at most once."""
    deliveries = Deliveries()
    clients.collecting_reader(topic, channel, deliveries, max_in_flight=50)
    try:
        await deliveries.wait_count(len(must), timeout=30)
    except AssertionError:
        got = collections.Counter(deliveries.bodies())
        missing = [b[:20] for b in must if got[b] == 0]
        raise AssertionError(f"{channel}: {len(missing)} of {len(must)} acknowledged messages were lost: {missing[:5]}") from None
    await clients.broker.wait_for_channel(
        topic, channel, lambda c: c and c["depth"] == 0 and c["in_flight_count"] == 0, f"{channel} drained"
    )
    await asyncio.sleep(0.5)
    got = collections.Counter(deliveries.bodies())
    missing = [b[:20] for b in must if got[b] == 0]
    assert not missing, f"{channel}: {len(missing)} of {len(must)} acknowledged messages were lost: {missing[:5]}"
    dups = [b[:20] for b, n in got.items() if n > 1]
    assert not dups, f"{channel}: delivered more than once: {dups[:5]}"
    unknown = [b[:20] for b in got if b not in must and b not in failed]
    assert not unknown, f"{channel}: delivered bodies never published (damaged?): {unknown[:5]}"
    ghost = [b[:20] for b in got if b in failed]
    if ghost:
        print(f"note: {channel}: {len(ghost)} publish(es) answered with an error were delivered anyway: {ghost}")
    assert clients.errors() == [], clients.errors()


@pytest.fixture
def small_fs(tmp_path):
    """A 2 MiB tmpfs (root only). Skips when it cannot be mounted, or fails if ``CI`` is set."""
    mount_point = tmp_path / "smallfs"
    mount_point.mkdir()
    try:
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)],
            capture_output=True, text=True, timeout=15,
        )
        problem = None if result.returncode == 0 else f"exit {result.returncode}: {(result.stderr or result.stdout).strip()}"
    except (OSError, subprocess.TimeoutExpired) as err:
        problem = f"`mount` could not run: {err!r}"
    if problem is not None:
        reason = f"cannot mount a 2 MiB tmpfs at {mount_point} (needs root or CAP_SYS_ADMIN): {problem}"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI is set, so the disk-full test must not be skipped")
        pytest.skip(reason)
    try:
        yield mount_point
    finally:
        # The brokers are stopped first (start_broker is torn down before this fixture).
        for args in (["umount", str(mount_point)], ["umount", "-l", str(mount_point)]):
            if subprocess.run(args, capture_output=True, timeout=15).returncode == 0:
                break


def test_disk_full_fails_publishes_then_recovers_without_loss(small_fs, start_broker):
    topic = "dur_full"
    size = 5000  # more than a page: never fits in what is left of a partly used page
    filler = small_fs / "filler"
    filler.write_bytes(os.urandom(1024 * 1024))
    data = small_fs / "data"
    data.mkdir()
    broker = start_broker("--mem-queue-size=0", data_path=data)

    async def body(clients_for):
        clients = clients_for(broker)
        await create_channel(broker, topic, "live")  # consumed on this broker
        await create_channel(broker, topic, "later")  # consumed after a restart
        assert (await broker.metrics())["knsq_healthy"] == 1

        writer = await clients.writer()
        acked, failed = [], []
        fault = None
        for i in range(2000):  # 2 MiB / 5000 B: the disk is full long before
            message = make_body("before", i, size)
            result = await writer.apub(topic, message)
            if result == b"OK":
                acked.append(message)
                continue
            failed.append(message)
            fault = result
            break
        assert fault is not None, f"the 2 MiB filesystem never filled up ({len(acked)} x {size} B acknowledged)"
        assert acked, "the very first publish failed: the fault was not caused by the publishes"
        assert isinstance(fault, nsq.Error), fault
        text = fault.args[0]
        assert text.startswith(b"E_PUB_FAILED PUB failed "), f"PUB on a full disk answered {text!r}"
        assert len(text) > len(b"E_PUB_FAILED PUB failed "), f"no reason given: {text!r}"
        await asyncio.wait_for(writer.closed.wait(), 5)  # fatal, as in nsqd

        writer = await clients.writer()
        batch = [make_body("mpub-fail", j, size) for j in range(3)]
        result = await writer.ampub(topic, batch)
        failed += batch
        assert isinstance(result, nsq.Error), f"MPUB on a full disk answered {result!r}"
        assert result.args[0].startswith(b"E_MPUB_FAILED MPUB failed "), f"MPUB on a full disk answered {result.args[0]!r}"
        await asyncio.wait_for(writer.closed.wait(), 5)

        message = make_body("http-fail", 0, size)
        status, answer = await broker.ahttp("POST", "/pub", {"topic": topic}, message)
        failed.append(message)
        assert (status, json.loads(answer)) == (500, {"message": "INTERNAL_ERROR"}), (status, answer)

        status, answer = await broker.ping()
        assert status == 500 and answer.startswith(b"NOK - "), f"/ping on a full disk: {status} {answer!r}"
        health = (await broker.stats())["health"]
        assert health.startswith("NOK - "), health
        metrics = await broker.metrics()
        assert metrics["knsq_healthy"] == 0, metrics
        assert metrics["knsq_disk_write_errors_total"] >= 1, metrics
        assert broker.proc.poll() is None, "the broker died on a full disk"

        filler.unlink()  # free 1 MiB
        writer = await clients.writer()
        after = [make_body("after", j, size) for j in range(6)]
        assert await writer.apub(topic, after[0]) == b"OK"
        assert await writer.ampub(topic, after[1:5]) == b"OK"
        status, answer = await broker.ahttp("POST", "/pub", {"topic": topic}, after[5])
        assert (status, answer) == (200, b"OK"), (status, answer)
        assert await broker.ping() == (200, b"OK")
        assert (await broker.stats())["health"] == "OK"
        assert (await broker.metrics())["knsq_healthy"] == 1

        must = acked + after
        await check_consumed(clients, topic, "live", must, failed)

        # What the failed writes left behind does not spoil the queue for a restarted broker.
        clients.close()
        await stop_cleanly(broker)
        restarted = await restart(start_broker, broker)
        await check_consumed(clients_for(restarted), topic, "later", must, failed)

    run_with_client_sets(body, BODY_TIMEOUT)
