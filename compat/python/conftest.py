"""Fixtures for the pynsq compatibility suite.

Every test gets its own ``knsq-broker`` process, started on loopback port 0 with a temporary
data directory, and drives it with pynsq's Writer and Reader on a fresh asyncio/tornado loop.
Nothing here can hang: broker start-up, every awaited event and every test are bounded.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import nsq
import pytest

REPO = Path(__file__).resolve().parents[2]
BROKER_BIN = Path(os.environ.get("KNSQ_BROKER_BIN", REPO / "target" / "debug" / "knsq-broker"))
LOOKUPD_BIN = Path(os.environ.get("KNSQ_LOOKUPD_BIN", REPO / "target" / "debug" / "knsq-lookupd"))

STARTUP_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
# Upper bound for the body of one test (its own coroutine); pytest-timeout is the backstop.
TEST_TIMEOUT = 30.0

_LISTEN_RE = {
    "tcp": re.compile(r"TCP: listening on (\S+)"),
    "http": re.compile(r"HTTP: listening on (\S+)"),
}


class _Process:
    """A knsq binary started by a test: its output goes to ``log_path``, and start-up waits
    (bounded) for the ``<KIND>: listening on ADDR`` lines named by ``listen``."""

    def __init__(self, name: str, cmd: list[str], log_path: Path, listen: dict[str, re.Pattern]):
        self.name = name
        self.log_path = log_path
        self.addresses: dict[str, str] = {}
        self.stop_problem: str | None = None
        self._listen = listen
        self._stopped = False
        self._found = threading.Event()
        self._log = open(log_path, "w", encoding="utf-8", errors="replace")
        self._log.write("$ " + " ".join(cmd) + "\n")
        self._log.flush()
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
        )
        self._reader = threading.Thread(target=self._pump_output, daemon=True)
        self._reader.start()
        if not self._found.wait(STARTUP_TIMEOUT) or len(self.addresses) < len(listen):
            self.stop()
            raise RuntimeError(
                f"{name} did not report its listening addresses within "
                f"{STARTUP_TIMEOUT}s (exit code {self.proc.poll()}):\n{self.log_text()}"
            )

    def _pump_output(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._log.write(line)
            self._log.flush()
            for kind, pattern in self._listen.items():
                match = pattern.search(line)
                if match and kind not in self.addresses:
                    self.addresses[kind] = match.group(1)
            if len(self.addresses) == len(self._listen):
                self._found.set()
        # The process closed its output (it exited): release a waiting start-up.
        self._found.set()

    @property
    def http_address(self) -> str:
        return self.addresses["http"]

    def log_text(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL if it has not exited within STOP_TIMEOUT. Returns the exit code.

        Sets ``stop_problem`` when the process did not exit cleanly (code 0) on SIGTERM. Stopping
        (or killing) it a second time does nothing and returns the first exit code.
        """
        if self._stopped:
            return self.proc.returncode
        self._stopped = True
        self.stop_problem = None
        if self.proc.poll() is not None:
            self.stop_problem = f"it had already exited (code {self.proc.returncode}) before SIGTERM"
        else:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
                if self.proc.returncode != 0:
                    self.stop_problem = f"it exited with code {self.proc.returncode} on SIGTERM"
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                self.stop_problem = f"it was still running {STOP_TIMEOUT}s after SIGTERM and was killed"
        self._reader.join(5)
        if not self._log.closed:
            self._log.close()
        return self.proc.returncode

    async def aexited(self, timeout: float) -> int | None:
        """Waits (at most ``timeout``) for the process to exit by itself, as a drained broker
        does, and reaps it; not a stop problem. Returns the exit code (``None`` if it runs on).
        """
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.proc.poll() is None:
            return None
        self._stopped = True
        self.stop_problem = None
        self._reader.join(5)
        if not self._log.closed:
            self._log.close()
        return self.proc.returncode

    def kill(self) -> int | None:
        """SIGKILL (a crash) and reap it. Returns the exit code (-9); not a stop problem."""
        if self._stopped:
            return self.proc.returncode
        self._stopped = True
        self.stop_problem = None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(STOP_TIMEOUT)
        self._reader.join(5)
        if not self._log.closed:
            self._log.close()
        return self.proc.returncode


