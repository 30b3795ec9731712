"""The web UI over real HTTP: pages, sessions, CSRF, actions, ACLs, escaping (issue 9).

The browser tests (tests/test_ui_browser.py) drive the same pages in
Chromium; these check the HTML the master sends, as a browser without
JavaScript would get it.
"""

from __future__ import annotations

import json
import random
import re

import pytest

import keg
from httpclient import Client
from keg.errors import BadRequest, NotFound
from keg.transaction import Transaction, delete, put
from master import auth
from master.single import SingleMaster
from master.ui import markdown, safe_next
from master.ui.listing import DirectoryIndex
from ui_sample import (IMAGE_1, IMAGE_2, RUNNING_LOG, SOURCE_1, SOURCE_2, SOURCE_3, SOURCE_4, Browser, field,
                       populate)


@pytest.fixture
def cluster(master_server):
    """A master with the sample cluster written, and a browser logged in as admin."""
    populate(master_server.url, master_server.token)
    browser = Browser(master_server.url)
    browser.login(master_server.token)
    return master_server, browser


@pytest.fixture
def reader(master_server):
    """A user whose ACL line grants read on / only; returns a logged-in browser."""
    from master.client import RemoteKeg
    with RemoteKeg(master_server.url, master_server.token) as remote:
        token = auth.add_user(remote, "reader", groups=("readers",))
    admin = Client(master_server.url, master_server.token)
    acl = admin.call("GET", "/v1/keg/policy/acl.tsv")[2].decode() + "group:readers\t/\tr\n"
    assert admin.call("PUT", "/v1/keg/policy/acl.tsv", acl)[0] == 200
    browser = Browser(master_server.url)
    browser.login(token)
    return browser


def api_json(server, path):
    """The parsed JSON value at ``path``, read through the API."""
    status, _, body = Client(server.url, server.token).call("GET", "/v1/keg" + path)
    assert status == 200, body
    return json.loads(body)


def api_kid(server, path):
    """The KID of ``path``, from the API's ETag."""
    status, headers, _ = Client(server.url, server.token).call("HEAD", "/v1/keg" + path)
    return headers["etag"].strip('"') if status == 200 else None


# ----------------------------------------------------------- login, logout

def test_root_redirects_and_anonymous_pages_ask_for_login(master_server):
    b = Browser(master_server.url)
    status, headers, _ = b.get("/")
    assert status == 302 and headers["location"] == "/ui/"
    status, headers, _ = b.get("/ui/apps?view=history")
    assert status == 303 and headers["location"] == "/-/login?next=%2Fui%2Fapps%3Fview%3Dhistory"
    status, _, page = b.get("/-/login")
    assert status == 200 and '<label for="token">Token</label>' in page and 'type="password"' in page


def test_login_sets_a_strict_httponly_cookie_and_logout_clears_it(master_server):
    b = Browser(master_server.url)
    _, _, page = b.get("/-/login?next=/-/machines")
    csrf = field(page, "csrf")
    assert field(page, "next") == "/-/machines"
    # A wrong token: the form again, with the reason, and no session.
    status, _, page = b.call("POST", "/-/login", {"csrf": csrf, "token": "kt_nope", "next": "/-/machines"})
    assert status == 401 and "not valid" in page and "keg_session" not in b.cookies
    # Without the login form's CSRF value: refused.
    status, _, page = b.call("POST", "/-/login", {"token": master_server.token})
    assert status == 403 and "CSRF" in page and "keg_session" not in b.cookies
    status, headers, _ = b.call("POST", "/-/login", {"csrf": csrf, "token": master_server.token,
                                                     "next": "/-/machines"})
    assert status == 303 and headers["location"] == "/-/machines"
    session_cookie = next(c for c in headers["set-cookie-all"] if c.startswith("keg_session="))
    assert "HttpOnly" in session_cookie and "SameSite=Strict" in session_cookie and "Path=/" in session_cookie
    status, _, page = b.get("/ui/")
    assert status == 200 and "Signed in as <strong>admin</strong>" in page
    csrf = field(page, "csrf")
    # Log out needs the session's CSRF token too.
    assert b.call("POST", "/-/logout", {})[0] == 403 and "keg_session" in b.cookies
    status, headers, _ = b.call("POST", "/-/logout", {"csrf": csrf})
    assert status == 303 and headers["location"] == "/-/login?out=1" and "keg_session" not in b.cookies
    assert b.get("/ui/")[0] == 303


def test_next_after_login_stays_on_this_site():
    assert safe_next("/ui/apps") == "/ui/apps"
    assert safe_next("/-/processes?state=failed") == "/-/processes?state=failed"
    for bad in ("https://evil.example/", "//evil.example/x", "/v1/tx", "/\\evil", "/-/logout", None, ""):
        assert safe_next(bad) == "/ui/"


