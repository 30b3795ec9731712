"""The web UI in headless Chromium (Debian's chromium and chromium-driver, driven by Selenium 4).

What a person does: log in and out, go from / to a process's status, see
a page change when a path changes (without reloading), see the live
indicator say when the master is gone, follow a running build's log from
the builds dashboard, edit an object and meet a
conflict, roll back a release, restart and stop a process, and have a
forged form refused.  The tests also take the screenshots in
docs/screenshots/ (README and docs/ui.md show them).

These tests fail, never skip, when Chromium or its driver is missing:
./install.sh installs both (CI runs it).
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

from conftest import REPO
from httpclient import Client
from ui_sample import IMAGE_1, RUNNING_LOG, SOURCE_3, populate

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
SCREENSHOTS = os.path.join(REPO, "docs", "screenshots")
WAIT = 20.0
DESKTOP = (1280, 800)
PHONE = (390, 844)


@pytest.fixture(scope="module")
def driver():
    """One headless Chromium for the module (each test gets a new master, so cookies are cleared per test)."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not (os.path.exists(p) or shutil.which(os.path.basename(p)))]
    assert not missing, f"{', '.join(missing)} missing: ./install.sh installs Debian's chromium and chromium-driver"
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={DESKTOP[0]},{DESKTOP[1]}", "--hide-scrollbars", "--force-device-scale-factor=1",
                "--no-first-run", "--disable-extensions", "--password-store=basic"):
        options.add_argument(arg)
    chrome = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    chrome.set_page_load_timeout(30)
    yield chrome
    chrome.quit()


class Ui:
    """The browser pointed at one master, with the few moves the tests repeat."""

    def __init__(self, chrome, server):
        self.d = chrome
        self.server = server
        self.url = server.url

    def go(self, target: str) -> None:
        self.d.get(self.url + target)

    def css(self, selector: str):
        from selenium.webdriver.common.by import By
        return self.d.find_element(By.CSS_SELECTOR, selector)

    def all(self, selector: str) -> list:
        from selenium.webdriver.common.by import By
        return self.d.find_elements(By.CSS_SELECTOR, selector)

    def click_link(self, text: str, within: str = "main") -> None:
        from selenium.webdriver.common.by import By
        self.css(within).find_element(By.LINK_TEXT, text).click()

    def button(self, text: str):
        from selenium.webdriver.common.by import By
        return self.d.find_element(By.XPATH, f"//main//button[normalize-space()='{text}']")

    def wait(self, condition, message: str = ""):
        from selenium.common.exceptions import WebDriverException
        from selenium.webdriver.support.ui import WebDriverWait
        # A condition read while a page is being replaced (a click's navigation, a live refresh) sees
        # stale or missing elements, or nodes of the old document: that is "not yet", not a failure.
        # A condition that never holds still fails, at the timeout, with the message.
        waiter = WebDriverWait(self.d, WAIT, poll_frequency=0.05, ignored_exceptions=(WebDriverException,))
        return waiter.until(lambda _: condition(), message)

    def main_text(self) -> str:
        return self.css("main").text

    def live_state(self) -> str:
        return self.css("#live").get_attribute("data-state")

    def login(self, token: str) -> None:
        self.go("/-/login")
        self.css("#token").send_keys(token)
        self.button("Log in").click()
        self.wait(lambda: "Signed in as" in self.css("header").text, "login did not finish")

    def shot(self, name: str, size=DESKTOP) -> None:
        """A screenshot for docs/screenshots/ (the viewport, at the given size)."""
        self.d.set_window_size(*size)
        os.makedirs(SCREENSHOTS, exist_ok=True)
        self.d.save_screenshot(os.path.join(SCREENSHOTS, name))
        self.d.set_window_size(*DESKTOP)

    def api(self) -> Client:
        return Client(self.url, self.server.token)

    def api_json(self, path: str):
        status, _, body = self.api().call("GET", "/v1/keg" + path)
        assert status == 200, body
        return json.loads(body)


