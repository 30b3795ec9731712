"""The environment of a git command that fetches from a Keg master over smart HTTP with a bearer token.

A token given as ``git -c http.extraHeader=...`` is on git's command line,
which every local user can read in ``/proc/PID/cmdline``.  git (2.31 and
later) reads the same setting from ``GIT_CONFIG_COUNT``/``GIT_CONFIG_KEY_<n>``/
``GIT_CONFIG_VALUE_<n>``, and a process's environment is readable by its own
user and root only (``/proc/PID/environ``).

Debian's git speaks TLS through GnuTLS, which does not read OpenSSL's
``SSL_CERT_FILE``/``SSL_CERT_DIR``, the variables that name a private CA to
Keg's Python programs: the environment carries them over as
``GIT_SSL_CAINFO``/``GIT_SSL_CAPATH``, so that git trusts the master Keg's
own connections trust (a ``GIT_SSL_*`` already set counts only without them).
"""

from __future__ import annotations

import os


def git_http_env(token: str | None, base: dict | None = None) -> dict:
    """``base`` (the process's environment by default) without its ``GIT_*`` variables, plus the token.

    Args:
        token: the bearer token every HTTP request of git carries; None for none.
        base: the variables to start from.

    Returns:
        The environment: ``GIT_TERMINAL_PROMPT=0`` (git fails rather than
        asks), the CAs git trusts for ``https://`` (this process's
        ``SSL_CERT_FILE``/``SSL_CERT_DIR``, else its ``GIT_SSL_CAINFO``/``GIT_SSL_CAPATH``),
        and with a token the ``Authorization`` header as configuration.
    """
    env = {k: v for k, v in (os.environ if base is None else base).items() if not k.startswith("GIT_")}
    for git_name, ssl_name in (("GIT_SSL_CAINFO", "SSL_CERT_FILE"), ("GIT_SSL_CAPATH", "SSL_CERT_DIR")):
        value = os.environ.get(ssl_name) or os.environ.get(git_name)
        if value:
            env[git_name] = value
    if token:
        env.update({"GIT_CONFIG_COUNT": "1", "GIT_CONFIG_KEY_0": "http.extraHeader",
                    "GIT_CONFIG_VALUE_0": f"Authorization: Bearer {token}"})
    env["GIT_TERMINAL_PROMPT"] = "0"
    return env