def test_a_cookie_of_a_revoked_token_is_a_logged_out_browser(cluster):
    server, b = cluster
    from master.client import RemoteKeg
    with RemoteKeg(server.url, server.token) as remote:
        token = auth.add_user(remote, "temp", groups=("admin",))
    b2 = Browser(server.url)
    b2.login(token)
    assert b2.get("/ui/")[0] == 200
    with RemoteKeg(server.url, server.token) as remote:
        auth.revoke_token(remote, "temp", token)
    status, headers, _ = b2.get("/ui/")
    assert status == 303 and headers["location"].startswith("/-/login")


# ------------------------------------------------------------------ pages

def test_a_directory_is_a_table_with_kids_sizes_last_change_and_history(cluster):
    server, b = cluster
    status, headers, page = b.get("/ui/machines/m1/status")
    assert status == 200 and headers["content-type"] == "text/html; charset=utf-8"
    assert "default-src 'self'" in headers["content-security-policy"] and headers["cache-control"] == "no-store"
    for name in ("logs/", "mayor.json", "web.json", "worker.json"):
        assert f'class="name">{name}</a>' in page
    kid = api_kid(server, "/machines/m1/status/web.json")
    assert f'href="/-/kid/{kid}"' in page
    assert 'href="/ui/machines/m1/status/web.json?view=history"' in page
    revision = Client(server.url, server.token).head_revision()
    assert f'href="/ui/machines/m1/status/web.json?rev={revision}">r{revision}</a>' in page
    assert f'data-watch="/machines/m1/status" data-since="{revision}"' in page


def test_a_big_directory_is_paginated_and_filtered(master_server):
    c = Client(master_server.url, master_server.token)
    ops = [{"op": "put", "path": f"/many/item-{i:04d}.json", "value": "{}"} for i in range(1_050)]
    status, answer = c.json("POST", "/v1/tx", json.dumps({"ops": ops}))
    assert status == 200
    made = answer["revision"]
    for i in range(3):   # later revisions: one changes an entry of the first page, the others do not touch it
        path = "/many/item-0005.json" if i == 1 else f"/other/x{i}"
        assert c.call("PUT", "/v1/keg" + path, json.dumps({"i": i}))[0] == 200
    b = Browser(master_server.url)
    b.login(master_server.token)
    _, _, page = b.get("/ui/many")
    assert "Entries 1–100 of 1,050" in page and page.count('class="name"') == 100
    # Each entry's last change, found by looking back at the entries of the page alone (a big directory).
    assert page.count(f'>r{made}</a>') == 99 and page.count(f'>r{made + 2}</a>') == 1 and "or earlier" not in page
    assert f'href="/ui/many/item-0005.json?rev={made + 2}">r{made + 2}</a>' in page
    assert 'href="/ui/many?page=2"' in page and "item-0099.json" in page and "item-0100.json" not in page
    _, _, page = b.get("/ui/many?page=11")
    assert "Entries 1,001–1,050 of 1,050" in page and page.count('class="name"') == 50
    _, _, page = b.get("/ui/many?q=item-07")
    assert "Entries 1–100 of 100" in page and "item-0700.json" in page and "item-0800.json" not in page
    _, _, page = b.get("/ui/many?per=1000&page=2")
    assert page.count('class="name"') == 50
    assert b.get("/ui/many?per=5000")[0] == 400


def test_json_is_shown_with_links_for_kids_and_existing_paths(cluster):
    server, b = cluster
    c = Client(server.url, server.token)
    c.call("PUT", "/v1/keg/notes/links.json", json.dumps(
        {"app": "/apps/web/app.json", "missing": "/no/such/path", "image": IMAGE_1, "n": 3, "ok": True}))
    _, _, page = b.get("/ui/notes/links.json")
    assert '<a class="js" href="/ui/apps/web/app.json">&quot;/apps/web/app.json&quot;</a>' in page
    assert '<span class="js">&quot;/no/such/path&quot;</span>' in page
    assert f'<a class="js" href="/-/kid/{IMAGE_1}">' in page
    assert '<span class="jn">3</span>' in page and '<span class="jb">true</span>' in page


def test_everything_from_the_keg_is_escaped(cluster):
    server, b = cluster
    c = Client(server.url, server.token)
    evil = '<img src=x onerror=alert(1)>"\''
    c.call("PUT", "/v1/keg/x/" + "%3Cb%3Ebold.json", json.dumps({"k<script>": evil}))
    c.call("PUT", "/v1/keg/x/t.tsv", f"a\tb\n{evil}\t2\n")
    _, _, page = b.get("/ui/x")
    assert "<b>bold" not in page and "&lt;b&gt;bold.json" in page and 'href="/ui/x/%3Cb%3Ebold.json"' in page
    _, _, page = b.get("/ui/x/%3Cb%3Ebold.json")
    assert "<img" not in page and "<script>" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page
    _, _, page = b.get("/ui/x/t.tsv")
    assert "<img" not in page and "&lt;img src=x" in page
    # Markdown: raw HTML is text, a javascript: link is not a link.
    _, _, page = b.get("/ui/docs/index.md")
    assert "<script>alert" not in page and "&lt;script&gt;alert(&quot;not run&quot;)&lt;/script&gt;" in page
    assert "javascript:" not in page.split("<main", 1)[1].replace("[a trap](javascript:alert(1))", "")


