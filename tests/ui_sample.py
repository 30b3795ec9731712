"""A small cluster's worth of namespace for the UI tests: machines, processes, an app, a job, a service, docs."""

from __future__ import annotations

import http.client
import json
import re
import time
import urllib.parse

from httpclient import Client

IMAGE_1 = "K-" + "1a" * 20
IMAGE_2 = "K-" + "2b" * 20
SOURCE_1 = "K-" + "3c" * 20
SOURCE_2 = "K-" + "4d" * 20
SOURCE_3 = "K-" + "7a" * 20      # web's build that is running
SOURCE_4 = "K-" + "8b" * 20      # api's build that failed
RUNNING_LOG = "-----> Building web K-7a7a7a7a7a7a on builder b1\n-----> Python app detected\n"
DOCS = """# Keg help

Keg keeps **everything** in one namespace. See [the web app](/apps/web/app.json)
and [the API](https://example.org/api).

- machines register under `/machines`
- apps under `/apps`
  - each with an `app.json`

```sh
keg ls /machines
```

<script>alert("not run")</script> and [a trap](javascript:alert(1)).
"""


def _put(path: str, value) -> dict:
    text = value if isinstance(value, str) else json.dumps(value, indent=2) + "\n"
    return {"op": "put", "path": path, "value": text}


def sample_ops(now: float | None = None) -> list:
    """The puts of the sample cluster."""
    now = time.time() if now is None else now
    ops = [
        _put("/machines/m1/machine.json", {"name": "m1", "kid": "K-" + "5e" * 20,
                                           "capacity": {"cpus": 2, "memory": 4 << 30}, "labels": {"zone": "a"}}),
        _put("/machines/m1/status/mayor.json", {"version": "0.1.0", "heartbeat": now, "processes": 2,
                                                "in_use": {"cpu": 0.5, "memory": 256 << 20, "processes": 1}}),
        _put("/machines/m1/procs/web.json", {"image": IMAGE_2, "args": ["python3", "-m", "http.server"],
                                             "restart": "always", "resources": {"cpu": 0.5, "memory": 256 << 20}}),
        _put("/machines/m1/procs/worker.json", {"image": IMAGE_1, "args": ["worker"], "restart": "on-failure"}),
        _put("/machines/m1/status/web.json", {"name": "web", "state": "running", "restarts": 1, "health": "healthy",
                                              "image": IMAGE_2, "pid": 4242, "started": now - 3600,
                                              "kid": "K-" + "6f" * 20, "spec_kid": None, "exit_code": None,
                                              "last_error": None}),
        _put("/machines/m1/status/worker.json", {"name": "worker", "state": "failed", "restarts": 7,
                                                 "health": None, "image": IMAGE_1, "pid": None,
                                                 "last_error": "exit status 3 <stderr>", "exit_code": 3}),
        _put("/machines/m1/status/logs/web.log", "Serving HTTP on 0.0.0.0 port 8000\nGET / 200\n"),
        _put("/machines/m2/machine.json", {"name": "m2", "capacity": {"cpus": 4, "memory": 8 << 30}}),
        _put("/machines/m2/status/mayor.json", {"version": "0.1.0", "heartbeat": now - 600,
                                                "in_use": {"cpu": 0, "memory": 0, "processes": 0}}),
        _put("/apps/web/app.json", {"releases": [
            {"number": 1, "image": IMAGE_1, "source": SOURCE_1, "created": now - 7200, "by": "admin"},
            {"number": 2, "image": IMAGE_2, "source": SOURCE_2, "created": now - 60, "by": "admin"}],
            "current": 2}),
        _put("/jobs/batch.json", {"image": IMAGE_1, "replicas": 3, "resources": {"cpu": 1}}),
        _put("/services/web.tsv", "name\tmachine\tport\nweb\tm1\t8000\nweb\tm2\t8001\napi\tm1\t9000\n"),
        _put("/docs/index.md", DOCS),
    ]
    return ops + build_ops(now)


