"""Build kinds: which kind a pushed source is, its process types, its requirements, and the
script each kind runs inside the build container (DESIGN §6; docs/builds.md).

Detection, first match wins:

1. ``keg.json`` with ``"kind"`` (``python``, ``static`` or ``script``) forces the kind;
2. an executable ``keg.build`` → ``script``;
3. ``requirements.txt``, ``Procfile`` or a ``*.py`` file at the top → ``python``;
4. ``index.html`` or a ``public/`` directory → ``static``.

Inside the build container the source is at ``/src`` (read-only), the
wheels of ``/pkgs/pypi`` a requirement needs at ``/wheels`` (read-only),
and ``/out`` is the only place written to keep: what the build leaves in
``/out/app`` becomes ``/app`` of the image.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import stat

from keg.errors import KegError

KINDS = ("python", "static", "script")
KEG_JSON = "keg.json"
KEG_BUILD = "keg.build"
PROCFILE = "Procfile"
REQUIREMENTS = "requirements.txt"
DEFAULT_BASE = "debian:bookworm"
MAX_SMALL_FILE = 1 << 20  # keg.json, Procfile and requirements files are read whole
MAX_REQUIREMENT_FILES = 16
STATIC_WEB = "python3 -m http.server $PORT --bind 0.0.0.0 --directory /app/public"
PYTHON_DEFAULT_WEB = "python3 app.py"

# A process type names a job (<app>-<type>), which must stay a DNS label.
PROCESS_TYPE_RE = re.compile(r"^[a-z][a-z0-9-]{0,29}$")
PROCFILE_LINE_RE = re.compile(r"^([A-Za-z0-9_-]+)\s*:\s*(.*)$")
# PEP 508: a name, optional [extras], then version specifiers, a URL (@) or a marker (;).
REQUIREMENT_RE = re.compile(r"^([A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?)\s*(\[[^\]]*\])?\s*(.*)$")

PIP = ("python3 -m pip install --no-index --find-links /wheels --target /out/app/.deps "
       "--no-cache-dir --disable-pip-version-check --no-input --progress-bar off")


class BuildFailed(KegError):
    """A build that did not produce an image; the message is what the pushing user sees at the end."""


# ---------------------------------------------------------------- files of the source

def _read_small(source_dir: str, name: str) -> str | None:
    """The text of a regular file at the top of the source (never through a symlink), or None."""
    path = os.path.join(source_dir, name)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as err:
        raise BuildFailed(f"{name} cannot be read ({err.strerror}); it must be a regular file, not a symlink") \
            from err
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise BuildFailed(f"{name} is not a regular file")
        data = f.read(MAX_SMALL_FILE + 1)
    if len(data) > MAX_SMALL_FILE:
        raise BuildFailed(f"{name} is larger than {MAX_SMALL_FILE >> 20} MiB")
    return data.decode("utf-8", "replace")


def _is_file(source_dir: str, name: str) -> bool:
    try:
        return stat.S_ISREG(os.lstat(os.path.join(source_dir, name)).st_mode)
    except OSError:
        return False


def read_settings(source_dir: str) -> dict:
    """The settings of ``keg.json`` ({} without one): ``kind`` and ``base`` are checked; others kept.

    Raises:
        BuildFailed: not JSON, not an object, an unknown kind or a base that is no image reference.
    """
    text = _read_small(source_dir, KEG_JSON)
    if text is None:
        return {}
    try:
        settings = json.loads(text)
    except ValueError as err:
        raise BuildFailed(f"{KEG_JSON} is not valid JSON: {err}") from err
    if not isinstance(settings, dict):
        raise BuildFailed(f'{KEG_JSON} must be a JSON object like {{"kind": "python", "base": "{DEFAULT_BASE}"}}')
    kind = settings.get("kind")
    if kind is not None and kind not in KINDS:
        raise BuildFailed(f"{KEG_JSON}: kind {kind!r} is not one Keg builds; use one of {', '.join(KINDS)}")
    base = settings.get("base")
    if base is not None:
        from keg import oci
        if not isinstance(base, str):
            raise BuildFailed(f"{KEG_JSON}: base must be an image name like {DEFAULT_BASE!r}, not {base!r}")
        try:
            oci.parse_reference(base)
        except oci.BadImage as err:
            raise BuildFailed(f"{KEG_JSON}: base {base!r}: {err}") from err
    return settings


def detect_kind(source_dir: str) -> tuple:
    """The kind of the source and its ``keg.json`` settings.

    Returns:
        ``(kind, settings)``.

    Raises:
        BuildFailed: a bad ``keg.json``, or nothing that says which kind it is.
    """
    settings = read_settings(source_dir)
    if settings.get("kind"):
        return settings["kind"], settings
    build_script = os.path.join(source_dir, KEG_BUILD)
    if _is_file(source_dir, KEG_BUILD):
        if not os.stat(build_script).st_mode & 0o111:
            raise BuildFailed(f"{KEG_BUILD} is not executable: `chmod +x {KEG_BUILD}` and commit it "
                              "(git keeps the executable bit)")
        return "script", settings
    names = os.listdir(source_dir)
    if REQUIREMENTS in names or PROCFILE in names or any(n.endswith(".py") and _is_file(source_dir, n)
                                                         for n in names):
        return "python", settings
    if _is_file(source_dir, "index.html") or os.path.isdir(os.path.join(source_dir, "public")) and \
            not os.path.islink(os.path.join(source_dir, "public")):
        return "static", settings
    raise BuildFailed("cannot tell what kind of app this is: Keg looked for keg.json (a \"kind\"), an executable "
                      "keg.build (script), requirements.txt, Procfile or *.py (python), and index.html or "
                      "public/ (static) at the top of the source, and found none")


# ---------------------------------------------------------------- Procfile

def parse_procfile(text: str, where: str = PROCFILE) -> dict:
    """``{type: command}`` from Procfile text (``type: command`` lines; ``#`` comments).

    Raises:
        BuildFailed: a malformed line, a type that cannot name a job, a type given twice.
    """
    processes: dict = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = PROCFILE_LINE_RE.match(line)
        if match is None:
            raise BuildFailed(f"{where} line {number}: {line!r} is not 'type: command'")
        kind, command = match.group(1), match.group(2).strip()
        if not PROCESS_TYPE_RE.match(kind):
            raise BuildFailed(f"{where} line {number}: process type {kind!r} must be lower-case letters, digits "
                              "and '-', starting with a letter, at most 30 characters (it names a job)")
        if not command:
            raise BuildFailed(f"{where} line {number}: process type {kind!r} has no command")
        if kind in processes:
            raise BuildFailed(f"{where} line {number}: process type {kind!r} is given twice")
        processes[kind] = command
    return processes


def source_processes(source_dir: str) -> dict | None:
    """The Procfile's process types, or None without a Procfile."""
    text = _read_small(source_dir, PROCFILE)
    return None if text is None else parse_procfile(text)


# ---------------------------------------------------------------- requirements

def normalize_name(name: str) -> str:
    """PEP 503: lower case, runs of ``-_.`` as one ``-`` (as ``/pkgs/pypi`` is laid out)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_requirements(source_dir: str, name: str = REQUIREMENTS, _seen=None) -> list:
    """The named requirements of a requirements file: ``[(normalized name, line)]``, following ``-r``.

    Only what can be installed from ``/pkgs/pypi`` is accepted: project names
    with extras, version specifiers and markers.

    Raises:
        BuildFailed: a URL, a path, an editable install, an index option, a file outside the source.
    """
    seen = set() if _seen is None else _seen
    if name in seen:
        return []
    seen.add(name)
    if len(seen) > MAX_REQUIREMENT_FILES:
        raise BuildFailed(f"more than {MAX_REQUIREMENT_FILES} requirement files are included with -r")
    norm = os.path.normpath(name)
    if norm.startswith("..") or os.path.isabs(norm):
        raise BuildFailed(f"requirement file {name!r} lies outside the source")
    text = _read_small(source_dir, norm)
    if text is None:
        raise BuildFailed(f"requirement file {name} is missing")
    found = []
    lines = text.replace("\\\n", " ").splitlines()
    for number, raw in enumerate(lines, 1):
        line = re.sub(r"(^|\s)#.*$", "", raw).strip()
        if not line:
            continue
        where = f"{name} line {number}"
        if line.startswith(("-r ", "--requirement", "-c ", "--constraint")):
            words = shlex.split(line)
            target = words[1] if len(words) > 1 else (line.split("=", 1)[1] if "=" in line else "")
            if not target:
                raise BuildFailed(f"{where}: {line!r} names no file")
            if words[0].startswith(("-r", "--requirement")):
                found += parse_requirements(source_dir, os.path.join(os.path.dirname(norm), target), seen)
            continue
        if line.startswith("-"):
            if line.startswith(("--hash", "--pre", "--prefer-binary", "--only-binary", "--no-binary")):
                continue  # harmless to an install from local wheels
            raise BuildFailed(f"{where}: {line!r}: requirements are installed only from the wheels in /pkgs/pypi, "
                              "so index, link and editable options are refused; remove the line")
        match = REQUIREMENT_RE.match(line)
        if match is None or match.group(3).lstrip().startswith("@") or "://" in line:
            raise BuildFailed(f"{where}: {line!r} is not a requirement Keg can install: give a project name "
                              "(with optional [extras] and version, like flask>=3) and import its wheel with "
                              "`keg pkg import`")
        found.append((normalize_name(match.group(1)), line))
    return found


def wheel_requirements(metadata: str) -> list:
    """The normalized project names a wheel's METADATA requires (``Requires-Dist``), markers ignored."""
    names = []
    for line in metadata.splitlines():
        if not line.strip():
            break  # the headers end at the first blank line; the description follows
        if line.lower().startswith("requires-dist:"):
            match = REQUIREMENT_RE.match(line.split(":", 1)[1].strip())
            if match:
                names.append(normalize_name(match.group(1)))
    return names


# ---------------------------------------------------------------- build scripts

def build_script(kind: str, source_dir: str) -> str:
    """The ``/bin/sh`` script the build container runs for ``kind``."""
    lines = ["set -eu", "umask 022"]
    if kind == "python":
        lines += ["echo '-----> Copying the source to /app'", "mkdir -p /out/app",
                  "cp -R /src/. /out/app/"]
        if _is_file(source_dir, REQUIREMENTS):
            lines += ["echo '-----> Installing requirements from /pkgs/pypi'",
                      f"{PIP} -r /src/{REQUIREMENTS}"]
        lines += ["echo '-----> Compiling Python files'",
                  "python3 -m compileall -q -x '/\\.deps/' /out/app >/dev/null || true"]
    elif kind == "static":
        top = "/src/public" if os.path.isdir(os.path.join(source_dir, "public")) and \
            not _is_file(source_dir, "index.html") else "/src"
        lines += [f"echo '-----> Copying {top} to /app/public'", "mkdir -p /out/app/public",
                  f"cp -R {top}/. /out/app/public/"]
        if top == "/src":
            lines += [f"rm -f /out/app/public/{n}" for n in (KEG_JSON, PROCFILE)]
    elif kind == "script":
        lines += [f"echo '-----> Running {KEG_BUILD}'", "cd /src", f"exec /src/{KEG_BUILD}"]
    else:
        raise BuildFailed(f"unknown build kind {kind!r}")
    return "\n".join(lines) + "\n"


def default_processes(kind: str, source_dir: str) -> dict | None:
    """Process types when the source has no Procfile (None: the kind has no default)."""
    if kind == "static":
        return {"web": STATIC_WEB}
    if kind == "python":
        if _is_file(source_dir, "app.py"):
            return {"web": PYTHON_DEFAULT_WEB}
        raise BuildFailed("no Procfile and no app.py: add a Procfile with a line like `web: python3 app.py` "
                          "(the web process must listen on $PORT)")
    return None
