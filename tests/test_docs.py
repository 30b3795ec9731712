"""The README's commands work as written, and the CLI reference matches the code.

The README test also runs docs/deploy.md's ```sh blocks against the same `keg up`, and looks at the
app in the web UI in headless Chromium, as the README tells a reader to (tests/test_docs_commands.py
keeps the registry of which test runs which doc's commands).
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile

from conftest import REPO
from test_docs_commands import Shell, shell_blocks

sys.path.insert(0, os.path.join(REPO, "tools"))

UI = "http://127.0.0.1:7480"
WAIT = 30.0


def test_cli_reference_is_generated_from_the_current_code():
    import gen_cli_doc
    with open(os.path.join(REPO, "docs", "cli.md"), encoding="utf-8") as f:
        assert f.read() == gen_cli_doc.render(), "docs/cli.md is stale: run python tools/gen_cli_doc.py"


class Browser:
    """Headless Chromium (Debian's chromium and chromium-driver, as in tests/test_ui_browser.py)."""

    def __init__(self):
        missing = [p for p in ("/usr/bin/chromium", "/usr/bin/chromedriver") if not os.path.exists(p)]
        assert not missing, f"{', '.join(missing)} missing: ./install.sh installs chromium and chromium-driver"
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
        options = webdriver.ChromeOptions()
        options.binary_location = "/usr/bin/chromium"
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--window-size=1280,800", "--no-first-run", "--disable-extensions", "--password-store=basic"):
            options.add_argument(arg)
        self.d = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
        self.d.set_page_load_timeout(30)

    def css(self, selector: str):
        from selenium.webdriver.common.by import By
        return self.d.find_element(By.CSS_SELECTOR, selector)

    def wait(self, condition, message: str):
        from selenium.common.exceptions import WebDriverException
        from selenium.webdriver.support.ui import WebDriverWait
        waiter = WebDriverWait(self.d, WAIT, poll_frequency=0.1, ignored_exceptions=(WebDriverException,))
        return waiter.until(lambda _: condition(), message)

    def main_text(self) -> str:
        return self.css("main").text

    def quit(self) -> None:
        self.d.quit()


def look_at_the_app_in_the_web_ui(browser: Browser, token: str) -> None:
    """README: open /ui/apps/hello/, log in with the token, keep the page open."""
    from selenium.webdriver.common.by import By
    browser.d.get(UI + "/ui/apps/hello/")
    browser.wait(lambda: "/-/login" in browser.d.current_url, "the app's page did not ask for a login")
    browser.css("#token").send_keys(token)
    browser.d.find_element(By.XPATH, "//main//button[normalize-space()='Log in']").click()
    browser.wait(lambda: browser.d.current_url == UI + "/ui/apps/hello/", "the login did not lead back to the app")
    browser.wait(lambda: "app.json" in browser.main_text(), "the app's directory does not list app.json")
    browser.css("main").find_element(By.LINK_TEXT, "app.json").click()
    browser.wait(lambda: "Releases of hello" in browser.main_text(), "no releases panel on app.json")
    assert "Current release: 1" in browser.main_text(), browser.main_text()
    browser.wait(lambda: browser.css("#live").get_attribute("data-state") == "live", "the page did not go live")
    browser.d.execute_script("window.kegMarker = 42;")


def test_readme_commands_run_as_written():
    """The README, literally: `keg up` (the first command without the install, which CI ran) in a fresh
    HOME, then the tour's blocks in one shell, as in a second terminal: push the example app, look at
    it in the web UI (Chromium), read and write paths, a second release, time travel, rollback (the
    open page follows, without a reload); then docs/deploy.md's blocks in the same shell; then Ctrl-C
    leaves nothing running."""
    readme, deploy = shell_blocks("README.md"), shell_blocks("docs/deploy.md")
    setup, first, rest = readme[0], readme[1], readme[2:]
    assert setup.text.splitlines()[1] == "./install.sh && .venv/bin/python -m pytest -q"
    command = setup.text.splitlines()[0].replace("./install.sh && ", "")
    home = tempfile.mkdtemp(prefix="keg-readme-")
    logs = tempfile.mkdtemp(prefix="keg-readme-shell-")
    os.chmod(home, 0o711)        # containers' files live below HOME: runc needs it searchable
    env = {"HOME": home, "PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "GIT_CONFIG_NOSYSTEM": "1",
           "GIT_AUTHOR_NAME": "Ada", "GIT_AUTHOR_EMAIL": "ada@example.org",
           "GIT_COMMITTER_NAME": "Ada", "GIT_COMMITTER_EMAIL": "ada@example.org"}
    up = subprocess.Popen(["bash", "-c", command], cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, start_new_session=True)
    seen, shell, browser = [], None, None
    try:
        while "Ctrl-C stops everything" not in (line := up.stdout.readline()):
            assert line, "keg up stopped:\n" + "".join(seen)
            seen.append(line)
        text = "".join(seen)
        token = re.search(r"^admin token: (kt_\S+)$", text, re.M).group(1)
        assert "git remote add keg http://admin:" in text
        shell = Shell(["bash", "--noprofile", "--norc", "-s"], env, logs, cwd=REPO, name="the README's second terminal")
        shell.run(first.text, first.where(), timeout=900)
        browser = Browser()
        look_at_the_app_in_the_web_ui(browser, token)
        for block in rest:
            shell.run(block.text, block.where(), timeout=600)
        browser.wait(lambda: "Current release: 3" in browser.main_text(), "the open page did not follow the rollback")
        assert browser.d.execute_script("return window.kegMarker;") == 42, "the page was reloaded"
        # docs/deploy.md: its first block adds the remote and pushes, from a repository that has none yet.
        shell.run('git clone -q ~/hello ~/deploy-md && cd ~/deploy-md && git commit -q --allow-empty -m "deploy.md"',
                  "the test: a clone of ~/hello to push from")
        for block in deploy:
            shell.run(block.text, block.where(), timeout=600)
    finally:
        if browser:
            browser.quit()
        if shell:
            shell.close()
        os.kill(up.pid, signal.SIGINT)      # Ctrl-C
        rest_of_up = up.communicate(timeout=180)[0]
    assert up.returncode == 0, rest_of_up
    assert "keg up: stopped" in rest_of_up
    tour = [(w, out, err) for w, out, err in shell.outputs if w.startswith("README.md")]
    out, err = "".join(o for _, o, _ in tour), "".join(e for _, _, e in tour)
    assert out.count("Hello, Keg! This is release one.") == 2, out
    assert "Hello, Keg! This is release two." in out, out
    assert "remote: -----> Released v1" in err and "remote: -----> Released v2" in err, err
    assert '{"note": "written by hand"}' in out
    assert "* v1" in out and "hello-web" in out
    assert out.count('"number"') >= 1                      # app.json as it was at release 1
    deployed = [(w, o, e) for w, o, e in shell.outputs if w.startswith("docs/deploy.md")]
    assert len(deployed) == len(deploy)
    assert re.search(r"remote: -----> Released v4", deployed[0][2]), deployed[0][2]
    apps_and_config = deployed[1][1]
    assert re.search(r"^hello\s", apps_and_config, re.M), apps_and_config          # keg apps
    assert "GREETING_NAME=you" in apps_and_config, apps_and_config                # keg config show
    leftovers = subprocess.run(["pgrep", "-f", home], capture_output=True, text=True).stdout.split()
    assert leftovers == [], leftovers
    with open("/proc/self/mounts") as f:
        assert home not in f.read()
    shutil.rmtree(home, ignore_errors=True)
    shutil.rmtree(logs, ignore_errors=True)
