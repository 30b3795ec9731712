"""``keg up`` in the background and a git repository to push from: shared by tests/test_deploy.py and
bench/deploy.py (which puts tests/ on its path)."""

from __future__ import annotations

import os
import re
import signal
import subprocess

from conftest import free_port, keg_command, wait_until


class Up:
    """``keg up`` in the background, as the README starts it."""

    def __init__(self, data: str, base_from: str):
        self.data = data
        self.port, self.router_port = free_port(), free_port()
        self.out = open(os.path.join(os.path.dirname(data), "keg-up.out"), "w+")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("KEG_", "GIT_"))}
        self.proc = subprocess.Popen([*keg_command(), "up", "--data", data, "--port", str(self.port),
                                      "--router-port", str(self.router_port), "--base-from", base_from],
                                     stdout=self.out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        wait_until(lambda: "Keg is up" in self.text() or self.proc.poll() is not None, "keg up to start",
                   timeout=180, log=self.text)
        assert self.proc.poll() is None, self.text()
        self.token = re.search(r"^admin token: (\S+)$", self.text(), re.M).group(1)
        self.url = f"http://127.0.0.1:{self.port}"

    def text(self) -> str:
        self.out.seek(0)
        return self.out.read()

    def logs(self) -> str:
        out = [self.text()]
        try:
            from master.client import RemoteKeg
            with RemoteKeg(self.url, self.token) as remote:
                for entry in remote.list("/machines/local/status/logs"):
                    out.append(f"--- {entry.path}\n" + remote.read(entry.path).decode(errors="replace")[-1500:])
        except Exception as err:  # the logs are for a failure message; never hide the failure
            out.append(f"(no process logs: {err})")
        for name in sorted(os.listdir(os.path.join(self.data, "logs"))):
            with open(os.path.join(self.data, "logs", name), errors="replace") as f:
                out.append(f"--- {name}\n{f.read()[-3000:]}")
        return "\n".join(out)

    def keg(self, *args, check=True):
        env = dict(os.environ, KEG_URL=self.url, KEG_TOKEN=self.token)
        done = subprocess.run([*keg_command(), *args], capture_output=True, text=True, env=env, timeout=120)
        if check:
            assert done.returncode == 0, done.stderr
        return done

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode


def git(repo, *args, check=True, env=None):
    done = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, GIT_TERMINAL_PROMPT="0", **(env or {})))
    if check:
        assert done.returncode == 0, done.stdout + done.stderr
    return done


def commit(repo, message) -> str:
    """Commit everything in ``repo`` (even nothing: a new commit of the same tree); returns the commit id."""
    git(repo, "add", "-A")
    git(repo, "-c", "user.name=Alice", "-c", "user.email=alice@example.org", "commit", "-q", "--allow-empty",
        "-m", message)
    return git(repo, "rev-parse", "HEAD").stdout.strip()
