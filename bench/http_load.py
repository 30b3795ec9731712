"""One HTTP/1.1 load client for both servers: Keg's master and etcd's v3 JSON gateway.

Everything here runs on one single-threaded asyncio loop over raw keep-alive
sockets (DESIGN: processes, not threads).  Concurrency comes from many
connections on one loop, and more client processes (``fork``, one loop each)
when asked.  The two servers differ only in the request bytes and in how a
watch stream's lines are read, which ``KegApi`` and ``EtcdApi`` supply; the
connection, the parser, the timing and the load loops are the same code.

``HttpConnection``  one keep-alive connection: a request at a time, or one
                    streaming answer read line by line (a watch).
``KegApi``          ``PUT /v1/keg/<path>`` with a Bearer token; ``GET /v1/watch`` (NDJSON).
``EtcdApi``         ``POST /v3/kv/put``; ``POST /v3/watch`` (keys and values base64).
``sequential_puts``, ``concurrent_puts``, ``watch_latency``: the workloads.
"""

from __future__ import annotations

import asyncio
import base64
import json
import multiprocessing
import resource
import socket
import time

from etcd_anchor import prefix_end

CONNECT_BATCH = 100        # watch connections opened at once
READY_TIMEOUT = 60.0       # every watcher must be established within this
EVENT_TIMEOUT = 30.0       # every watcher must see a write within this


class LoadError(Exception):
    """A server answered a benchmark request with an error, or a stream broke."""


# ------------------------------------------------------------------- parsing

