"""Watch streams over HTTP: many watchers, exact delivery, reconnects, the three formats."""

from __future__ import annotations

import http.client
import json
import random
import threading
import time
import urllib.parse

from httpclient import Client


def _stream(url: str, token: str, query: str, timeout: float = 30.0):
    parsed = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=timeout)
    conn.request("GET", "/v1/watch?" + query, headers={"Authorization": f"Bearer {token}"})
    response = conn.getresponse()
    assert response.status == 200, response.read()
    return conn, response


class Watcher(threading.Thread):
    """Follows a prefix over NDJSON; optionally drops the connection once and resumes with since."""

    def __init__(self, url, token, prefix, since, reconnect_after=None):
        super().__init__(daemon=True)
        self.url, self.token, self.prefix, self.since = url, token, prefix, since
        self.reconnect_after = reconnect_after
        self.events = []
        self.reconnects = 0
        self.expected = None
        self.error = None

    def run(self):
        try:
            since = self.since
            while self.expected is None or len(self.events) < self.expected:
                conn, response = _stream(self.url, self.token,
                                         f"prefix={self.prefix}&since={since}&format=ndjson&heartbeat=0.2")
                pending = []
                while self.expected is None or len(self.events) + len(pending) < self.expected:
                    obj = json.loads(response.readline())
                    if obj.get("heartbeat"):
                        continue
                    pending.append(obj)
                    if obj.get("end"):  # a whole revision arrived: keep it, remember where to resume
                        self.events.extend(pending)
                        pending = []
                        since = obj["revision"]
                        if self.reconnect_after and not self.reconnects and len(self.events) >= self.reconnect_after:
                            break
                conn.close()
                if pending:
                    self.events.extend(pending)
                    break
                if self.reconnect_after and not self.reconnects and len(self.events) >= self.reconnect_after:
                    self.reconnects += 1
        except Exception as err:  # reported by the test
            self.error = err


def test_10000_changes_50_watchers_exact_ordered_no_gaps(master_server):
    url, token = master_server.url, master_server.token
    start = Client(url, token).head_revision()
    watchers = [Watcher(url, token, "/w", start, reconnect_after=1000 if i % 5 == 0 else None) for i in range(50)]
    for w in watchers:
        w.start()
    acks = []  # (revision, path, new kid or None)

    def writer(n, prefix, count):
        rng = random.Random(n)
        mine = Client(url, token)
        live = set()
        for i in range(count):
            if live and rng.random() < 0.1:
                path = rng.choice(sorted(live))
                status, answer = mine.json("DELETE", "/v1/keg" + path)
                live.discard(path)
            else:
                path = f"{prefix}/n{n}/k{rng.randrange(60)}"
                status, answer = mine.json("PUT", "/v1/keg" + path, f"{n}.{i}")
                live.add(path)
            assert status == 200, answer
            acks.append((answer["revision"], path, answer["kids"][path]))
        mine.close()

    writers = [threading.Thread(target=writer, args=(n, "/w" if n < 2 else "/x", 2500)) for n in range(4)]
    for t in writers:
        t.start()
    for t in writers:
        t.join()
    assert len(acks) == 10_000
    expected = sorted((r, p, k) for r, p, k in acks if p.startswith("/w/"))
    for w in watchers:
        w.expected = len(expected)
    deadline = time.monotonic() + 120
    for w in watchers:
        w.join(max(0.0, deadline - time.monotonic()))
    for i, w in enumerate(watchers):
        assert w.error is None, (i, w.error)
        got = [(e["revision"], e["path"], e["new_kid"]) for e in w.events]
        assert got == expected, f"watcher {i} differs"
        if i % 5 == 0:
            assert w.reconnects == 1
    # Old KIDs chain: each event's old KID is the previous new KID of that path.
    last = {}
    for e in watchers[0].events:
        assert e["old_kid"] == last.get(e["path"]), e
        last[e["path"]] = e["new_kid"]


def test_sse_format_ids_and_last_event_id(master_server):
    c = Client(master_server.url, master_server.token)
    since = c.head_revision()
    c.json("POST", "/v1/tx", json.dumps({"ops": [{"op": "put", "path": "/s/a", "value": "1"},
                                                  {"op": "put", "path": "/s/b", "value": "2"}]}))
    c.json("PUT", "/v1/keg/s/a", "3")
    parsed = urllib.parse.urlsplit(master_server.url)
    conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=10)
    conn.request("GET", f"/v1/watch?prefix=/s&since={since}", headers={
        "Authorization": f"Bearer {master_server.token}", "Accept": "text/event-stream"})
    response = conn.getresponse()
    assert response.getheader("Content-Type") == "text/event-stream"
    lines = []
    while len([x for x in lines if x.startswith("data:")]) < 3:
        lines.append(response.readline().decode().rstrip("\n"))
    conn.close()
    ids = [x for x in lines if x.startswith("id:")]
    assert ids == [f"id: {since + 1}", f"id: {since + 2}"]  # one id per revision, on its last event
    data = [json.loads(x[5:]) for x in lines if x.startswith("data:")]
    assert [(d["path"], d["action"]) for d in data] == [("/s/a", "create"), ("/s/b", "create"), ("/s/a", "update")]
    # A browser reconnecting sends Last-Event-ID: the stream resumes after it.
    conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=10)
    conn.request("GET", "/v1/watch?prefix=/s&format=sse", headers={
        "Authorization": f"Bearer {master_server.token}", "Last-Event-ID": str(since + 1)})
    response = conn.getresponse()
    line = ""
    while not line.startswith("data:"):
        line = response.readline().decode()
    assert json.loads(line[5:])["revision"] == since + 2
    conn.close()