@pytest.fixture
def ui(driver, master_server):
    """A master with the sample cluster, and the browser with no cookies left from earlier tests."""
    populate(master_server.url, master_server.token)
    driver.set_window_size(*DESKTOP)
    driver.get(master_server.url + "/-/static/ui.css")   # a page of this host, so its cookies can be cleared
    driver.delete_all_cookies()
    return Ui(driver, master_server)


def test_log_in_navigate_from_root_to_a_process_status_and_log_out(ui):
    from selenium.webdriver.common.keys import Keys
    ui.go("/")
    ui.wait(lambda: "/-/login" in ui.d.current_url, "/ did not lead to the login page")
    ui.css("#token").send_keys("kt_0000000000000000_wrongwrongwrongwrongwrongwrongwrong")
    ui.button("Log in").click()
    ui.wait(lambda: "not valid" in ui.main_text())
    ui.css("#token").send_keys(ui.server.token)
    ui.button("Log in").click()
    ui.wait(lambda: ui.d.current_url.endswith("/ui/"), "login did not return to /ui/")
    assert "Signed in as admin" in ui.css("header").text
    ui.wait(lambda: ui.live_state() == "live", "the page did not go live")
    ui.shot("namespace.png")
    # Keyboard: the first Tab reaches the skip link, and Enter moves to the content.
    ui.css("body").send_keys(Keys.TAB)
    assert ui.d.switch_to.active_element.text == "Skip to content"
    # From / to a process status, by the namespace's own links.
    ui.click_link("machines/")
    ui.click_link("m1/")
    ui.click_link("status/")
    ui.click_link("web.json")
    ui.wait(lambda: "Process web on m1" in ui.main_text())
    assert ui.css("main .panel .badge").text == "running"
    assert ui.button("Restart").is_displayed() and ui.button("Stop").is_displayed()
    ui.shot("process.png")
    ui.shot("process-phone.png", PHONE)
    # And by the dashboards.
    ui.click_link("Machines", within="header")
    ui.wait(lambda: "stale" in ui.main_text())
    ui.shot("machines.png")
    ui.click_link("Processes", within="header")
    ui.wait(lambda: "worker" in ui.main_text())
    ui.shot("processes.png")
    ui.css("select[name=state]").send_keys("failed")
    ui.button("Filter").click()
    ui.wait(lambda: "state=failed" in ui.d.current_url)
    assert "worker" in ui.main_text() and "web" not in [r.text.split()[0] for r in ui.all("main tbody tr")]
    ui.click_link("worker")
    ui.wait(lambda: "exit status 3 <stderr>" in ui.main_text())
    # Log out: back to the login page, and pages ask for login again.
    ui.css("header button.link").click()
    ui.wait(lambda: "You are logged out" in ui.main_text())
    ui.go("/ui/apps")
    ui.wait(lambda: "/-/login" in ui.d.current_url)


def test_pages_follow_changes_live_and_say_when_disconnected(ui):
    ui.login(ui.server.token)
    ui.go("/ui/machines/m1/status/web.json")
    ui.wait(lambda: ui.live_state() == "live", "the page did not go live")
    ui.d.execute_script("window.kegMarker = 42;")
    status = ui.api_json("/machines/m1/status/web.json")
    status.update(state="exited", exit_code=0, pid=None)
    assert ui.api().call("PUT", "/v1/keg/machines/m1/status/web.json", json.dumps(status))[0] == 200
    ui.wait(lambda: ui.css("main .panel .badge").text == "exited", "the change did not reach the page")
    assert ui.d.execute_script("return window.kegMarker;") == 42, "the page was reloaded"
    # A log page follows new lines.
    ui.go("/ui/machines/m1/status/logs/web.log")
    ui.wait(lambda: ui.live_state() == "live")
    assert ui.css("#follow").is_selected()
    log = "".join(f"GET /item/{i} 200\n" for i in range(200))
    assert ui.api().call("PUT", "/v1/keg/machines/m1/status/logs/web.log", log)[0] == 200
    ui.wait(lambda: "GET /item/199 200" in ui.css("pre.log").text)
    assert ui.d.execute_script("var p = document.querySelector('pre.log');"
                               "return p.scrollTop + p.clientHeight >= p.scrollHeight - 2;"), "the log did not follow"
    # The master goes away: the indicator says so; it comes back: live again, and changes arrive.
    ui.go("/-/processes")
    ui.wait(lambda: ui.live_state() == "live")
    ui.server.stop()
    ui.wait(lambda: ui.live_state() == "down", "no disconnected indicator")
    assert "Disconnected" in ui.css("#live").text
    ui.shot("disconnected.png")
    ui.server.start()
    ui.wait(lambda: ui.live_state() == "live", "did not reconnect")
    spec = {"image": IMAGE_1, "args": ["late"]}
    assert ui.api().call("PUT", "/v1/keg/machines/m2/procs/late.json", json.dumps(spec))[0] == 200
    ui.wait(lambda: "late" in ui.main_text(), "a change after reconnecting did not arrive")


