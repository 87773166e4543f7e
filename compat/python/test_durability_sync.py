"""``--sync-publish`` (fsync before acknowledge) against the real knsq-broker, driven by pynsq:
a crash (SIGKILL) in the middle of concurrent publishing loses nothing that was acknowledged.

Several pynsq Writers publish unique bodies (PUB and MPUB) as fast as the broker acknowledges
them, a consumer holds some messages in flight and another one finishes what it gets, and the
broker is killed with SIGKILL mid-stream. After a restart on the same ``--data-path``, every
body that was answered ``OK`` must be delivered at least once (counting what the finishing
consumer got before the crash), and the messages that were in flight at the crash come back.
Duplicates are allowed: they are counted and printed.
"""

from __future__ import annotations

import asyncio
import collections
import time

import pytest

from conftest import Deliveries, Received, broker_flags, run_with_client_sets

BODY_TIMEOUT = 120.0
pytestmark = pytest.mark.timeout(BODY_TIMEOUT + 60)

TOPIC = "dur_sync"
WRITERS = 4
MPUB_SIZE = 10
HOLD = 10  # messages the holding consumer keeps in flight through the crash
MIN_ACKED = 1000  # kill once this many are acknowledged (or after PUBLISH_FOR seconds)
PUBLISH_FOR = 4.0
DEFER_MS = 5000  # a few DPUBs before the stream: deferred through the crash, due after the restart


def require_sync_publish() -> None:
    if "--sync-publish" not in broker_flags():
        pytest.fail(
            "this knsq-broker build has no --sync-publish flag (issue 3: acknowledge a publish only "
            "after its fsync), so the crash test cannot run"
        )