def test_long_poll_waits_for_a_change_and_times_out_empty(master_server):
    c = Client(master_server.url, master_server.token)
    since = c.head_revision()
    started = time.monotonic()
    status, answer = c.json("GET", f"/v1/watch?prefix=/lp&since={since}&format=poll&wait=0.3")
    assert status == 200 and answer == {"revision": since, "events": []}
    assert time.monotonic() - started >= 0.25

    def later():
        time.sleep(0.3)
        Client(master_server.url, master_server.token).json("PUT", "/v1/keg/lp/x", "1")

    threading.Thread(target=later).start()
    status, answer = c.json("GET", f"/v1/watch?prefix=/lp&since={since}&format=poll&wait=20")
    assert status == 200 and [e["path"] for e in answer["events"]] == ["/lp/x"]
    assert answer["revision"] == since + 1


def test_heartbeats_and_a_dead_watcher_is_dropped(master_server):
    c = Client(master_server.url, master_server.token)
    conn, response = _stream(master_server.url, master_server.token, "prefix=/hb&format=ndjson&heartbeat=0.1")
    beats = [json.loads(response.readline()) for _ in range(3)]
    assert all(b["heartbeat"] for b in beats)
    conn.close()
    # Hundreds of watchers that vanish do not slow writers down or pile up.
    streams = [_stream(master_server.url, master_server.token, "prefix=/hb&heartbeat=0.1") for _ in range(200)]
    for conn, _ in streams:
        conn.close()
    started = time.monotonic()
    for i in range(20):
        assert c.json("PUT", f"/v1/keg/hb/{i}", "x")[0] == 200
    assert time.monotonic() - started < 5


def test_watch_rejects_bad_arguments(master_server):
    c = Client(master_server.url, master_server.token)
    head = c.head_revision()
    assert c.json("GET", f"/v1/watch?since={head + 5}")[0] == 400
    assert c.json("GET", "/v1/watch?format=xml")[0] == 400
    assert c.json("GET", "/v1/watch?prefix=relative")[0] == 400


def _next_lines(response, count: int) -> list:
    return [json.loads(response.readline()) for _ in range(count)]


def test_a_stream_gets_its_prefix_only_and_heartbeats_mark_unrelated_revisions(master_server):
    c = Client(master_server.url, master_server.token)

    def tx(*ops):
        status, answer = c.json("POST", "/v1/tx", json.dumps({"ops": list(ops)}))
        assert status == 200, answer
        return answer["revision"]

    since = c.head_revision()
    query = "format=ndjson&heartbeat=0.3&since=" + str(since)
    _, exact = _stream(master_server.url, master_server.token, "prefix=/p/a&" + query)
    _, parent = _stream(master_server.url, master_server.token, "prefix=/p&" + query)
    _, root = _stream(master_server.url, master_server.token, "prefix=/&" + query)
    # /p/ab shares the characters of /p/a but is not under it; /q is elsewhere.
    r1 = tx({"op": "put", "path": "/p/ab/x", "value": "1"}, {"op": "put", "path": "/q/y", "value": "1"})
    r2 = tx({"op": "put", "path": "/p/a/z", "value": "2"}, {"op": "put", "path": "/q/y", "value": "2"})
    r3 = tx({"op": "delete", "path": "/p/a/z"})
    unrelated = [tx({"op": "put", "path": f"/q/n{i}", "value": str(i)}) for i in range(20)]

    def changes(lines):
        return [(e["revision"], e["path"], e["action"]) for e in lines]

    assert changes(_next_lines(exact, 2)) == [(r2, "/p/a/z", "create"), (r3, "/p/a/z", "delete")]
    assert changes(_next_lines(parent, 3)) == [(r1, "/p/ab/x", "create"), (r2, "/p/a/z", "create"),
                                               (r3, "/p/a/z", "delete")]
    assert changes(_next_lines(root, 5 + 20))[:5] == [(r1, "/p/ab/x", "create"), (r1, "/q/y", "create"),
                                                      (r2, "/p/a/z", "create"), (r2, "/q/y", "update"),
                                                      (r3, "/p/a/z", "delete")]
    # Nothing under /p/a changed in the last 20 revisions: the stream says so with a heartbeat that
    # marks the newest revision, from which a client may resume without missing anything.
    beat = json.loads(exact.readline())
    assert beat == {"heartbeat": True, "revision": unrelated[-1]}
    # A stream resuming from before all this gets the same events, then a new one as it happens.
    _, resumed = _stream(master_server.url, master_server.token, "prefix=/p/a&" + query)
    assert changes(_next_lines(resumed, 2)) == [(r2, "/p/a/z", "create"), (r3, "/p/a/z", "delete")]
    r4 = tx({"op": "put", "path": "/p/a/w", "value": "4"})
    assert changes(_next_lines(resumed, 1)) == [(r4, "/p/a/w", "create")]
    assert changes(_next_lines(exact, 1)) == [(r4, "/p/a/w", "create")]