def test_tsv_is_a_sortable_table_and_markdown_is_rendered(cluster):
    _, b = cluster
    _, _, page = b.get("/ui/services/web.tsv")
    assert '<table class="tsv sortable">' in page and "3 rows" in page
    assert '<th scope="col"><button type="button" class="sort">port</button></th>' in page
    assert "<td>api</td><td>m1</td><td>9000</td>" in page
    _, _, page = b.get("/ui/docs/index.md")
    assert "<h1>Keg help</h1>" in page and "<strong>everything</strong>" in page
    assert '<a href="/ui/apps/web/app.json">the web app</a>' in page
    assert '<a href="https://example.org/api">the API</a>' in page
    assert "<ul><li>machines register under <code>/machines</code></li>" in page
    assert "<li>apps under <code>/apps</code><ul><li>each with an <code>app.json</code></li></ul></li>" in page
    assert '<pre><code class="language-sh">keg ls /machines</code></pre>' in page


def test_markdown_renderer_units():
    assert markdown.render("## A *b* `<c>`") == "<h2>A <em>b</em> <code>&lt;c&gt;</code></h2>"
    assert "href" not in markdown.render("[x](JaVaScRiPt:alert(1))")
    assert markdown.render("[x](JaVaScRiPt:void)") == "<p>x</p>"
    assert "href" not in markdown.render("[x](data:text/html,hi)")
    assert markdown.render("[x](other.md)") == '<p><a href="other.md">x</a></p>'
    assert markdown.render("1. one\n2. two") == "<ol><li>one</li><li>two</li></ol>"
    assert markdown.render("> quoted") == "<blockquote><p>quoted</p></blockquote>"
    table = markdown.render("| a | b |\n| --- | --- |\n| 1 | <i> |")
    assert "<th scope=\"col\">a</th>" in table and "<td>&lt;i&gt;</td>" in table
    assert markdown.render("<b onclick=x>hi</b>") == "<p>&lt;b onclick=x&gt;hi&lt;/b&gt;</p>"


def test_large_values_show_metadata_and_download_with_the_session_cookie(cluster):
    server, b = cluster
    data = bytes(random.Random(7).getrandbits(8) for _ in range(1_500_000))
    assert Client(server.url, server.token).call("PUT", "/v1/keg/blobs/image.bin", data)[0] == 200
    _, _, page = b.get("/ui/blobs/image.bin")
    assert "file (large)" in page and "1,500,000 bytes" in page and "blake3 of the whole" in page
    assert 'href="/v1/keg/blobs/image.bin" download>' in page
    # The download link works in the browser: GET on the API accepts the session cookie …
    status, _, _ = b.call("GET", "/v1/keg/blobs/image.bin")
    assert status == 200
    conn = Client(server.url, None)
    status, _, body = conn.call("GET", "/v1/keg/blobs/image.bin", headers={"Cookie": "keg_session=" + b.cookies["keg_session"]},
                                token=None)
    assert status == 200 and body == data
    # … but a write to the API never does: no other site can make a browser write.
    status, _, _ = conn.call("PUT", "/v1/keg/blobs/x", b"1", headers={"Cookie": "keg_session=" + b.cookies["keg_session"]},
                             token=None)
    assert status == 401


def test_a_pointer_shows_where_it_points(cluster):
    server, b = cluster
    commit = "K-" + "ab" * 20
    tx = {"ops": [{"op": "link", "path": "/src/app", "kid": commit},
                  {"op": "put", "path": "/mounts.tsv", "value": "# path\tlocation\tref\n/src/app\t/srv/git/app.git\tmain\n"}]}
    assert Client(server.url, server.token).json("POST", "/v1/tx", json.dumps(tx))[0] == 200
    status, _, page = b.get("/ui/src/app")
    assert status == 200 and "A pointer to commit" in page and commit in page
    assert "<code>/srv/git/app.git</code>" in page and "<code>main</code>" in page
    assert "not in this keg" in page