def build_ops(now: float) -> list:
    """Builds as a builder writes them (builders/builder.py): two done, one running, one failed."""
    ops = []
    for source, release, started, image in ((SOURCE_1, 1, now - 7300, IMAGE_1), (SOURCE_2, 2, now - 120, IMAGE_2)):
        base = f"/builds/web/{source}"
        ops += [_put(f"{base}/builder.json", {"builder": "b1", "started": started}),
                _put(f"{base}/log.txt", f"-----> Building web {source[:14]} on builder b1\n"
                                        f"-----> Released v{release}\n"),
                _put(f"{base}/result.json", {"ok": True, "app": "web", "source": source, "builder": "b1",
                                             "image": image, "release": release, "seconds": 42.5, "kind": "python",
                                             "cached": False})]
    ops += [_put(f"/builds/web/{SOURCE_3}/builder.json", {"builder": "b1", "started": now - 15}),
            _put(f"/builds/web/{SOURCE_3}/log.txt", RUNNING_LOG),
            _put(f"/builds/api/{SOURCE_4}/builder.json", {"builder": "b2", "started": now - 3600}),
            _put(f"/builds/api/{SOURCE_4}/log.txt", "-----> Building api\n !     pip: no flask==99 <b>here</b>\n"),
            _put(f"/builds/api/{SOURCE_4}/result.json", {"ok": False, "app": "api", "source": SOURCE_4,
                                                         "error": "pip: no flask==99 <b>here</b>", "seconds": 3.25}),
            _put("/builds/_cache/0123456789abcdef.json", {"image": IMAGE_1, "source": SOURCE_1}),
            {"op": "link", "path": "/src/web", "kid": SOURCE_3}]   # the source last pushed: the running build
    return ops


def populate(url: str, token: str) -> int:
    """Write the sample cluster in one transaction; returns its revision."""
    c = Client(url, token)
    status, answer = c.json("POST", "/v1/tx", json.dumps({"ops": sample_ops()}))
    c.close()
    assert status == 200, answer
    return answer["revision"]


class Browser:
    """An HTTP client that keeps cookies, as a browser without JavaScript would."""

    def __init__(self, url: str):
        parsed = urllib.parse.urlsplit(url)
        self.host, self.port = parsed.hostname, parsed.port
        self.cookies: dict = {}

    def call(self, method: str, target: str, form: dict | None = None, headers=None):
        """``(status, headers, text)``; cookies set by the answer are kept."""
        sent = dict(headers or {})
        if self.cookies:
            sent["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        body = None
        if form is not None:
            body = urllib.parse.urlencode(form).encode()
            sent["Content-Type"] = "application/x-www-form-urlencoded"
        conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
        try:
            conn.request(method, target, body=body, headers=sent)
            response = conn.getresponse()
            data = response.read()
            for cookie in response.headers.get_all("Set-Cookie") or []:
                name, _, rest = cookie.partition("=")
                if "Max-Age=0" in cookie:
                    self.cookies.pop(name, None)
                else:
                    self.cookies[name] = rest.split(";", 1)[0]
            got = {k.lower(): v for k, v in response.getheaders()}
            got["set-cookie-all"] = response.headers.get_all("Set-Cookie") or []
            return response.status, got, data.decode("utf-8", "replace")
        finally:
            conn.close()

    def get(self, target: str):
        """GET a page."""
        return self.call("GET", target)

    def login(self, token: str) -> None:
        """Log in through the form, as a person would."""
        status, _, page = self.get("/-/login")
        assert status == 200
        csrf = field(page, "csrf")
        status, headers, _ = self.call("POST", "/-/login", {"csrf": csrf, "token": token, "next": "/ui/"})
        assert status == 303 and headers["location"] == "/ui/", (status, headers)
        assert "keg_session" in self.cookies


def field(page: str, name: str) -> str:
    """The value of the first hidden field ``name`` in a page."""
    match = re.search(r'<input type="hidden" name="%s" value="([^"]*)"' % re.escape(name), page)
    assert match, f"no field {name} in the page"
    return match.group(1)