class Broker(_Process):
    """A running knsq-broker process and the addresses it listens on."""

    def __init__(
        self,
        args: list[str],
        data_path: Path,
        log_path: Path,
        tcp_address: str = "127.0.0.1:0",
        http_address: str = "127.0.0.1:0",
    ):
        self.args = args
        self.data_path = data_path
        cmd = [
            str(BROKER_BIN),
            f"--tcp-address={tcp_address}",
            f"--http-address={http_address}",
            f"--data-path={data_path}",
            *args,
        ]
        super().__init__("knsq-broker", cmd, log_path, _LISTEN_RE)

    @property
    def tcp_address(self) -> str:
        return self.addresses["tcp"]

    async def astop(self) -> int | None:
        """``stop()`` without blocking the event loop (pynsq clients keep running meanwhile)."""
        return await asyncio.to_thread(self.stop)

    async def akill(self) -> int | None:
        return await asyncio.to_thread(self.kill)

    # --- HTTP API (blocking; call through ``await broker.ahttp(...)`` inside a test) ---

    def http(self, method: str, path: str, params: dict | None = None, body: bytes | None = None):
        url = f"http://{self.http_address}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        request = urllib.request.Request(url, data=body, method=method)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()

    async def ahttp(self, method: str, path: str, params: dict | None = None, body: bytes | None = None):
        return await asyncio.to_thread(self.http, method, path, params, body)

    async def ping(self) -> tuple[int, bytes]:
        return await self.ahttp("GET", "/ping")

    async def metrics(self) -> dict[str, float]:
        """``/metrics`` as {sample name with labels: value} (comments dropped)."""
        status, body = await self.ahttp("GET", "/metrics")
        assert status == 200, f"/metrics answered {status}: {body!r}"
        samples = {}
        for line in body.decode().splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                samples[name] = float(value)
        return samples

    async def stats(self, topic: str | None = None) -> dict:
        params = {"format": "json"}
        if topic is not None:
            params["topic"] = topic
        status, body = await self.ahttp("GET", "/stats", params)
        assert status == 200, f"/stats answered {status}: {body!r}"
        return json.loads(body)

    async def topic_stats(self, topic: str) -> dict | None:
        for entry in (await self.stats(topic)).get("topics") or []:
            if entry["topic_name"] == topic:
                return entry
        return None

    async def channel_stats(self, topic: str, channel: str) -> dict | None:
        entry = await self.topic_stats(topic)
        for chan in (entry or {}).get("channels") or []:
            if chan["channel_name"] == channel:
                return chan
        return None

    async def wait_for_channel(self, topic: str, channel: str, predicate, what: str, timeout: float = 10.0) -> dict | None:
        """Poll /stats until ``predicate(channel_stats_or_None)`` holds; returns the last stats."""
        deadline = time.monotonic() + timeout
        while True:
            chan = await self.channel_stats(topic, channel)
            if predicate(chan):
                return chan
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}; last channel stats: {chan}")
            await asyncio.sleep(0.05)

    async def wait_for_consumers(self, topic: str, channel: str, count: int) -> dict:
        """Wait until ``count`` clients are subscribed to the channel and each has RDY > 0."""

        def ready(chan):
            clients = (chan or {}).get("clients") or []
            return len(clients) == count and all(c["ready_count"] > 0 for c in clients)

        return await self.wait_for_channel(topic, channel, ready, f"{count} ready consumer(s) on {topic}/{channel}")


