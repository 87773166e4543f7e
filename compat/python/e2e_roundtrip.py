"""pynsq against a knsq cluster the operator runs (the operator's end-to-end suite starts it).

Publishes COUNT numbered messages with one pynsq Writer per broker given, spread evenly, then
consumes them with a pynsq Reader that knows only the lookupd, and prints what it saw as JSON:
{"published": n, "received": n, "distinct": n, "brokers": [...]}. Exits 1 when anything is
missing.

    python e2e_roundtrip.py --topic T --count 300 --lookupd http://HOST:4161 --nsqd HOST:4150 ...
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from conftest import Deliveries, Writer, recording_reader, run


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--topic", required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--lookupd", required=True)
    parser.add_argument("--nsqd", action="append", required=True)
    args = parser.parse_args()
    outcome: dict = {}

    async def body():
        writers = [await Writer([address]).wait_connected(timeout=30) for address in args.nsqd]
        expected = set()
        for n in range(args.count):
            payload = f"e2e-{n}".encode()
            expected.add(payload)
            assert await writers[n % len(writers)].apub(args.topic, payload) == b"OK"
        for writer in writers:
            writer.close()

        deliveries = Deliveries()
        reader = recording_reader(
            deliveries,
            topic=args.topic,
            channel="e2e",
            lookupd_http_addresses=[args.lookupd],
            lookupd_poll_interval=1,
            max_in_flight=100,
        )
        try:
            await deliveries.wait_count(len(expected), timeout=60)
            await asyncio.sleep(0.5)
        finally:
            outcome.update(
                published=len(expected),
                received=len(deliveries.items),
                distinct=len(set(deliveries.bodies()) & expected),
                brokers=sorted(reader.conns),
            )
            reader.close()
            await asyncio.sleep(0.05)

    try:
        run(body, timeout=120)
    finally:
        print(json.dumps(outcome))
    return 0 if outcome.get("distinct") == args.count else 1


if __name__ == "__main__":
    sys.exit(main())
