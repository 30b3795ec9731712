"""Security of the master over HTTP: tokens, the ACL, machine tokens, bad paths, big bodies."""

from __future__ import annotations

import base64
import json
import socket

import pytest

from httpclient import Client
from master import auth


@pytest.fixture
def people(master_server):
    """A reader, a writer of /apps, two machines; returns their tokens by name."""
    admin = Client(master_server.url, master_server.token)
    tokens = {}
    from master.client import RemoteKeg
    with RemoteKeg(master_server.url, master_server.token) as remote:
        tokens["reader"] = auth.add_user(remote, "reader", groups=("readers",))
        tokens["dev"] = auth.add_user(remote, "dev", groups=("devs",))
        tokens["nobody"] = auth.add_user(remote, "nobody")
        tokens["m1"] = auth.add_user(remote, "m1", machine=True)
        tokens["m2"] = auth.add_user(remote, "m2", machine=True)
    acl = admin.call("GET", "/v1/keg/policy/acl.tsv")[2].decode()
    acl += "group:readers\t/\tr\ngroup:devs\t/apps\trw\n"
    assert admin.call("PUT", "/v1/keg/policy/acl.tsv", acl)[0] == 200
    assert admin.call("PUT", "/v1/keg/apps/web/app.json", "{}")[0] == 200
    return tokens


def _unchanged(master_server, head):
    assert Client(master_server.url, master_server.token).head_revision() == head


def test_missing_or_wrong_token_is_401_and_writes_nothing(master_server, people):
    c = Client(master_server.url, None)
    head = Client(master_server.url, master_server.token).head_revision()
    status, headers, body = c.call("PUT", "/v1/keg/apps/x", "1", token=None)
    assert status == 401 and "www-authenticate" in headers and json.loads(body)["error_type"] == "Unauthenticated"
    for bad in ("kt_0000000000000000_" + "A" * 43, "garbage", people["dev"][:-2] + "xx"):
        assert c.call("PUT", "/v1/keg/apps/x", "1", token=bad)[0] == 401
        assert c.call("GET", "/v1/keg/apps", token=bad)[0] == 401
    assert c.call("GET", "/v1/keg/apps", headers={"Authorization": "Digest abc"}, token=None)[0] == 401
    # Basic with the token as password works, as git and curl send it.
    basic = base64.b64encode(f"dev:{people['dev']}".encode()).decode()
    assert c.call("GET", "/v1/keg/apps", headers={"Authorization": f"Basic {basic}"}, token=None)[0] == 200
    assert c.call("GET", "/v1/watch?format=poll&wait=0", token=None)[0] == 401
    assert c.call("GET", "/git/keg.git/info/refs?service=git-upload-pack", token=None)[0] == 401
    _unchanged(master_server, head)


def test_rights_come_from_the_acl_403_otherwise(master_server, people):
    head = Client(master_server.url, master_server.token).head_revision()
    reader = Client(master_server.url, people["reader"])
    assert reader.call("GET", "/v1/keg/apps/web/app.json")[0] == 200
    status, err = reader.json("PUT", "/v1/keg/apps/web/app.json", "{}")
    assert status == 403 and "may not write /apps/web/app.json" in err["error"]
    nobody = Client(master_server.url, people["nobody"])
    assert nobody.call("GET", "/v1/keg/apps")[0] == 403
    assert nobody.call("GET", "/v1/watch?prefix=/apps&format=poll&wait=0")[0] == 403
    assert nobody.call("GET", "/git/keg.git/info/refs?service=git-upload-pack")[0] == 403
    dev = Client(master_server.url, people["dev"])
    assert dev.call("GET", "/v1/keg/users")[0] == 403
    # A transaction is checked whole: one op outside the grant refuses all of it.
    status, _ = dev.json("POST", "/v1/tx", json.dumps({"ops": [
        {"op": "put", "path": "/apps/web/x", "value": "1"}, {"op": "put", "path": "/policy/acl.tsv", "value": ""}]}))
    assert status == 403
    status, _ = dev.json("POST", "/v1/compact")
    assert status == 403
    _unchanged(master_server, head)
    assert dev.call("PUT", "/v1/keg/apps/web/x", "1")[0] == 200