def test_history_time_travel_diff_and_permalink(cluster):
    server, b = cluster
    c = Client(server.url, server.token)
    first = c.json("PUT", "/v1/keg/notes/a.txt", "one\ntwo\nthree\n")[1]
    second = c.json("PUT", "/v1/keg/notes/a.txt", "one\n2\nthree\n")[1]
    _, _, page = b.get("/ui/notes/a.txt?view=history")
    assert f">{second['revision']}</a>" in page and f">{first['revision']}</a>" in page
    assert "admin" in page
    _, _, page = b.get(f"/ui/notes/a.txt?rev={first['revision']}")
    assert "two" in page and "data-watch" not in page and "not live" in page
    _, _, page = b.get(f"/ui/notes/a.txt?rev={second['revision_kid']}")
    assert "<pre class=\"text\">one\n2\nthree\n</pre>" in page
    _, _, page = b.get("/ui/notes/a.txt")
    assert f'href="/ui/notes/a.txt?rev={second["revision_kid"]}"' in page   # the permalink
    _, _, page = b.get(f"/ui/notes?view=diff&from={first['revision']}&to={second['revision']}")
    assert "1 path under /notes differ" in page and "changed" in page
    assert '<span class="del">-two</span>' in page and '<span class="add">+2</span>' in page
    _, _, page = b.get(f"/ui/?view=diff&from={first['revision'] - 1}&to={second['revision']}")
    assert '<span class="add">+three</span>' in page


def test_kid_page_says_what_a_kid_names(cluster):
    server, b = cluster
    c = Client(server.url, server.token)
    head = c.json("GET", "/v1/head")[1]
    _, _, page = b.get(f"/-/kid/{head['kid']}")
    assert "revision" in page and f'href="/ui/?rev={head["kid"]}"' in page
    kid = api_kid(server, "/jobs/batch.json")
    _, _, page = b.get(f"/-/kid/{kid}")
    assert 'href="/ui/jobs/batch.json"' in page
    assert b.get("/-/kid/K-00000000deadbeef")[0] == 404


# ------------------------------------------------------------- dashboards

def test_dashboards_show_machines_processes_apps_jobs_services(cluster):
    _, b = cluster
    _, _, page = b.get("/-/machines")
    rows = re.findall(r"<tr>(.*?)</tr>", page.split("<tbody>")[1])
    assert "m1" in rows[0] and 'class="badge ok">ok<' in rows[0] and "0.5 / 2" in rows[0]
    assert "256.0 MiB / 4.0 GiB" in rows[0] and "1 running / 2 in the table" in rows[0]
    assert "m2" in rows[1] and 'class="badge bad">stale<' in rows[1]
    _, _, page = b.get("/-/processes")
    assert "2 processes" in page and "web" in page and "worker" in page
    _, _, page = b.get("/-/processes?state=failed")
    assert "1 process " in page and "/ui/machines/m1/status/worker.json" in page
    assert "/ui/machines/m1/status/web.json" not in page
    _, _, page = b.get("/-/processes?machine=m2")
    assert "No process matches" in page
    _, _, page = b.get("/-/apps")
    assert 'href="/ui/apps/web/app.json"' in page and "<td>2</td>" in page
    _, _, page = b.get("/-/jobs")
    assert 'href="/ui/jobs/batch.json"' in page and '<input type="hidden" name="action" value="scale">' in page
    _, _, page = b.get("/-/services")
    assert "<td>api</td><td>m1</td><td>9000</td>" in page


def test_process_status_page_has_state_links_and_buttons(cluster):
    _, b = cluster
    _, _, page = b.get("/ui/machines/m1/status/worker.json")
    assert '<span class="badge bad">failed</span>' in page and "exit status 3 &lt;stderr&gt;" in page
    assert 'href="/ui/machines/m1/procs/worker.json">Spec</a>' in page
    assert 'href="/ui/machines/m1/status/logs/worker.log">Log</a>' in page
    assert ">Restart</button>" in page and ">Stop</button>" in page
    _, _, page = b.get("/ui/machines/m1/status/logs/web.log")
    assert '<pre class="log" data-follow tabindex="0">' in page and "GET / 200" in page


# ---------------------------------------------------------------- actions

def test_restart_writes_a_new_restart_nonce_so_the_spec_kid_changes(cluster):
    server, b = cluster
    path = "/machines/m1/procs/web.json"
    before_kid = api_kid(server, path)
    _, _, page = b.get("/ui" + path)
    form = {"csrf": field(page, "csrf"), "action": "restart", "kid": before_kid}
    status, headers, _ = b.call("POST", "/ui" + path, form)
    assert status == 303 and headers["location"].startswith("/ui/machines/m1/procs/web.json?done=restart&r=")
    spec = api_json(server, path)
    assert spec["restart_nonce"] == 1 and spec["image"].startswith("K-") and api_kid(server, path) != before_kid
    _, _, page = b.get(headers["location"])
    assert "Restart requested" in page
    # The old KID again: the page was stale, nothing is written.
    status, _, page = b.call("POST", "/ui" + path, form)
    assert status == 412 and "Changed meanwhile" in page and api_json(server, path)["restart_nonce"] == 1