@pytest.fixture
def start_broker(tmp_path, request):
    """Factory: ``start_broker("--msg-timeout=2s")`` starts a broker with extra nsqd flags."""
    if not BROKER_BIN.exists():
        pytest.fail(f"broker binary {BROKER_BIN} not found: run `cargo build -p broker` or set KNSQ_BROKER_BIN")
    brokers: list[Broker] = []

    def start(
        *args: str,
        data_path: Path | None = None,
        tcp_address: str = "127.0.0.1:0",
        http_address: str = "127.0.0.1:0",
    ) -> Broker:
        """Start a broker; on a fresh data directory unless ``data_path`` is given."""
        n = len(brokers)
        if data_path is None:
            data_path = tmp_path / f"data{n}"
            data_path.mkdir()
        broker = Broker(list(args), data_path, tmp_path / f"broker{n}.log", tcp_address, http_address)
        brokers.append(broker)
        return broker

    def restart(old: Broker, *args: str, same_ports: bool = False) -> Broker:
        """Start a new broker with ``old``'s flags (or ``args``) on ``old``'s data directory.

        ``old`` must have exited (``stop()``/``kill()``). With ``same_ports`` the new broker
        listens where the old one did; otherwise on fresh ports.
        """
        assert old.proc.poll() is not None, "restart() needs the old broker to have exited"
        ports = {"tcp_address": old.tcp_address, "http_address": old.http_address} if same_ports else {}
        return start(*(args or old.args), data_path=old.data_path, **ports)

    start.restart = restart
    start.brokers = brokers
    yield start

    failed = getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed
    problems = []
    for broker in brokers:
        code = broker.stop()
        if failed or broker.stop_problem:
            print(f"----- broker log ({broker.log_path}), exit code {code} -----")
            print(broker.log_text()[-20000:])
        if broker.stop_problem:
            problems.append(broker.stop_problem)
    if problems:
        pytest.fail("knsq-broker did not stop cleanly: " + "; ".join(problems))


# --- knsq-lookupd ------------------------------------------------------------------------------

_LOOKUPD_LISTEN_RE = {
    "grpc": re.compile(r"GRPC: listening on (\S+)"),
    "http": re.compile(r"HTTP: listening on (\S+)"),
}


