"""git smart HTTP for ``/git/keg.git``, served by git's own ``git http-backend``.

The keg is a bare git repository, so stock git clones and fetches it as it is.
Before each request the master checkpoints (``publish``), so the refs on disk
show the newest revision.  The backend runs with ``http.getanyfile`` off (only
what the refs reach is served, never a loose object by name),
``http.uploadpack`` on and ``http.receivepack`` off.  Pushes are refused
before git runs, with a message git prints as ``remote error:`` — writes go
through transactions.

The backend is a CGI program: its output is a few header lines, a blank line,
then the body, which may be large (a whole pack), so it is streamed: the event
loop reads the pipe as it becomes readable, a threaded server just reads.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

from master.bodies import CommandBody

SERVE_LINK = os.path.join("keg", "http")   # <keg>/keg/http/keg.git -> the keg itself


def _pkt(text: str) -> bytes:
    data = text.encode()
    return f"{len(data) + 4:04x}".encode() + data


def refusal(message: str) -> bytes:
    """A smart-protocol advertisement that makes git print ``remote error: message``."""
    return _pkt("# service=git-receive-pack\n") + b"0000" + _pkt(f"ERR {message}")


def project_root(keg_path: str) -> str:
    """A directory in which ``keg.git`` is the keg (a symlink), for ``GIT_PROJECT_ROOT``."""
    root = os.path.join(keg_path, SERVE_LINK)
    link = os.path.join(root, "keg.git")
    if not os.path.islink(link):
        os.makedirs(root, exist_ok=True)
        os.symlink(os.path.relpath(keg_path, root), link)
    return root


def cgi_environ(environ: dict, root: str, path_info: str, remote_user: str) -> dict:
    """The environment of one ``git http-backend`` run."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "GIT_PROJECT_ROOT": root,
        "GIT_HTTP_EXPORT_ALL": "1",
        "PATH_INFO": path_info,
        "QUERY_STRING": environ.get("QUERY_STRING", ""),
        "REQUEST_METHOD": environ.get("REQUEST_METHOD", "GET"),
        "CONTENT_TYPE": environ.get("CONTENT_TYPE", ""),
        "REMOTE_USER": remote_user,
        "REMOTE_ADDR": environ.get("REMOTE_ADDR", ""),
        "GIT_CONFIG_NOSYSTEM": "1",
        "HOME": root,
        "GIT_CONFIG_COUNT": "4",
        "GIT_CONFIG_KEY_0": "http.getanyfile", "GIT_CONFIG_VALUE_0": "false",
        "GIT_CONFIG_KEY_1": "http.uploadpack", "GIT_CONFIG_VALUE_1": "true",
        "GIT_CONFIG_KEY_2": "http.receivepack", "GIT_CONFIG_VALUE_2": "false",
        "GIT_CONFIG_KEY_3": "safe.directory", "GIT_CONFIG_VALUE_3": "*",
    }
    for name in ("HTTP_GIT_PROTOCOL", "HTTP_CONTENT_ENCODING"):
        if name in environ:
            env[name] = environ[name]
    return env


class CgiBody(CommandBody):
    """The streamed output of ``git http-backend``: CGI headers, a blank line, then the body.

    Args:
        env: the CGI environment.
        body: the request body.
    """

    cut_on_failure = False   # git's protocol carries its own errors to the client

    def __init__(self, start_response, env: dict, body: bytes):
        super().__init__(start_response, [shutil.which("git") or "git", "http-backend"], env, body,
                         what="git http-backend")
        self.header_buf = b""

    def _head(self, data: bytes) -> bytes:
        """Collect CGI headers; once complete, start the response and return the body bytes read so far."""
        self.header_buf += data
        end = self.header_buf.find(b"\r\n\r\n")
        sep = 4
        if end < 0:
            end, sep = self.header_buf.find(b"\n\n"), 2
        if end < 0:
            return b""
        status, headers = "200 OK", []
        for line in self.header_buf[:end].decode("latin-1").splitlines():
            name, _, value = line.partition(":")
            if name.lower() == "status":
                status = value.strip()
            elif name:
                headers.append((name.strip(), value.strip()))
        self.start_response(status, headers)
        self.headers_done = True
        rest, self.header_buf = self.header_buf[end + sep:], b""
        return rest


# ------------------------------------------------------------ app pushes

APPS_DIR = "apps"                # <project root>/apps/<app>.git: the receiving repositories
HOOKS_DIR = os.path.join("keg", "hooks")
PRE_RECEIVE = """#!/bin/sh
# Written by the Keg master: hands every push to `python -m builders.receive` (see builders/receive.py).
exec {python} -m builders.receive
"""


def app_repository(root: str, app: str) -> str:
    """The receiving repository of ``app`` under the project root, created bare on first use.

    It holds what was pushed (so that the next push sends only what is new); the
    source itself goes into the keg (``keg.sources``) before any ref moves here.
    """
    repo = os.path.join(root, APPS_DIR, app + ".git")
    if not os.path.isdir(repo):
        os.makedirs(os.path.dirname(repo), exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{app}.", dir=os.path.dirname(repo))
        subprocess.run(["git", "init", "--quiet", "--bare", "--initial-branch=main", tmp], check=True,
                       env={k: v for k, v in os.environ.items() if not k.startswith("GIT_")})
        try:
            os.rename(tmp, repo)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)   # made at the same time by another request
    return repo


def hooks_dir(keg_path: str, python: str) -> str:
    """The directory with the pre-receive hook every app push runs (rewritten when it differs)."""
    directory = os.path.join(keg_path, HOOKS_DIR)
    os.makedirs(directory, exist_ok=True)
    hook = os.path.join(directory, "pre-receive")
    text = PRE_RECEIVE.format(python=python)
    try:
        with open(hook) as f:
            same = f.read() == text
    except OSError:
        same = False
    if not same:
        tmp = hook + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o755)
        os.replace(tmp, hook)
    return directory


def push_environ(environ: dict, root: str, path_info: str, remote_user: str, hooks: str, max_push: int,
                 hook_env: dict) -> dict:
    """The environment of ``git http-backend`` for a push to an app repository.

    Receiving is on, every object is checked (``receive.fsckObjects``), a pack
    larger than ``max_push`` is refused by git itself, ref deletions are
    refused, and the pre-receive hook gets ``hook_env`` (how to reach the master) and the master's own
    ``SSL_CERT_FILE``/``SSL_CERT_DIR``, to trust an ``https://`` master as the master trusts its peers.
    """
    env = cgi_environ(environ, root, path_info, remote_user)
    extra = {"http.receivepack": "true", "receive.fsckObjects": "true", "transfer.fsckObjects": "true",
             "receive.maxInputSize": str(max_push), "receive.denyDeletes": "true",
             "receive.denyNonFastForwards": "false", "core.hooksPath": hooks}
    count = int(env["GIT_CONFIG_COUNT"])
    for i, key in enumerate(env[f"GIT_CONFIG_KEY_{n}"] for n in range(count)):
        if key in extra:
            env[f"GIT_CONFIG_VALUE_{i}"] = extra.pop(key)
    for key, value in extra.items():
        env[f"GIT_CONFIG_KEY_{count}"], env[f"GIT_CONFIG_VALUE_{count}"] = key, value
        count += 1
    env["GIT_CONFIG_COUNT"] = str(count)
    env.update({name: os.path.abspath(os.environ[name])  # the hook runs elsewhere
                for name in ("SSL_CERT_FILE", "SSL_CERT_DIR") if os.environ.get(name)})
    env.update(hook_env)
    return env