def test_stop_deletes_the_spec(cluster):
    server, b = cluster
    path = "/machines/m1/procs/worker.json"
    _, _, page = b.get("/ui/machines/m1/status/worker.json")
    assert field(page, "back") == "/ui/machines/m1/status/worker.json"
    status, headers, _ = b.call("POST", "/ui" + path, {"csrf": field(page, "csrf"), "action": "stop",
                                                       "kid": api_kid(server, path), "back": field(page, "back")})
    assert status == 303 and headers["location"].startswith("/ui/machines/m1/status/worker.json?done=stop&r=")
    assert api_kid(server, path) is None
    _, _, page = b.get(headers["location"])
    assert "Stopped: the process spec was deleted" in page and "No spec in the process table" in page


def test_after_an_action_the_browser_goes_back_only_to_a_page_of_this_ui(cluster):
    server, b = cluster
    _, _, page = b.get("/-/jobs")
    for back, expected in (("/-/jobs", "/-/jobs?done=scale&r="), ("https://evil.example/", "/ui/jobs/batch.json?"),
                           ("//evil.example/x", "/ui/jobs/batch.json?")):
        status, headers, _ = b.call("POST", "/ui/jobs/batch.json", {
            "csrf": field(page, "csrf"), "action": "scale", "kid": api_kid(server, "/jobs/batch.json"),
            "replicas": "2", "back": back})
        assert status == 303 and headers["location"].startswith(expected), (back, headers["location"])


def test_rollback_and_scale(cluster):
    server, b = cluster
    _, _, page = b.get("/ui/apps/web/app.json")
    assert ">Roll back to 1</button>" in page and "Roll back to 2" not in page
    kid = api_kid(server, "/apps/web/app.json")
    status, _, _ = b.call("POST", "/ui/apps/web/app.json", {"csrf": field(page, "csrf"), "action": "rollback",
                                                            "kid": kid, "release": "1"})
    assert status == 303 and api_json(server, "/apps/web/app.json")["current"] == 1
    assert len(api_json(server, "/apps/web/app.json")["releases"]) == 2
    kid = api_kid(server, "/apps/web/app.json")
    status, _, page = b.call("POST", "/ui/apps/web/app.json", {"csrf": field(page, "csrf"), "action": "rollback",
                                                               "kid": kid, "release": "9"})
    assert status == 400 and "no release 9" in page
    status, _, _ = b.call("POST", "/ui/jobs/batch.json", {"csrf": field(page, "csrf"), "action": "scale",
                                                          "kid": api_kid(server, "/jobs/batch.json"), "replicas": "5"})
    assert status == 303 and api_json(server, "/jobs/batch.json")["replicas"] == 5


def test_edit_with_compare_and_swap_shows_the_conflict(cluster):
    server, b = cluster
    path = "/jobs/batch.json"
    _, _, page = b.get("/ui" + path + "?view=edit")
    assert '<label for="value">JSON value of /jobs/batch.json</label>' in page
    kid, base, csrf = field(page, "kid"), field(page, "base"), field(page, "csrf")
    # Someone else changes it meanwhile.
    other = {"image": IMAGE_1, "replicas": 7, "resources": {"cpu": 1}, "note": "theirs"}
    assert Client(server.url, server.token).call("PUT", "/v1/keg" + path, json.dumps(other))[0] == 200
    mine = '{\r\n  "image": "%s",\r\n  "replicas": 4\r\n}' % IMAGE_1
    status, _, page = b.call("POST", "/ui" + path, {"csrf": csrf, "action": "edit", "kid": kid, "base": base,
                                                    "value": mine})
    assert status == 412 and "Conflict" in page and "Nothing was written" in page
    assert "Your version (not saved)" in page and "&quot;replicas&quot;: 4" in page
    assert "Now stored" in page and "theirs" in page
    assert api_json(server, path)["replicas"] == 7
    # Save over it, knowingly: the form on the conflict page carries the new KID.
    status, _, _ = b.call("POST", "/ui" + path, {"csrf": field(page, "csrf"), "action": "edit",
                                                 "kid": field(page, "kid"), "value": mine})
    assert status == 303 and api_json(server, path) == {"image": IMAGE_1, "replicas": 4}
    status, _, page = b.call("POST", "/ui" + path, {"csrf": csrf, "action": "edit",
                                                    "kid": api_kid(server, path), "value": "{not json"})
    assert status == 400 and "not valid JSON" in page