def test_follow_a_build_from_the_builds_dashboard(ui):
    """A running build's output shows on the dashboard and on its log page as the builder rewrites log.txt."""
    ui.login(ui.server.token)
    ui.click_link("Builds", within="header")
    ui.wait(lambda: ui.live_state() == "live", "the builds dashboard did not go live")
    running = ui.css("main table.builds tbody tr")
    assert "running" in running.text and "Python app detected" in running.text
    log_path = f"/v1/keg/builds/web/{SOURCE_3}/log.txt"
    ui.d.execute_script("window.kegMarker = 7;")
    log = RUNNING_LOG + "-----> Installing requirements from /pkgs/pypi\n"
    assert ui.api().call("PUT", log_path, log)[0] == 200
    ui.wait(lambda: "Installing requirements" in ui.css("main table.builds tbody tr").text,
            "the new log line did not reach the dashboard")
    assert ui.d.execute_script("return window.kegMarker;") == 7, "the page was reloaded"
    ui.shot("builds.png")
    # Its log page follows the log as it grows, and says when the build is done.
    ui.css("main table.builds tbody tr").find_element("link text", "log").click()
    ui.wait(lambda: "Build of web" in ui.main_text() and ui.live_state() == "live")
    assert ui.css("#follow").is_selected()
    log += "".join(f"Collecting package-{i}\n" for i in range(300))
    assert ui.api().call("PUT", log_path, log)[0] == 200
    ui.wait(lambda: "Collecting package-299" in ui.css("pre.log").text, "the log page did not follow the log")
    assert ui.d.execute_script("var p = document.querySelector('pre.log');"
                               "return p.scrollTop + p.clientHeight >= p.scrollHeight - 2;"), "the log did not follow"
    result = {"ok": True, "app": "web", "source": SOURCE_3, "image": IMAGE_1, "release": 3, "seconds": 61.0}
    assert ui.api().call("PUT", f"/v1/keg/builds/web/{SOURCE_3}/result.json", json.dumps(result))[0] == 200
    ui.wait(lambda: ui.css("main .panel .badge").text == "ok", "the result did not reach the log page")
    assert "release 3" in ui.css("main .panel").text


def test_edit_an_object_and_see_the_conflict(ui):
    ui.login(ui.server.token)
    ui.go("/ui/jobs/batch.json")
    ui.click_link("Edit")
    editor = ui.css("textarea#value")
    mine = {"image": IMAGE_1, "replicas": 4, "resources": {"cpu": 1}}
    editor.clear()
    editor.send_keys(json.dumps(mine, indent=2))
    # Someone else writes first; the open editor is told, but not overwritten.
    theirs = {"image": IMAGE_1, "replicas": 7, "resources": {"cpu": 2}, "note": "theirs"}
    assert ui.api().call("PUT", "/v1/keg/jobs/batch.json", json.dumps(theirs, indent=2))[0] == 200
    ui.wait(lambda: ui.all("#stale"), "the editor was not told of the change")
    assert json.loads(ui.css("textarea#value").get_attribute("value")) == mine
    ui.button("Save").click()
    ui.wait(lambda: "Conflict" in ui.css("h1").text)
    text = ui.main_text()
    assert "Nothing was written" in text and "Your version (not saved)" in text and '"note": "theirs"' in text
    ui.shot("conflict.png")
    assert ui.api_json("/jobs/batch.json") == theirs
    ui.button("Save over the stored version").click()
    ui.wait(lambda: "Saved." in ui.main_text())
    assert ui.api_json("/jobs/batch.json") == mine