class HttpConnection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection to 127.0.0.1.

    ``request`` sends a whole request and returns a future of ``(status, body)``.
    ``stream`` sends one request whose answer never ends and calls
    ``on_line(line, received)`` for each line of its body, ``received`` being
    the ``perf_counter`` when the bytes holding it came off the socket.
    """

    def __init__(self):
        self.transport = None
        self.buf = bytearray()
        self.waiter = None
        self.on_line = None
        self.on_headers = None
        self.lost = None
        self._reset()

    def _reset(self):
        self.status = None
        self.chunked = False
        self.remaining = 0       # bytes of the body (or of the current chunk) still to come
        self.state = "head"      # head | body | size | chunk | crlf | trailer
        self.body = bytearray()
        self.partial = b""       # an unfinished line of a streamed body

    # ------------------------------------------------------------ asyncio

    def connection_made(self, transport):
        self.transport = transport
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc):
        self.lost = exc or LoadError("the server closed the connection")
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(self.lost)

    def data_received(self, data):
        received = time.perf_counter()
        self.buf += data
        try:
            self._parse(received)
        except LoadError as err:
            if self.waiter is not None and not self.waiter.done():
                self.waiter.set_exception(err)
            self.transport.close()

    # ------------------------------------------------------------ requests

    def request(self, data: bytes) -> asyncio.Future:
        """Send one request; the future gets ``(status, body bytes)``."""
        if self.lost is not None:
            raise LoadError(f"connection lost: {self.lost}")
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return self.waiter

    def stream(self, data: bytes, on_line, on_headers=None) -> None:
        """Send one request whose body is read as lines as it arrives."""
        self.on_line, self.on_headers = on_line, on_headers
        self.transport.write(data)

    def close(self) -> None:
        """Close the socket."""
        if self.transport is not None:
            self.transport.close()

    # ------------------------------------------------------------ parser

    def _parse(self, received: float) -> None:
        while True:
            if self.state == "head":
                end = self.buf.find(b"\r\n\r\n")
                if end < 0:
                    return
                self._head(bytes(self.buf[:end]))
                del self.buf[:end + 4]
                if self.on_headers is not None:
                    self.on_headers(self.status, received)
                if self.state == "done":
                    self._finish()
                continue
            if self.state in ("body", "chunk"):
                if not self.buf:
                    return
                take = self.buf[:self.remaining]
                del self.buf[:len(take)]
                self.remaining -= len(take)
                self._body_bytes(bytes(take), received)
                if self.remaining:
                    return
                if self.state == "body":
                    self._finish()
                else:
                    self.state = "crlf"
                continue
            end = self.buf.find(b"\r\n")
            if end < 0:
                return
            line = bytes(self.buf[:end])
            del self.buf[:end + 2]
            if self.state == "crlf":
                self.state = "size"
            elif self.state == "size":
                try:
                    self.remaining = int(line.split(b";")[0], 16)
                except ValueError as err:
                    raise LoadError(f"malformed chunk size {line[:40]!r}") from err
                self.state = "chunk" if self.remaining else "trailer"
            elif self.state == "trailer" and not line:
                self._finish()

    def _head(self, head: bytes) -> None:
        lines = head.decode("latin-1").split("\r\n")
        try:
            self.status = int(lines[0].split(" ", 2)[1])
        except (IndexError, ValueError) as err:
            raise LoadError(f"malformed status line {lines[0][:80]!r}") from err
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "transfer-encoding" and "chunked" in value.lower():
                self.chunked = True
        if self.chunked:
            self.state = "size"
        elif length:
            self.state, self.remaining = "body", length
        else:
            self.state = "done"

    def _body_bytes(self, data: bytes, received: float) -> None:
        if self.on_line is None:
            self.body += data
            return
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()
        for line in lines:
            if line.strip():
                self.on_line(line, received)

    def _finish(self) -> None:
        status, body = self.status, bytes(self.body)
        self._reset()
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result((status, body))


async def connect(port: int) -> HttpConnection:
    """A new connection to ``127.0.0.1:port``."""
    _, conn = await asyncio.get_running_loop().create_connection(HttpConnection, "127.0.0.1", port)
    return conn


# ---------------------------------------------------------------- dialects

class KegApi:
    """Keg's master: ``PUT /v1/keg/<path>``, and an NDJSON watch stream.

    Args:
        port: the master's port on 127.0.0.1.
        token: a token with write rights (the admin's).
    """

    name = "keg"
    ready_on_headers = True   # the watch is registered before its answer's headers go out

    def __init__(self, port: int, token: str):
        self.port = port
        self.token = token
        self._auth = f"Authorization: Bearer {token}\r\n"

    def put(self, key: str, value: bytes) -> bytes:
        """The request bytes of one durable put of ``value`` at path ``key``."""
        return (f"PUT /v1/keg{key} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n{self._auth}"
                f"Content-Length: {len(value)}\r\n\r\n").encode() + value

    def watch(self, prefix: str) -> bytes:
        """The request bytes of a watch of everything under ``prefix``, from now on."""
        return (f"GET /v1/watch?prefix={prefix}&format=ndjson&heartbeat=60 HTTP/1.1\r\n"
                f"Host: 127.0.0.1:{self.port}\r\n{self._auth}\r\n").encode()

    @staticmethod
    def watch_ready(line: bytes) -> bool:
        """Never: the answer's headers already say the watch is registered."""
        return False

    @staticmethod
    def event_keys(line: bytes) -> list:
        """The paths of the events in one NDJSON line (none for a heartbeat)."""
        obj = json.loads(line)
        return [] if obj.get("heartbeat") else [obj["path"]]


class EtcdApi:
    """etcd 3.4's v3 JSON gateway: ``POST /v3/kv/put`` and ``POST /v3/watch``, base64 keys.

    Args:
        port: etcd's client port on 127.0.0.1.
    """

    name = "etcd"
    ready_on_headers = False  # the gateway answers headers first; the watch exists at "created"

    def __init__(self, port: int):
        self.port = port

    def _post(self, path: str, obj: dict) -> bytes:
        body = json.dumps(obj).encode()
        return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode() + body

    def put(self, key: str, value: bytes) -> bytes:
        """The request bytes of one durable put."""
        return self._post("/v3/kv/put", {"key": base64.b64encode(key.encode()).decode(),
                                         "value": base64.b64encode(value).decode()})

    def watch(self, prefix: str) -> bytes:
        """The request bytes of a watch of every key under the directory ``prefix``."""
        key = (prefix.rstrip("/") + "/").encode()
        return self._post("/v3/watch", {"create_request": {"key": base64.b64encode(key).decode(),
                                                           "range_end": base64.b64encode(prefix_end(key)).decode()}})

    @staticmethod
    def watch_ready(line: bytes) -> bool:
        """True for the gateway's ``"created": true`` answer."""
        return bool(json.loads(line).get("result", {}).get("created"))

    @staticmethod
    def event_keys(line: bytes) -> list:
        """The keys of the events in one streamed watch answer."""
        result = json.loads(line).get("result")
        if result is None:
            raise LoadError(f"etcd watch stream: {line[:300]!r}")
        return [base64.b64decode(e["kv"]["key"]).decode() for e in result.get("events", ())]


def check_put(api, status: int, body: bytes) -> None:
    """Raise unless a put was acknowledged."""
    if status != 200:
        raise LoadError(f"{api.name} put answered {status}: {body[:300]!r}")


# ------------------------------------------------------------------- loads

def raise_open_files(needed: int) -> None:
    """Raise this process's soft limit of open files to ``needed`` (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        top = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (top, hard))


async def _put_loop(api, conn: HttpConnection, work: list, values, latencies: list) -> None:
    """Sequential puts on one connection; ``work`` is shared, each put takes the next item."""
    while work:
        i, key = work.pop()
        data = api.put(key, values(i))
        start = time.perf_counter()
        status, body = await conn.request(data)
        latencies.append(time.perf_counter() - start)
        check_put(api, status, body)


async def _run_puts(api, connections: int, work: list, values, wait_for_start=None) -> dict:
    conns = [await connect(api.port) for _ in range(connections)]
    try:
        if wait_for_start is not None:
            await wait_for_start()
        todo = list(reversed(work))  # pop() takes them in order
        latencies: list = []
        cpu = time.process_time()
        start = time.perf_counter()
        await asyncio.gather(*(_put_loop(api, c, todo, values, latencies) for c in conns))
        end = time.perf_counter()
        return {"start": start, "end": end, "latencies": latencies, "cpu": time.process_time() - cpu}
    finally:
        for c in conns:
            c.close()


def sequential_puts(api, work: list, values) -> dict:
    """One connection, one put at a time, in this process.

    Args:
        api: ``KegApi`` or ``EtcdApi``.
        work: ``(i, key)`` pairs; put ``i`` writes ``values(i)`` at ``key``.
        values: ``values(i) -> bytes``.

    Returns:
        ``rate`` (puts/s), ``seconds``, per-put ``latencies`` (s), client ``cpu`` (s).
    """
    return concurrent_puts(api, work, values, connections=1, processes=1)


def _put_process(api, connections: int, work: list, values, pipe) -> None:
    """A client process: connect, say so, start at the time the parent sends, send the result back."""
    async def wait_for_start():
        pipe.send("connected")
        start_at = pipe.recv()  # blocks this process's loop, which has nothing else to do yet
        await asyncio.sleep(max(0.0, start_at - time.perf_counter()))

    try:
        pipe.send(asyncio.run(_run_puts(api, connections, work, values, wait_for_start)))
    except Exception as err:  # the parent raises it; a silent child would hang the benchmark
        pipe.send(LoadError(f"client process failed: {err!r}"))
    finally:
        pipe.close()


def concurrent_puts(api, work: list, values, connections: int, processes: int = 1) -> dict:
    """``connections`` keep-alive clients, each doing one put at a time, until ``work`` is done.

    With ``processes`` > 1, that many forked client processes share the
    connections and the work evenly, each on its own event loop, and start
    together; ``perf_counter`` is the system's monotonic clock, so their times
    compare.

    Returns:
        As ``sequential_puts``; ``rate`` is all puts over first start to last end.
    """
    if processes <= 1:
        results = [asyncio.run(_run_puts(api, connections, work, values))]
    else:
        results = _forked_puts(api, work, values, connections, processes)
    start = min(r["start"] for r in results)
    seconds = max(r["end"] for r in results) - start
    return {"rate": len(work) / seconds, "seconds": seconds,
            "latencies": [x for r in results for x in r["latencies"]], "cpu": sum(r["cpu"] for r in results)}


def _forked_puts(api, work: list, values, connections: int, processes: int) -> list:
    ctx = multiprocessing.get_context("fork")
    children, pipes = [], []
    try:
        for p in range(processes):
            share = connections // processes + (1 if p < connections % processes else 0)
            mine, theirs = ctx.Pipe()
            child = ctx.Process(target=_put_process, args=(api, share, work[p::processes], values, theirs),
                                daemon=True)
            child.start()
            theirs.close()
            children.append(child)
            pipes.append(mine)
        for pipe in pipes:
            _expect(pipe.recv(), str)
        start_at = time.perf_counter() + 0.05
        for pipe in pipes:
            pipe.send(start_at)
        return [_expect(pipe.recv(), dict) for pipe in pipes]
    finally:
        for child in children:
            child.join(5)
            if child.is_alive():
                child.kill()
                child.join()


def _expect(message, kind):
    if isinstance(message, Exception):
        raise message
    if not isinstance(message, kind):
        raise LoadError(f"unexpected message from a client process: {message!r}")
    return message


# ------------------------------------------------------------------- watch

class _Watcher:
    """One watch stream; it reports each event's arrival to the shared ``_WatchRun``."""

    def __init__(self, run: "_WatchRun"):
        self.run = run
        self.ready = False
        self.conn = None

    def on_headers(self, status: int, received: float) -> None:
        if status != 200:
            self.run.fail(LoadError(f"{self.run.api.name} watch answered {status}"))
        elif self.run.api.ready_on_headers:
            self._set_ready()

    def on_line(self, line: bytes, received: float) -> None:
        api = self.run.api
        try:
            if not self.ready and api.watch_ready(line):
                self._set_ready()
                return
            keys = api.event_keys(line)
        except (LoadError, ValueError, KeyError) as err:  # fail the run now, not at its timeout
            self.run.fail(LoadError(f"{api.name} watch stream sent {line[:200]!r}: {err!r}"))
            return
        for key in keys:
            self.run.arrived(key, received)

    def _set_ready(self) -> None:
        if not self.ready:
            self.ready = True
            self.run.ready += 1
            if self.run.ready == self.run.watchers and not self.run.all_ready.done():
                self.run.all_ready.set_result(None)


class _WatchRun:
    """What the writer and every watcher of one ``watch_latency`` run share."""

    def __init__(self, api, watchers: int):
        loop = asyncio.get_running_loop()
        self.api = api
        self.watchers = watchers
        self.ready = 0
        self.all_ready = loop.create_future()
        self.sent: dict = {}        # key -> perf_counter just before its put was written
        self.arrivals: dict = {}    # key -> arrival times, one per watcher
        self.all_seen: dict = {}    # key -> future, done when every watcher has it

    def fail(self, err: Exception) -> None:
        for fut in [self.all_ready, *self.all_seen.values()]:
            if not fut.done():
                fut.set_exception(err)

    def arrived(self, key: str, received: float) -> None:
        times = self.arrivals.get(key)
        if times is None:
            self.fail(LoadError(f"{self.api.name} watch delivered {key!r}, which was not written"))
            return
        times.append(received)
        if len(times) == self.watchers and not self.all_seen[key].done():
            self.all_seen[key].set_result(None)


async def _open_watchers(run: _WatchRun, prefix: str) -> list:
    loop = asyncio.get_running_loop()
    request = run.api.watch(prefix)
    watchers = []
    for start in range(0, run.watchers, CONNECT_BATCH):
        batch = [_Watcher(run) for _ in range(start, min(start + CONNECT_BATCH, run.watchers))]
        conns = await asyncio.gather(*(loop.create_connection(HttpConnection, "127.0.0.1", run.api.port)
                                       for _ in batch))
        for watcher, (_, conn) in zip(batch, conns):
            watcher.conn = conn
            conn.stream(request, watcher.on_line, watcher.on_headers)
        watchers += batch
    await asyncio.wait_for(run.all_ready, READY_TIMEOUT)
    return watchers


async def _watch_latency(api, watchers: int, keys: list, warmup: int, values, prefix: str, gap: float):
    run = _WatchRun(api, watchers)
    opened = []
    writer = None
    try:
        opened = await _open_watchers(run, prefix)
        writer = await connect(api.port)
        loop = asyncio.get_running_loop()
        cpu = time.process_time()
        puts = []
        for i in keys:
            key = f"{prefix}/w{i}"
            data = api.put(key, values(i))
            run.arrivals[key] = []
            run.all_seen[key] = loop.create_future()
            run.sent[key] = start = time.perf_counter()
            status, body = await writer.request(data)
            puts.append(time.perf_counter() - start)
            check_put(api, status, body)
            await asyncio.wait_for(run.all_seen[key], EVENT_TIMEOUT)
            await asyncio.sleep(gap)
        cpu = time.process_time() - cpu
    finally:
        for w in opened:
            w.conn.close()
        if writer is not None:
            writer.close()
    timed = [f"{prefix}/w{i}" for i in keys[warmup:]]
    return {"latencies": [t - run.sent[k] for k in timed for t in run.arrivals[k]],
            "last": [max(run.arrivals[k]) - run.sent[k] for k in timed],
            "puts": puts[warmup:], "cpu": cpu}


def watch_latency(api, watchers: int, writes: int, values, first: int = 0, prefix: str = "/watch",
                  warmup: int = 5, gap: float = 0.005) -> dict:
    """Write → event latency: ``watchers`` streams on ``prefix``, then ``writes`` puts one at a time.

    Put ``i`` (from ``first``) creates ``{prefix}/w{i}``, so give every run
    on one server its own ``first``: rewriting a path with the same bytes is
    no change to Keg, and no event.

    Each put's clock starts just before its request is written to the socket
    and stops, per watcher, when the bytes holding the event come off that
    watcher's socket.  The next put waits until every watcher has the event,
    then ``gap`` seconds more.  The first ``warmup`` puts are not counted.

    Returns:
        ``latencies`` (one per watcher and put, s), ``last`` (per put, the
        slowest watcher), ``puts`` (put round trips), client ``cpu`` (s).
    """
    raise_open_files(watchers + 256)
    keys = list(range(first, first + warmup + writes))
    return asyncio.run(_watch_latency(api, watchers, keys, warmup, values, prefix, gap))