class Lookupd(_Process):
    """A running knsq-lookupd process: brokers register on ``grpc_address``, clients query
    ``http_address`` exactly as they query nsqlookupd."""

    def __init__(self, args: list[str], log_path: Path):
        cmd = [str(LOOKUPD_BIN), "--grpc-address=127.0.0.1:0", "--http-address=127.0.0.1:0", *args]
        super().__init__("knsq-lookupd", cmd, log_path, _LOOKUPD_LISTEN_RE)

    @property
    def grpc_address(self) -> str:
        return self.addresses["grpc"]

    def http(self, path: str, params: dict | None = None):
        url = f"http://{self.http_address}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()

    async def producers(self, topic: str) -> list[str]:
        """``tcp host:port`` of every broker ``/lookup?topic=`` lists (none for an unknown topic)."""
        status, body = await asyncio.to_thread(self.http, "/lookup", {"topic": topic})
        if status == 404:
            return []
        assert status == 200, f"/lookup answered {status}: {body!r}"
        return sorted(f"{p['broadcast_address']}:{p['tcp_port']}" for p in json.loads(body)["producers"])

    async def wait_for_producers(self, topic: str, want: list[str], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while (got := await self.producers(topic)) != sorted(want):
            if time.monotonic() > deadline:
                raise AssertionError(f"/lookup?topic={topic} lists {got} after {timeout}s, want {sorted(want)}")
            await asyncio.sleep(0.05)


@pytest.fixture
def lookupd(tmp_path, request):
    """A knsq-lookupd on loopback port 0; stopped (and its log shown on failure) at teardown."""
    if not LOOKUPD_BIN.exists():
        pytest.fail(f"lookupd binary {LOOKUPD_BIN} not found: run `cargo build -p lookupd` or set KNSQ_LOOKUPD_BIN")
    lookupd = Lookupd(["--broadcast-address=127.0.0.1"], tmp_path / "lookupd.log")
    yield lookupd
    code = lookupd.stop()
    failed = getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed
    if failed or code != 0:
        print(f"----- lookupd log ({lookupd.log_path}), exit code {code} -----")
        print(lookupd.log_text()[-20000:])


@pytest.fixture
def broker(start_broker) -> Broker:
    """A broker with nsqd's default limits."""
    return start_broker()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    # Lets the start_broker fixture know at teardown whether the test body failed.
    report = yield
    setattr(item, "rep_" + report.when, report)
    return report


def run_broker_to_exit(args: list[str], data_path: Path, timeout: float = STARTUP_TIMEOUT) -> tuple[int | None, str]:
    """Run a broker expected to exit by itself (a refused start-up): (exit code, its output).

    The exit code is None if it was still running after ``timeout`` (it is then killed).
    """
    cmd = [
        str(BROKER_BIN),
        "--tcp-address=127.0.0.1:0",
        "--http-address=127.0.0.1:0",
        f"--data-path={data_path}",
        *args,
    ]
    proc = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
        return proc.returncode, output
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
        return None, output


def broker_flags() -> str:
    """The broker's ``--help`` text (to find out which flags this build has)."""
    result = subprocess.run([str(BROKER_BIN), "--help"], capture_output=True, text=True, timeout=STARTUP_TIMEOUT)
    return result.stdout + result.stderr


def run(coro_fn, timeout: float = TEST_TIMEOUT):
    """Run ``coro_fn()`` on a fresh event loop (which pynsq's tornado IOLoop wraps), bounded."""

    async def bounded():
        return await asyncio.wait_for(coro_fn(), timeout)

    return asyncio.run(bounded())


# --- pynsq clients that report their progress as awaitable events --------------------------


class Received:
    """One delivery seen by a handler: the message, when it arrived (monotonic s), and who got it."""

    def __init__(self, message: nsq.Message, reader: object):
        self.message = message
        self.reader = reader
        self.at = time.monotonic()

    @property
    def body(self) -> bytes:
        return self.message.body

    @property
    def id(self) -> bytes:
        return self.message.id

    @property
    def attempts(self) -> int:
        return self.message.attempts


class Deliveries:
    """Collects deliveries from one or more readers and lets a test await a count of them."""

    def __init__(self):
        self.items: list[Received] = []
        self._changed = asyncio.Event()

    def add(self, item: Received) -> None:
        self.items.append(item)
        self._changed.set()

    async def wait_count(self, count: int, timeout: float = 10.0) -> list[Received]:
        deadline = time.monotonic() + timeout
        while len(self.items) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(
                    f"expected {count} deliveries within {timeout}s, got {len(self.items)}: "
                    f"{[(d.body, d.attempts) for d in self.items]}"
                )
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except asyncio.TimeoutError:
                pass
        return self.items

    def bodies(self) -> list[bytes]:
        return [d.body for d in self.items]


class Reader(nsq.Reader):
    """pynsq Reader that records connection errors (error frames included) and heartbeats."""

    def __init__(self, *args, **kwargs):
        self.errors: list = []
        self.heartbeats = 0
        self.identify_responses: list[dict] = []
        super().__init__(*args, **kwargs)

    def _on_connection_identify_response(self, conn, data, **kwargs):
        # The broker's IDENTIFY response: which features it granted this connection.
        self.identify_responses.append(data)
        return super()._on_connection_identify_response(conn, data, **kwargs)

    def heartbeat(self, conn):
        # Called for each _heartbeat_ frame, after pynsq has answered it with NOP.
        self.heartbeats += 1

    def _on_connection_error(self, conn, error, **kwargs):
        self.errors.append(error)
        super()._on_connection_error(conn, error, **kwargs)


def recording_reader(deliveries: Deliveries, **kwargs) -> Reader:
    """A Reader that FINs every message it gets, recording it in `deliveries`."""
    holder: list[Reader] = []

    def handler(message):
        deliveries.add(Received(message, holder[0]))
        return True

    reader = Reader(message_handler=handler, **kwargs)
    holder.append(reader)
    return reader


class Writer(nsq.Writer):
    """pynsq Writer with an awaitable 'connected' state and awaitable publishes."""

    def __init__(self, *args, **kwargs):
        self.connected = asyncio.Event()
        self.closed = asyncio.Event()
        self.identify_responses: list[dict] = []
        super().__init__(*args, **kwargs)

    def _on_connection_identify_response(self, conn, data, **kwargs):
        self.identify_responses.append(data)
        return super()._on_connection_identify_response(conn, data, **kwargs)

    def _on_connection_close(self, conn, **kwargs):
        super()._on_connection_close(conn, **kwargs)
        self.closed.set()

    def _on_connection_ready(self, conn, **kwargs):
        super()._on_connection_ready(conn, **kwargs)
        if conn.id in self.conns:
            self.connected.set()

    async def wait_connected(self, timeout: float = 10.0) -> "Writer":
        await asyncio.wait_for(self.connected.wait(), timeout)
        return self

    async def _publish(self, method, *args, timeout: float = 10.0):
        result = asyncio.get_running_loop().create_future()

        def callback(conn, data):
            if not result.done():
                result.set_result(data)

        getattr(self, method)(*args, callback=callback)
        return await asyncio.wait_for(result, timeout)

    async def apub(self, topic: str, body: bytes):
        return await self._publish("pub", topic, body)

    async def ampub(self, topic: str, bodies: list[bytes]):
        return await self._publish("mpub", topic, bodies)

    async def adpub(self, topic: str, delay_ms: int, body: bytes):
        return await self._publish("dpub", topic, delay_ms, body)

    def close(self) -> None:
        for conn in list(self.conns.values()):
            conn.close()


class Clients:
    """Creates pynsq readers and writers bound to one broker and closes them all at the end."""

    def __init__(self, broker: Broker):
        self.broker = broker
        self.readers: list[Reader] = []
        self.writers: list[Writer] = []

    async def writer(self, **kwargs) -> Writer:
        writer = Writer([self.broker.tcp_address], reconnect_interval=60.0, **kwargs)
        self.writers.append(writer)
        return await writer.wait_connected()

    def reader(self, topic: str, channel: str, handler, **kwargs) -> Reader:
        options = {"max_in_flight": 1, "max_backoff_duration": 2, "requeue_delay": 0}
        options.update(kwargs)
        reader = Reader(
            topic=topic,
            channel=channel,
            message_handler=handler,
            nsqd_tcp_addresses=[self.broker.tcp_address],
            **options,
        )
        self.readers.append(reader)
        return reader

    def collecting_reader(self, topic: str, channel: str, deliveries: Deliveries, **kwargs) -> Reader:
        """A reader whose handler records each delivery and finishes it."""
        holder: list[Reader] = []

        def handler(message):
            deliveries.add(Received(message, holder[0]))
            return True

        holder.append(self.reader(topic, channel, handler, **kwargs))
        return holder[0]

    def close(self) -> None:
        for reader in self.readers:
            if reader.redist_periodic is not None:
                reader.close()
            else:
                for conn in list(reader.conns.values()):
                    conn.close()
        for writer in self.writers:
            writer.close()

    def errors(self) -> list:
        return [e for r in self.readers for e in r.errors]


def run_with_clients(broker: Broker, body, timeout: float = TEST_TIMEOUT):
    """Run ``await body(clients)`` on a fresh loop, bounded, closing every pynsq client it made."""

    async def main():
        clients = Clients(broker)
        try:
            return await body(clients)
        finally:
            clients.close()
            # Let the closes reach the broker before the loop goes away.
            await asyncio.sleep(0.05)

    return run(main, timeout)


class ClientSets:
    """One ``Clients`` per broker (a test that restarts a broker talks to several); closes all."""

    def __init__(self):
        self.sets: list[Clients] = []

    def __call__(self, broker: Broker) -> Clients:
        clients = Clients(broker)
        self.sets.append(clients)
        return clients

    def close(self) -> None:
        for clients in self.sets:
            clients.close()


def run_with_client_sets(body, timeout: float = TEST_TIMEOUT):
    """Run ``await body(clients_for)`` bounded; ``clients_for(broker)`` gives that broker's Clients."""

    async def main():
        sets = ClientSets()
        try:
            return await body(sets)
        finally:
            sets.close()
            await asyncio.sleep(0.05)

    return run(main, timeout)