def test_roll_back_a_release(ui):
    ui.login(ui.server.token)
    ui.click_link("Apps", within="header")
    ui.click_link("web")
    ui.wait(lambda: "Releases of web" in ui.main_text())
    ui.shot("app.png")
    ui.button("Roll back to 1").click()
    ui.wait(lambda: "Rolled back" in ui.main_text())
    assert "Current release: 1" in ui.main_text()
    assert ui.api_json("/apps/web/app.json")["current"] == 1
    assert ui.button("Roll back to 2").is_displayed()


def test_restart_and_stop_a_process(ui):
    ui.login(ui.server.token)
    ui.go("/ui/machines/m1/status/web.json")
    ui.button("Restart").click()
    ui.wait(lambda: "Restart requested" in ui.main_text())
    assert ui.api_json("/machines/m1/procs/web.json")["restart_nonce"] == 1
    ui.go("/ui/machines/m1/status/worker.json")
    ui.button("Stop").click()
    ui.d.switch_to.alert.accept()    # "Stop worker on m1? Its spec is deleted."
    ui.wait(lambda: "Stopped" in ui.main_text())
    assert ui.api().call("GET", "/v1/keg/machines/m1/procs/worker.json")[0] == 404


def test_a_form_without_its_csrf_token_is_refused(ui):
    ui.login(ui.server.token)
    ui.go("/-/jobs")
    head = ui.api().head_revision()
    ui.d.execute_script("document.querySelectorAll('input[name=csrf]').forEach(function (i) { i.remove(); });")
    field = ui.css("main input[name=replicas]")
    field.clear()
    field.send_keys("9")
    ui.button("Scale").click()
    ui.wait(lambda: "Forbidden" in ui.css("h1").text)
    assert "CSRF" in ui.main_text()
    assert ui.api_json("/jobs/batch.json")["replicas"] == 3 and ui.api().head_revision() == head
    # With the token the same form works.
    ui.go("/-/jobs")
    field = ui.css("main input[name=replicas]")
    field.clear()
    field.send_keys("9")
    ui.button("Scale").click()
    ui.wait(lambda: "Scaled" in ui.main_text())
    assert ui.api_json("/jobs/batch.json")["replicas"] == 9


def test_a_thousand_entries_page_sort_and_phone_width(ui):
    ops = [{"op": "put", "path": f"/many/item-{i:04d}.json", "value": json.dumps({"i": i})} for i in range(1_000)]
    assert ui.api().json("POST", "/v1/tx", json.dumps({"ops": ops}))[0] == 200
    ui.login(ui.server.token)
    ui.go("/ui/many")
    assert "Entries 1–100 of 1,000" in ui.main_text() and len(ui.all("table.listing tbody tr")) == 100

    def overflow():
        return ui.d.execute_script("return document.documentElement.scrollWidth - document.documentElement.clientWidth;")
    assert overflow() <= 0, "the page is wider than the window"
    ui.shot("directory.png")
    ui.css("main a.button").click()   # Next →
    ui.wait(lambda: "Entries 101–200 of 1,000" in ui.main_text())
    ui.d.set_window_size(*PHONE)
    assert overflow() <= 0, "the page is wider than a phone"
    ui.d.set_window_size(*DESKTOP)
    # A TSV table sorts by a column, and says so to screen readers.
    ui.go("/ui/services/web.tsv")
    ports = lambda: [r.find_elements("css selector", "td")[2].text for r in ui.all("table.tsv tbody tr")]  # noqa: E731
    assert ports() == ["8000", "8001", "9000"]
    header = ui.all("table.tsv th button.sort")[2]
    header.click()
    header.click()
    assert ports() == ["9000", "8001", "8000"]
    assert ui.all("table.tsv th")[2].get_attribute("aria-sort") == "descending"
    ui.go("/ui/docs/index.md")
    assert ui.css("article.markdown h1").text == "Keg help"