@pytest.mark.parametrize("mem_queue_size", [None, 0])
def test_sigkill_during_sync_publish_loses_nothing_acknowledged(start_broker, mem_queue_size, record_property):
    require_sync_publish()
    flags = ["--sync-publish"] + ([] if mem_queue_size is None else [f"--mem-queue-size={mem_queue_size}"])
    broker = start_broker(*flags)

    async def body(clients_for):
        before = clients_for(broker)
        for path, params in (("/topic/create", {"topic": TOPIC}), ("/channel/create", {"topic": TOPIC, "channel": "held"})):
            status, answer = await broker.ahttp("POST", path, params)
            assert status == 200, f"POST {path}: {status} {answer!r}"

        # "held": one consumer takes HOLD messages and never answers them.
        held = Deliveries()

        def hold(message):
            held.add(Received(message, "holder"))
            message.enable_async()

        before.reader(TOPIC, "held", hold, max_in_flight=HOLD)
        # "done": a consumer that finishes everything it gets before the crash.
        done_before = Deliveries()
        before.collecting_reader(TOPIC, "done", done_before, max_in_flight=50)
        await broker.wait_for_consumers(TOPIC, "held", 1)
        await broker.wait_for_consumers(TOPIC, "done", 1)

        writers = [await before.writer() for _ in range(WRITERS)]
        acked: list[bytes] = []
        attempted: set[bytes] = set()
        due: dict[bytes, float] = {}  # deferred body -> monotonic due time
        for i in range(5):
            deferred = f"deferred-{i}".encode()
            attempted.add(deferred)
            sent = time.monotonic()
            assert await writers[0].adpub(TOPIC, DEFER_MS, deferred) == b"OK"
            acked.append(deferred)
            due[deferred] = sent + DEFER_MS / 1000
        endings: list[str] = []
        stop = asyncio.Event()

        async def produce(k: int, writer) -> None:
            seq = 0
            while not stop.is_set():
                if seq % 2 == 0:
                    bodies = [f"w{k}-{seq:06d}-pub".encode()]
                else:
                    bodies = [f"w{k}-{seq:06d}-mpub-{j}".encode() for j in range(MPUB_SIZE)]
                attempted.update(bodies)
                try:
                    if len(bodies) == 1:
                        result = await writer.apub(TOPIC, bodies[0])
                    else:
                        result = await writer.ampub(TOPIC, bodies)
                except Exception as err:  # the 10 s bound of a publish
                    result = err
                if result != b"OK":
                    endings.append(f"writer {k}: {result!r}")
                    return
                acked.extend(bodies)
                seq += 1
            endings.append(f"writer {k}: stopped")

        producers = [asyncio.create_task(produce(k, w)) for k, w in enumerate(writers)]
        started = time.monotonic()
        while (len(acked) < MIN_ACKED or len(held.items) < HOLD) and time.monotonic() - started < PUBLISH_FOR:
            await asyncio.sleep(0.05)
        assert len(held.items) == HOLD, f"the holding consumer got {len(held.items)} of {HOLD} messages"
        assert all(not p.done() for p in producers), f"a writer stopped before the crash: {endings}"
        acked_at_kill = len(acked)
        assert acked_at_kill > 0, "nothing was acknowledged in --sync-publish mode"

        code = await broker.akill()  # crash mid-stream: every writer has a publish outstanding
        assert code == -9, f"SIGKILL: exit code {code}"
        await asyncio.wait_for(asyncio.gather(*producers), 20)
        stop.set()
        publish_rate = acked_at_kill / (time.monotonic() - started)
        held_ids = {d.body: d.id for d in held.items}
        delivered_before = set(done_before.bodies())
        before.close()

        restarted = await asyncio.to_thread(start_broker.restart, broker)
        after = clients_for(restarted)
        got = {"held": Deliveries(), "done": Deliveries()}
        after.collecting_reader(TOPIC, "held", got["held"], max_in_flight=200)
        after.collecting_reader(TOPIC, "done", got["done"], max_in_flight=200)
        must = {
            "held": set(acked) | set(held_ids),
            "done": (set(acked) | set(held_ids)) - delivered_before,
        }

        async def all_back() -> bool:
            return all(must[ch] <= set(got[ch].bodies()) for ch in must)

        # Until everything is back, or nothing new has arrived for 3 s (then something is lost).
        deadline = time.monotonic() + 40
        seen, quiet_since = -1, time.monotonic()
        while not await all_back() and time.monotonic() < deadline:
            count = sum(len(d.items) for d in got.values())
            if count != seen:
                seen, quiet_since = count, time.monotonic()
            elif time.monotonic() - quiet_since > 3 and time.monotonic() > max(due.values()) + 2:
                break
            await asyncio.sleep(0.1)
        for ch in got:  # wait for the rest (unacknowledged but stored) to drain
            await restarted.wait_for_channel(
                TOPIC, ch, lambda c: c and c["depth"] == 0 and c["in_flight_count"] == 0 and c["deferred_count"] == 0,
                f"{TOPIC}/{ch} drained after the restart", timeout=20,
            )
        await asyncio.sleep(1.0)

        report = [
            f"mem-queue-size={mem_queue_size if mem_queue_size is not None else 'default'}: "
            f"{acked_at_kill} messages acknowledged by {WRITERS} writers before SIGKILL "
            f"({publish_rate:.0f}/s with --sync-publish, debug build); {len(attempted)} attempted; "
            f"writers ended with {endings}"
        ]
        problems = []
        for ch in ("held", "done"):
            bodies = got[ch].bodies()
            counts = collections.Counter(bodies)
            missing = must[ch] - set(counts)
            unknown = set(counts) - attempted
            dups = sum(n - 1 for n in counts.values())
            unacked = len(set(counts) - set(acked) - set(held_ids))
            report.append(
                f"channel {ch}: {len(bodies)} deliveries after the restart, {len(counts)} distinct, "
                f"{dups} duplicates, {unacked} unacknowledged-but-stored"
                + (
                    f", {len(delivered_before)} finished before the crash, of which "
                    f"{len(delivered_before & set(counts))} were delivered again"
                    if ch == "done"
                    else ""
                )
                + f"; missing {len(missing)}"
            )
            if missing:
                in_flight = missing & set(held_ids) if ch == "held" else set()
                problems.append(
                    f"{ch}: {len(missing)} acknowledged messages lost"
                    + (f" ({len(in_flight)} of them in flight to the holding consumer at the crash)" if ch == "held" else "")
                    + f", e.g. {sorted(missing)[:5]}"
                )
            if unknown:
                problems.append(f"{ch}: bodies never published: {sorted(unknown)[:5]}")
        for d in held.items + done_before.items + got["held"].items + got["done"].items:
            if d.body in due and d.at < due[d.body]:
                problems.append(f"{d.body!r} delivered {due[d.body] - d.at:.3f}s before it was due")
        for d in got["held"].items:
            if d.body in held_ids and d.id != held_ids[d.body]:
                problems.append(f"held: {d.body!r} came back with another ID {d.id!r} != {held_ids[d.body]!r}")
        print("\n".join(report))
        record_property("sync_publish_report", " | ".join(report))
        assert not problems, "\n".join(problems + report)

    run_with_client_sets(body, BODY_TIMEOUT)