def test_csrf_is_required_on_every_post(cluster):
    server, b = cluster
    path = "/jobs/batch.json"
    head = Client(server.url, server.token).head_revision()
    kid = api_kid(server, path)
    for form in ({"action": "scale", "kid": kid, "replicas": "9"},
                 {"action": "scale", "kid": kid, "replicas": "9", "csrf": "0" * 40},
                 {"action": "scale", "kid": kid, "replicas": "9", "csrf": ""}):
        status, _, page = b.call("POST", "/ui" + path, form)
        assert status == 403 and "CSRF" in page
    # Right token, but another site's page sent it (the Origin says so).
    _, _, page = b.get("/ui/")
    status, _, _ = b.call("POST", "/ui" + path, {"action": "scale", "kid": kid, "replicas": "9",
                                                 "csrf": field(page, "csrf")},
                          headers={"Origin": "https://evil.example"})
    assert status == 403
    # A token in a header has no session: the UI's forms are not for scripts.
    c = Client(server.url, server.token)
    status, _, _ = c.call("POST", "/ui" + path, "action=scale&replicas=9&kid=" + kid,
                          headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 403
    assert Client(server.url, server.token).head_revision() == head


def test_read_only_users_see_no_write_buttons_and_cannot_post(cluster, reader):
    server, _ = cluster
    for target in ("/ui/machines/m1/status/web.json", "/ui/apps/web/app.json", "/ui/jobs/batch.json", "/-/jobs"):
        status, _, page = reader.get(target)
        assert status == 200
        for word in (">Restart<", ">Stop<", "Roll back", ">Scale<", ">Edit<", 'name="action"'):
            assert word not in page, (target, word)
    assert reader.get("/ui/jobs/batch.json?view=edit")[0] == 403
    _, _, page = reader.get("/ui/")
    status, _, page = reader.call("POST", "/ui/jobs/batch.json", {
        "csrf": field(page, "csrf"), "action": "scale", "kid": api_kid(server, "/jobs/batch.json"), "replicas": "9"})
    assert status == 403 and "may not write /jobs/batch.json" in page
    assert api_json(server, "/jobs/batch.json")["replicas"] == 3


def test_static_assets_are_versioned_and_api_answers_are_unchanged(master_server):
    b = Browser(master_server.url)
    _, _, page = b.get("/-/login")
    css = re.search(r'href="(/-/static/ui\.css\?v=[0-9a-f]+)"', page).group(1)
    status, headers, body = b.get(css)
    assert status == 200 and headers["content-type"].startswith("text/css") and "immutable" in headers["cache-control"]
    assert b.get("/-/static/nope.js")[0] == 404
    c = Client(master_server.url, None)
    status, headers, body = c.call("GET", "/v1/keg/jobs", token=None)
    assert status == 401 and json.loads(body)["error_type"] == "Unauthenticated" and "www-authenticate" in headers
    status, spec = c.json("GET", "/v1/openapi.json", token=None)
    assert status == 200 and "/v1/tx" in spec["paths"]


# ----------------------------------------------------------------- builds

def _rows(page: str) -> list:
    """The body rows of the first table of a page."""
    return re.findall(r"<tr>(.*?)</tr>", page.split("<tbody>")[1].split("</tbody>")[0])


def test_builds_dashboard_lists_every_build_with_state_duration_and_log(cluster):
    server, b = cluster
    status, _, page = b.get("/-/builds")
    assert status == 200 and 'data-watch="/builds"' in page and "4 builds, 1 running" in page
    rows = _rows(page)
    # Newest first: the running one (started 15 s ago), web's release 2, api's failure, web's release 1.
    assert [re.search(r'class="name">([^<]+)<', r).group(1) for r in rows] == ["web", "web", "api", "web"]
    running, second, failed, first = rows
    assert SOURCE_3 in running and 'class="badge info">running<' in running and "b1" in running
    assert "Python app detected" in running                          # its last line
    assert re.search(r"<td>(1[5-9]|[2-9]\d)\.\d s</td>", running)       # running for 15 s and more
    assert f'href="/ui/builds/web/{SOURCE_3}/log.txt"' in running
    assert 'class="badge ok">ok<' in second and "42.5 s" in second and "release 2" in second
    assert 'href="/ui/apps/web/app.json"' in second and IMAGE_2[:14] in second
    assert 'class="badge bad">failed<' in failed and "3.2 s" in failed
    assert "pip: no flask==99 &lt;b&gt;here&lt;/b&gt;" in failed and "<b>here</b>" not in page
    assert "_cache" not in page
    # Filters: one app, one state.
    _, _, page = b.get("/-/builds?app=api")
    assert len(_rows(page)) == 1 and SOURCE_4 in page and 'data-watch="/builds/api"' in page
    _, _, page = b.get("/-/builds?state=running")
    assert len(_rows(page)) == 1 and SOURCE_3 in page
    status, _, page = b.get("/-/builds?app=nope")
    assert status == 200 and "No builds match" in page
    for odd in ("..", "a%2Fb", "%3Cb%3E"):   # not an app name: a clear refusal
        status, _, page = b.get(f"/-/builds?app={odd}")
        assert status == 400 and "is not an app name" in page and "<b>" not in page, odd
    # A source pushed that no builder took yet is queued, newest of all.
    c = Client(server.url, server.token)
    queued = "K-" + "9c" * 20
    assert c.json("POST", "/v1/tx", json.dumps({"ops": [{"op": "link", "path": "/src/api", "kid": queued}]}))[0] == 200
    _, _, page = b.get("/-/builds")
    assert queued in _rows(page)[0] and 'class="badge muted">queued<' in _rows(page)[0]
    assert "waiting for a builder" in _rows(page)[0]
    # The apps dashboard counts an app's builds and shows the last one.
    _, _, page = b.get("/-/apps")
    assert 'href="/-/builds?app=web">3</a>' in page and f'href="/ui/builds/web/{SOURCE_3}/log.txt">log<' in page


def test_a_build_log_page_shows_the_build_and_follows_its_log(cluster):
    server, b = cluster
    log_page = f"/ui/builds/web/{SOURCE_3}/log.txt"
    _, _, page = b.get(log_page)
    assert "Build of web" in page and 'class="badge info">running<' in page and "Running for" in page
    assert '<pre class="log" data-follow tabindex="0">' in page and 'id="follow"' in page
    assert "Python app detected" in page
    # The page watches the whole build, so the result shows as soon as it is written.
    assert f'data-watch="/builds/web/{SOURCE_3}"' in page
    c = Client(server.url, server.token)
    log = RUNNING_LOG + "-----> Image K-1a1a1a1a1a1a; processes: web\n"
    result = {"ok": True, "app": "web", "source": SOURCE_3, "image": IMAGE_1, "release": 3, "seconds": 61.0}
    assert c.json("POST", "/v1/tx", json.dumps({"ops": [
        {"op": "put", "path": f"/builds/web/{SOURCE_3}/log.txt", "value": log},
        {"op": "put", "path": f"/builds/web/{SOURCE_3}/result.json", "value": json.dumps(result)}]}))[0] == 200
    _, _, page = b.get(log_page)
    assert 'class="badge ok">ok<' in page and "61.0 s" in page and "release 3" in page and "processes: web" in page
    # The build's other files and its directory have the same panel.
    for target in (f"/ui/builds/web/{SOURCE_3}/result.json", f"/ui/builds/web/{SOURCE_3}"):
        _, _, page = b.get(target)
        assert "Build of web" in page and 'class="badge ok">ok<' in page
    _, _, page = b.get(f"/ui/builds/api/{SOURCE_4}/log.txt")
    assert 'class="badge bad">failed<' in page and "pip: no flask==99 &lt;b&gt;here&lt;/b&gt;" in page
    # At a past revision, the page shows the build as it was then.
    revision = c.head_revision() - 1
    _, _, page = b.get(f"{log_page}?rev={revision}")
    assert 'class="badge info">running<' in page and "processes: web" not in page


def test_an_app_page_lists_its_builds_and_builder_written_releases(cluster):
    server, b = cluster
    _, _, page = b.get("/ui/apps/web/app.json")
    section = page.split("<h3>Builds</h3>")[1]
    assert "3 builds, newest first" in section and 'href="/-/builds?app=web"' in section
    assert section.index(SOURCE_3) < section.index(SOURCE_2) < section.index(SOURCE_1)
    assert f'href="/ui/builds/web/{SOURCE_2}/log.txt"' in section
    # Releases as builders.releases writes them: "time" (ISO 8601) and "author".
    obj = api_json(server, "/apps/web/app.json")
    obj["releases"].append({"number": 3, "image": IMAGE_1, "source": SOURCE_3, "time": "2026-01-02T03:04:05Z",
                            "author": "alice"})
    c = Client(server.url, server.token)
    assert c.call("PUT", "/v1/keg/apps/web/app.json", json.dumps(obj))[0] == 200
    _, _, page = b.get("/ui/apps/web/app.json")
    row = next(r for r in _rows(page) if r.startswith("<td>3 "))
    assert '<time datetime="2026-01-02T03:04:05Z"' in row and "<td>alice</td>" in row


# ------------------------------------------------------- the listing index

@pytest.mark.parametrize("diff_scan_max", [1_000, 0], ids=["diffed-whole", "names-alone"])
def test_directory_index_follows_changes_exactly(keg_dir, diff_scan_max):
    """Incremental listings equal a fresh listing, and last changes equal the log, over random writes.

    Both ways of looking back are checked: a small directory is diffed whole,
    a big one (here: any, with ``diff_scan_max=0``) compares the asked entries alone.
    """
    store = keg.init(keg_dir, durable=False)
    master = SingleMaster(store)
    index = DirectoryIndex(master, diff_scan_max=diff_scan_max)
    rng = random.Random(9)
    names = [f"n{i:03d}" for i in range(60)]
    master.commit([Transaction(tuple(put(f"/d/{n}", "0") for n in names[:30]))])
    try:
        for step in range(120):
            ops = []
            for n in rng.sample(names, rng.randint(1, 4)):
                choice = rng.random()
                if choice < 0.2 and store.exists(f"/d/{n}"):
                    ops.append(delete(f"/d/{n}", recursive=True))
                elif choice < 0.3:
                    ops.append(put(f"/d/{n}/inner", str(step)))
                elif choice < 0.4:
                    ops.append(put(f"/elsewhere/{n}", str(step)))
                else:
                    ops.append(put(f"/d/{n}", str(step)))
            results = master.commit([Transaction(tuple(ops))])
            if not results[0].ok:
                continue   # a put under a file, or the reverse: skip
            head = master.head_number()
            if step % 7 == 0:
                # The index kept since the start (brought forward), and a new one (as after a restart).
                for current in (index, DirectoryIndex(master, diff_scan_max=diff_scan_max)):
                    listing = current.listing("/d", head, newest=True)
                    fresh = master.list("/d", head)
                    assert [e.name for e in fresh] == listing.names
                    assert current.entries(listing, 3, 5) == fresh[3:8]   # a page alone, then all (partly read)
                    assert current.entries(listing, 0, len(listing)) == fresh
                    for page in (listing.names[step % 20:step % 20 + 10], listing.names):
                        changed = current.last_changes(listing, page)
                        while len(changed) < len(page) and any(listing.bound(n) > 0 for n in page if n not in changed):
                            changed = current.last_changes(listing, page)   # each call has a time budget
                    for name in listing.names:
                        assert changed[name] == master.log(f"/d/{name}", head, 1)[0][0].number, name
        assert index.stats["caught_up"] > 0
    finally:
        master.close()


@pytest.mark.parametrize("diff_scan_max", [1_000, 0], ids=["diffed-whole", "names-alone"])
def test_last_changes_stop_truthfully_at_compacted_history(keg_dir, diff_scan_max):
    """Past a volatile directory's compacted history, "rN or earlier" is still true, and nothing fails."""
    store = keg.init(keg_dir, durable=False)
    master = SingleMaster(store)
    status = "/machines/m/status"
    try:
        master.commit([Transaction(tuple(put(f"{status}/p{i}.json", "{}") for i in range(10)))])
        last = dict.fromkeys([f"p{i}.json" for i in range(10)], 1)
        for r in range(20):
            result = master.commit([Transaction((put(f"{status}/p{r % 5}.json", str(r)), put(f"/x/{r}", "1")))])[0]
            last[f"p{r % 5}.json"] = result.revision
        kept_from = master.compact(3)["from_revision"]
        head = master.head_number()
        index = DirectoryIndex(master, diff_scan_max=diff_scan_max)
        listing = index.listing(status, head, newest=True)
        index.entries(listing, 0, len(listing))
        for _ in range(3):
            changed = index.last_changes(listing, listing.names)
        assert changed and changed == {n: last[n] for n in changed}
        assert all(n in changed or listing.bound(n) >= last[n] for n in listing.names)
        assert min(listing.bound(n) for n in listing.names if n not in changed) >= kept_from - 1
    finally:
        master.close()


def test_a_paged_list_reads_the_page_only_in_name_order(keg_dir):
    """``Master.list`` with offset and limit, and ``Master.names``, agree with the whole list."""
    store = keg.init(keg_dir, durable=False)
    master = SingleMaster(store)
    try:
        # Git sorts a subdirectory "a" as "a/", after "a-b" and "a.b": the listing sorts by name.
        ops = [put(f"/p/{n}", "x" * i) for i, n in enumerate(["a-b", "a.b", "z", "é", "b", "ab"])]
        ops += [put("/p/a/inner", "1"), put("/p/a0/inner", "2")]
        master.commit([Transaction(tuple(ops))])
        whole = master.list("/p")
        assert [e.name for e in whole] == sorted(e.name for e in whole) == master.names("/p")
        for offset in range(len(whole) + 1):
            for limit in (0, 1, 3, 100):
                assert master.list("/p", None, offset, limit) == whole[offset:offset + limit]
        assert master.list("/p", None, 2) == whole[2:]
        def tree_reads(call):
            before = store.stats["tree_reads"]
            call()
            return store.stats["tree_reads"] - before
        # The page of "a" alone reads "a" (its size) but not "a0": one tree fewer than the whole listing.
        assert tree_reads(lambda: master.list("/p", None, 0, 1)) == tree_reads(lambda: master.list("/p")) - 1
        with pytest.raises(BadRequest):
            master.list("/p", None, -1, 2)
        with pytest.raises(BadRequest):
            master.names("/p/z")
        with pytest.raises(NotFound):
            master.names("/nothing")
        assert master.names("/") == ["p"]
    finally:
        master.close()