def test_a_machine_token_writes_only_its_own_status_and_registration(master_server, people):
    head = Client(master_server.url, master_server.token).head_revision()
    m1 = Client(master_server.url, people["m1"])
    assert m1.call("PUT", "/v1/keg/machines/m2/status/mayor.json", "{}")[0] == 403
    assert m1.call("PUT", "/v1/keg/machines/m1/procs/evil.json", "{}")[0] == 403
    assert m1.call("PUT", "/v1/keg/machines/m2/machine.json", "{}")[0] == 403
    assert m1.call("PUT", "/v1/keg/apps/web/app.json", "{}")[0] == 403
    # Even an ACL line granting machines everything does not widen a machine token.
    admin = Client(master_server.url, master_server.token)
    acl = admin.call("GET", "/v1/keg/policy/acl.tsv")[2].decode() + "machine:m1\t/\trw\n"
    assert admin.call("PUT", "/v1/keg/policy/acl.tsv", acl)[0] == 200
    assert m1.call("PUT", "/v1/keg/machines/m2/status/mayor.json", "{}")[0] == 403
    assert Client(master_server.url, master_server.token).head_revision() == head + 1
    assert m1.call("PUT", "/v1/keg/machines/m1/status/mayor.json", '{"ok": true}')[0] == 200
    assert m1.call("GET", "/v1/keg/machines/m1/status/mayor.json")[0] == 200
    assert m1.call("PUT", "/v1/keg/machines/m1/machine.json", '{"cpus": 2}')[0] == 200  # a Mayor registers itself


def test_revoked_token_stops_working(master_server, people):
    from master.client import RemoteKeg
    dev = Client(master_server.url, people["dev"])
    assert dev.call("GET", "/v1/keg/apps")[0] == 200
    with RemoteKeg(master_server.url, master_server.token) as remote:
        token_id, second = auth.new_token(remote, "dev")
        auth.revoke_token(remote, "dev", people["dev"])
    assert dev.call("GET", "/v1/keg/apps")[0] == 401
    assert Client(master_server.url, second).call("GET", "/v1/keg/apps")[0] == 200
    # Only hashes are stored.
    stored = Client(master_server.url, master_server.token).call("GET", "/v1/keg/users/dev/user.json")[2].decode()
    assert second.split("_", 2)[2] not in stored and token_id in stored  # the secret may itself hold "_"


def _raw(master_server, request: bytes) -> bytes:
    host, port = master_server.url.rsplit("/", 1)[1].split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(request)
        data = b""
        while True:
            got = s.recv(65536)
            if not got:
                return data
            data += got


@pytest.mark.parametrize("target", [
    "/v1/keg/../etc/passwd", "/v1/keg/a/../../b", "/v1/keg/%2e%2e/secret", "/v1/keg/a//b",
    "/v1/keg/a/%00b", "/v1/keg/a/./b", "/v1/keg/.git/config", "/v1/keg/a/%ff",
])
def test_path_traversal_and_malformed_paths_are_400(master_server, target):
    head = Client(master_server.url, master_server.token).head_revision()
    auth_line = f"Authorization: Bearer {master_server.token}\r\n"
    for method in ("PUT", "GET"):
        answer = _raw(master_server, f"{method} {target} HTTP/1.1\r\nHost: x\r\n{auth_line}"
                                     f"Content-Length: 1\r\nConnection: close\r\n\r\nx".encode())
        assert answer.startswith(b"HTTP/1.1 400 "), (method, target, answer[:200])
        assert b'"error"' in answer
    _unchanged(master_server, head)


def test_oversized_bodies_are_413_and_write_nothing(master_server):
    master_server.stop()
    master_server.extra = ["--max-body", "65536"]
    master_server.start()
    c = Client(master_server.url, master_server.token)
    head = c.head_revision()
    status, err = c.json("PUT", "/v1/keg/big", b"x" * 70_000)
    assert status == 413 and "65536" in err["error"]
    answer = _raw(master_server, (f"POST /v1/tx HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {master_server.token}"
                                  "\r\nTransfer-Encoding: chunked\r\n\r\n" + "8000\r\n" + "y" * 0x8000 + "\r\n"
                                  + "8000\r\n" + "y" * 0x8000 + "\r\n" + "10\r\n" + "y" * 16 + "\r\n0\r\n\r\n").encode())
    assert answer.startswith(b"HTTP/1.1 413 ")
    status, _ = Client(master_server.url, master_server.token).json("PUT", "/v1/keg/small", b"x" * 60_000)
    assert status == 200
    assert Client(master_server.url, master_server.token).head_revision() == head + 1


def test_anonymous_reads_only_where_the_acl_grants_them(master_server):
    admin = Client(master_server.url, master_server.token)
    admin.call("PUT", "/v1/keg/docs/index.md", "# Help")
    admin.call("PUT", "/v1/keg/apps/a.json", "{}")
    anonymous = Client(master_server.url, None)
    assert anonymous.call("GET", "/v1/keg/docs/index.md")[0] == 401
    acl = admin.call("GET", "/v1/keg/policy/acl.tsv")[2].decode() + "anonymous\t/docs\tr\n"
    assert admin.call("PUT", "/v1/keg/policy/acl.tsv", acl)[0] == 200
    assert anonymous.call("GET", "/v1/keg/docs/index.md") == (200, anonymous.call("GET", "/v1/keg/docs/index.md")[1],
                                                                b"# Help")
    assert anonymous.call("GET", "/v1/keg/apps/a.json")[0] == 401
    assert anonymous.call("PUT", "/v1/keg/docs/index.md", "defaced")[0] == 401
