"""The OCI runtime configuration (runc's ``config.json``) of one process: image config plus
process spec, with the Mayor's confinement applied (DESIGN §2, §5.4).

Confinement, whatever the spec says:

- a user namespace: container ids 0..65535 map to host ids ``id_base``.. (one
  range per machine, 100000 by default), so container root is an unprivileged
  host user. The layer cache is unpacked with ownership shifted by the same
  base (``mayor.layers``), because runc 1.1 cannot idmap the root filesystem;
  a per-container range would need a private copy of every layer, so
  containers of one machine share the range and are kept apart by the other
  namespaces, not by uid;
- private pid, ipc, uts, mount and cgroup namespaces, and a private network
  namespace (loopback only) unless ``network`` is ``host``;
- Docker's default capabilities minus ``NET_RAW``; no new privileges;
- a seccomp filter that allows by default and refuses with ``EPERM`` the
  system calls a container has no business making (mounting, namespaces,
  modules, keyrings, tracing other processes, clocks, BPF, io_uring…);
- runc's default masked and read-only paths; ``/sys`` read-only;
- cgroup limits: memory (swap disabled by setting memory+swap to the same
  value), a CPU quota over a 100 ms period, a pids limit.

Working directories under ``/proc`` (the CVE-2024-21626 class, e.g.
``/proc/self/fd/7``) or relative are refused, also when a symlink in the
image leads there. Users given by name are looked up in the image's
``/etc/passwd`` and ``/etc/group``, read inside the root filesystem without
following symlinks out of it; the host's files are never consulted.
"""

from __future__ import annotations

import collections
import json
import math
import os
import platform
import re
import stat

from keg.errors import KegError
from mayor.layers import ID_RANGE
from mayor.plan import BACKOFF_MAX, BACKOFF_START

ID_BASE = 100000
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CPU_PERIOD = 100_000  # microseconds
MIN_CPU_QUOTA = 1000  # the kernel refuses quotas under 1 ms
MIN_MEMORY = 6 * 1024 * 1024  # as Docker: below this the runtime itself cannot start
MAX_MEMORY = 2**62
RESTART_POLICIES = ("always", "on-failure", "never")
NETWORKS = ("private", "none", "host")
MAX_ID_FILE = 4 * 1024 * 1024  # /etc/passwd or /etc/group larger than this is not believed
MAX_SYMLINKS = 40
HEALTH_DEFAULTS = {"interval": 10.0, "timeout": 5.0, "threshold": 3, "start_period": 0.0, "restart_on_failure": True}
HEALTH_KEYS = ("exec", "http", "tcp", *HEALTH_DEFAULTS)
PROBES = ("exec", "http", "tcp")
# The runtime's own check of a process with a port and no health check: it is "starting", and gets no
# requests, until something accepts connections on 127.0.0.1:port in its network namespace (as Heroku
# waits for a web process to bind $PORT); then "healthy", and no more checks. Never "unhealthy", never
# restarted: tried every 0.25 s for the first minute (start_period), then every 2 s (the shim's SLOW_INTERVAL).
READY_CHECK = {"interval": 0.25, "timeout": 2.0, "threshold": 1, "start_period": 60.0,
               "restart_on_failure": False, "until_ready": True}
STOP_GRACE = 10.0  # seconds between SIGTERM and SIGKILL
STOP_DRAIN = 2.0   # seconds a process with a port keeps serving after it left the table, before its SIGTERM
INIT_PATH = "/dev/init"  # where a container sees the init the machine gives it (as Docker's --init)
MAX_SECONDS = 7 * 24 * 3600.0  # no interval, timeout or grace is believed beyond a week

# Docker's default capability set, without NET_RAW (raw sockets allow spoofing on shared networks).
CAPABILITIES = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
]

# Refused with EPERM. Names this kernel or libseccomp does not know are skipped by runc.
DENIED_SYSCALLS = [
    # file systems and mounts (including the new mount API)
    "mount", "umount", "umount2", "pivot_root", "fsopen", "fsconfig", "fsmount", "fspick",
    "move_mount", "open_tree", "mount_setattr", "quotactl", "quotactl_fd", "nfsservctl", "sysfs",
    "open_by_handle_at", "name_to_handle_at", "fanotify_init", "lookup_dcookie",
    # namespaces
    "unshare", "setns",
    # kernel, modules, power
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module", "create_module",
    "get_kernel_syms", "query_module", "reboot", "swapon", "swapoff", "acct", "syslog", "_sysctl",
    "uselib", "vhangup", "iopl", "ioperm", "vm86", "vm86old",
    # tracing and other processes' memory
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd", "process_madvise",
    "perf_event_open", "bpf", "userfaultfd",
    # keyrings
    "keyctl", "add_key", "request_key",
    # clocks
    "clock_settime", "clock_settime64", "clock_adjtime", "clock_adjtime64", "settimeofday", "stime",
    "adjtimex",
    # io_uring bypasses seccomp for the operations it performs
    "io_uring_setup", "io_uring_enter", "io_uring_register",
]  # fmt: skip

# clone() with a namespace flag: refused like unshare(); clone3 hides its flags from seccomp,
# so it answers ENOSYS and the C library falls back to clone().
CLONE_NAMESPACE_FLAGS = [0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000]
EPERM, ENOSYS = 1, 38
AF_VSOCK = 40

SECCOMP_ARCHES = {
    "x86_64": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
    "aarch64": ["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"],
    "ppc64le": ["SCMP_ARCH_PPC64LE"],
    "s390x": ["SCMP_ARCH_S390X", "SCMP_ARCH_S390"],
    "riscv64": ["SCMP_ARCH_RISCV64"],
}

MASKED_PATHS = [
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
]
READONLY_PATHS = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]

_MEMORY_UNITS = {
    "": 1,
    "k": 1000,
    "K": 1000,
    "M": 1000**2,
    "G": 1000**3,
    "T": 1000**4,
    "Ki": 1024,
    "Mi": 1024**2,
    "Gi": 1024**3,
    "Ti": 1024**4,
}
_MEMORY_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*$")
_ENV_NAME_RE = re.compile(r"^[^=\0]+$")


class SpecError(KegError):
    """A process spec or image config that cannot run as asked; nothing was started."""

    exit_code = 2


# ---------------------------------------------------------------------------
# validation


def parse_memory(value) -> int:
    """Bytes from an int or a string such as ``"64Mi"``, ``"1.5G"``, ``"1048576"``.

    Raises:
        SpecError: not a size, or negative.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise SpecError(f"memory must be a number of bytes or a string like '64Mi', not {value!r}")
    if isinstance(value, (int, float)):
        number = value
    else:
        match = _MEMORY_RE.match(value)
        if not match or match.group(2) not in _MEMORY_UNITS:
            raise SpecError(f"memory {value!r} is not a size; write bytes or a number with Ki, Mi, Gi, Ti, k, M, G, T")
        number = float(match.group(1)) * _MEMORY_UNITS[match.group(2)]
    if not math.isfinite(number) or number > MAX_MEMORY:
        raise SpecError(f"memory {value!r} is not a believable size")
    if number < 0:
        raise SpecError(f"memory must not be negative: {value!r}")
    return int(number)


def check_working_dir(path, what: str = "working directory") -> str:
    """A normalised absolute container path, refusing relative paths and anything under /proc.

    Raises:
        SpecError: relative, not a string, or under ``/proc`` (CVE-2024-21626 class).
    """
    if not isinstance(path, str) or not path or "\0" in path:
        raise SpecError(f"{what} must be a non-empty string without NUL bytes, not {path!r}")
    if not path.startswith("/"):
        raise SpecError(f"{what} {path!r} is relative; give an absolute path inside the container")
    norm = os.path.normpath(path)
    norm = "/" + norm.lstrip("/")
    if norm == "/proc" or norm.startswith("/proc/"):
        raise SpecError(
            f"{what} {path!r} is under /proc; refused, a working directory there can reach host "
            "file descriptors (CVE-2024-21626)"
        )
    return norm


def _check_args(args, what: str) -> list:
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise SpecError(f"{what} must be a list of strings, not {args!r}")
    if any("\0" in a for a in args):
        raise SpecError(f"{what} must not contain NUL bytes")
    return list(args)


def _check_env(env, what: str) -> dict:
    """{name: value} from a {name: value} dict or a ["NAME=value"] list (a later definition wins)."""
    if env is None:
        return {}
    if isinstance(env, dict):
        pairs = list(env.items())
    elif isinstance(env, list) and all(isinstance(e, str) for e in env):
        pairs = [tuple(e.split("=", 1)) if "=" in e else (e, None) for e in env]
    else:
        raise SpecError(f"{what} must be a mapping of names to strings or a list of 'NAME=value', not {env!r}")
    for name, value in pairs:
        if not isinstance(name, str) or not _ENV_NAME_RE.match(name):
            raise SpecError(f"{what}: {name!r} is not a valid variable name")
        if not isinstance(value, str) or "\0" in value:
            raise SpecError(f"{what}: {name} must have a string value without NUL bytes, not {value!r}")
    out = {}
    for name, value in pairs:
        out.pop(name, None)  # a redefinition takes the later place in the order
        out[name] = value
    return out


def _check_user(user, what: str):
    if user is None:
        return None
    if isinstance(user, int) and not isinstance(user, bool):
        user = str(user)
    if not isinstance(user, str) or not re.match(r"^[^:\0\s]+(:[^:\0\s]+)?$", user):
        raise SpecError(f"{what} must be 'uid[:gid]' or 'name[:group]', not {user!r}")
    return user


def _check_resources(resources, capacity) -> dict:
    if resources is None:
        resources = {}
    if not isinstance(resources, dict):
        raise SpecError(f"resources must be a mapping with cpu, memory, pids; not {resources!r}")
    unknown = set(resources) - {"cpu", "memory", "pids"}
    if unknown:
        raise SpecError(f"unknown resources {sorted(unknown)}; known: cpu, memory, pids")
    out = {"cpu": None, "memory": None, "pids": None}
    cpu = resources.get("cpu")
    if cpu is not None:
        if isinstance(cpu, bool) or not isinstance(cpu, (int, float)) or not math.isfinite(cpu) or cpu <= 0:
            raise SpecError(f"resources.cpu must be a positive number of cores, not {cpu!r}")
        if cpu * CPU_PERIOD < MIN_CPU_QUOTA:
            raise SpecError(f"resources.cpu {cpu} is below the minimum of {MIN_CPU_QUOTA / CPU_PERIOD} cores")
        if capacity and capacity.get("cpus") is not None and cpu > capacity["cpus"]:
            raise SpecError(f"resources.cpu {cpu} exceeds this machine's {capacity['cpus']} cpus")
        out["cpu"] = float(cpu)
    if resources.get("memory") is not None:
        memory = parse_memory(resources["memory"])
        if memory < MIN_MEMORY:
            raise SpecError(f"resources.memory {memory} bytes is below the minimum of {MIN_MEMORY} bytes (6Mi)")
        if capacity and capacity.get("memory") is not None and memory > parse_memory(capacity["memory"]):
            raise SpecError(f"resources.memory {memory} bytes exceeds this machine's {capacity['memory']}")
        out["memory"] = memory
    pids = resources.get("pids")
    if pids is not None:
        if isinstance(pids, bool) or not isinstance(pids, int) or pids < 1:
            raise SpecError(f"resources.pids must be a positive integer, not {pids!r}")
        out["pids"] = pids
    return out


def _check_mounts(mounts) -> list:
    if mounts is None:
        return []
    if not isinstance(mounts, list):
        raise SpecError(f"mounts must be a list, not {mounts!r}")
    out = []
    for m in mounts:
        if not isinstance(m, dict) or not isinstance(m.get("source"), str) or not isinstance(m.get("destination"), str):
            raise SpecError(f"each mount needs a string source and destination, not {m!r}")
        if not m["source"].startswith("/"):
            raise SpecError(f"mount source {m['source']!r} must be an absolute host path")
        dest = check_working_dir(m["destination"], "mount destination")
        if dest == "/" or dest == "/sys" or dest.startswith("/sys/") or dest == "/dev" or dest.startswith("/dev/"):
            raise SpecError(f"mount destination {dest!r} would cover the root filesystem, /sys or /dev")
        readonly = m.get("readonly", True)
        if not isinstance(readonly, bool):
            raise SpecError(f"mount readonly must be true or false, not {readonly!r}")
        out.append({"source": os.path.normpath(m["source"]), "destination": dest, "readonly": readonly})
    return out


def _seconds(value, what: str, zero_ok: bool = False) -> float:
    """A finite number of seconds, > 0 (or >= 0 with ``zero_ok``) and at most a week."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SpecError(f"{what} must be a number of seconds, not {value!r}")
    if value < 0 or (value == 0 and not zero_ok):
        raise SpecError(f"{what} must be {'zero or more' if zero_ok else 'more than zero'} seconds, not {value!r}")
    if value > MAX_SECONDS:
        raise SpecError(f"{what} {value!r} is more than a week; give seconds (at most {int(MAX_SECONDS)})")
    return float(value)


def _check_port(port, what: str) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise SpecError(f"{what} must be a TCP port number 1..65535, not {port!r}")
    return port


def _check_http_probe(http, default_port=None) -> dict:
    if not isinstance(http, dict):
        raise SpecError(f'health.http must be an object like {{"port": 8080, "path": "/"}}, not {http!r}')
    unknown = set(http) - {"port", "path"}
    if unknown:
        raise SpecError(f"unknown keys in health.http: {sorted(unknown)}; known: port, path")
    port = http.get("port", default_port)
    if port is None:
        raise SpecError("health.http.port is missing; give the port to check (or a 'port' for the process)")
    port = _check_port(port, "health.http.port")
    path = http.get("path", "/")
    if not isinstance(path, str) or not path.startswith("/") or any(c.isspace() or c == "\0" for c in path):
        raise SpecError(f"health.http.path must be an absolute URL path such as '/healthz' without spaces, "
                        f"not {path!r}")
    return {"port": port, "path": path}


def _check_tcp_probe(tcp, default_port=None) -> dict:
    if not isinstance(tcp, dict) or set(tcp) - {"port"}:
        raise SpecError(f'health.tcp must be an object like {{"port": 8080}}, not {tcp!r}')
    port = tcp.get("port", default_port)
    if port is None:
        raise SpecError("health.tcp.port is missing; give the port to check (or a 'port' for the process)")
    return {"port": _check_port(port, "health.tcp.port")}


def ready_check(port: int | None) -> dict | None:
    """The check the runtime runs on a process with ``port`` and no health check of its own (``READY_CHECK``).

    Args:
        port: the process's ``port``, or None.

    Returns:
        a normalised ``tcp`` health check that ends at its first success, or None without a port.
    """
    return None if port is None else {"tcp": {"port": port}, **READY_CHECK}


def _check_health(health, default_port=None):
    """The normalised health check (all fields present), or None without one.

    An HTTP or TCP check without a port checks ``default_port``: the process's own ``port``.
    """
    if health is None:
        return None
    if not isinstance(health, dict):
        raise SpecError(f'health must be an object like {{"exec": ["cmd", "arg"]}} or '
                        f'{{"http": {{"port": 8080, "path": "/"}}}}, not {health!r}')
    unknown = set(health) - set(HEALTH_KEYS)
    if unknown:
        raise SpecError(f"unknown keys in health: {sorted(unknown)}; known: {', '.join(HEALTH_KEYS)}")
    if sum(probe in health for probe in PROBES) != 1:
        raise SpecError("health needs exactly one check: 'exec' (a command run in the container), "
                        "'http' (a port and path to GET) or 'tcp' (a port that accepts connections)")
    out = dict(HEALTH_DEFAULTS)
    if "exec" in health:
        command = _check_args(health["exec"], "health.exec")
        if not command:
            raise SpecError("health.exec is empty; give the command to run, e.g. [\"/bin/check\"]")
        out["exec"] = command
    elif "http" in health:
        out["http"] = _check_http_probe(health["http"], default_port)
    else:
        out["tcp"] = _check_tcp_probe(health["tcp"], default_port)
    for key in ("interval", "timeout"):
        if key in health:
            out[key] = _seconds(health[key], f"health.{key}")
    if "start_period" in health:
        out["start_period"] = _seconds(health["start_period"], "health.start_period", zero_ok=True)
    threshold = health.get("threshold", out["threshold"])
    if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 1:
        raise SpecError(f"health.threshold (failures in a row before unhealthy) must be a positive integer, "
                        f"not {threshold!r}")
    out["threshold"] = threshold
    restart = health.get("restart_on_failure", True)
    if not isinstance(restart, bool):
        raise SpecError(f"health.restart_on_failure must be true or false, not {restart!r}")
    out["restart_on_failure"] = restart
    return out


def _check_backoff(backoff):
    """``{"start": s, "max": s}`` with both present, or None to use the Mayor's defaults."""
    if backoff is None:
        return None
    if not isinstance(backoff, dict):
        raise SpecError(f'backoff must be an object like {{"start": 10, "max": 300}}, not {backoff!r}')
    unknown = set(backoff) - {"start", "max"}
    if unknown:
        raise SpecError(f"unknown keys in backoff: {sorted(unknown)}; known: start, max")
    out = {"start": BACKOFF_START, "max": BACKOFF_MAX}
    for key in ("start", "max"):
        if key in backoff:
            out[key] = _seconds(backoff[key], f"backoff.{key}")
    if out["max"] < out["start"]:
        raise SpecError(f"backoff.max ({out['max']:g} s) is less than backoff.start ({out['start']:g} s); "
                        "the delay starts at 'start' and doubles up to 'max'")
    return out


def validate_spec(spec, capacity=None) -> dict:
    """Check a process spec and return it normalised, before anything is written or started.

    Args:
        spec: a process spec (DESIGN §2): ``args``, ``env``, ``cwd``, ``user``,
            ``resources`` {cpu, memory, pids}, ``restart``, ``network``, ``port``
            (the TCP port the process serves on: its endpoint, and the default port of an HTTP check)
            (``private``/``none``/``host``), ``readonly_rootfs``, ``mounts``
            [{source, destination, readonly=True}], ``health`` ({exec: [args]},
            {http: {port, path}} or {tcp: {port}}, with interval, timeout, threshold,
            start_period, restart_on_failure), ``backoff`` {start, max},
            ``stop_grace`` and ``stop_drain`` (seconds); other keys are kept as they are.
        capacity: the machine's capacity ({cpus, memory}) to check limits
            against, or None to skip that check.

    Returns:
        A new dict: ``args`` a list or None (use the image's), ``env`` a
        {name: value} dict, ``cwd``/``user`` a string or None,
        ``resources`` with ``memory`` in bytes, ``restart`` (default
        ``always``), ``network`` (default ``private``), ``readonly_rootfs``
        (default False), ``mounts`` a list, ``health`` with every field
        filled in (or None), ``backoff`` {start, max} (or None for the
        Mayor's defaults), ``stop_grace`` in seconds (default 10), ``stop_drain``
        in seconds (default 2 with a ``port``, else 0).

    Raises:
        SpecError: what is wrong, in words a person can act on.
    """
    if not isinstance(spec, dict):
        raise SpecError(f"a process spec must be a JSON object, not {type(spec).__name__}")
    out = dict(spec)
    image = spec.get("image")
    if image is not None and (not isinstance(image, str) or not image):
        raise SpecError(f"image must be a KID string, not {image!r}")
    args = spec.get("args")
    if args is not None:
        args = _check_args(args, "args")
        if not args:
            raise SpecError("args is empty; leave it out to run the image's entrypoint and command")
    out["args"] = args
    out["env"] = _check_env(spec.get("env"), "env")
    out["cwd"] = None if spec.get("cwd") is None else check_working_dir(spec["cwd"], "cwd")
    out["user"] = _check_user(spec.get("user"), "user")
    out["resources"] = _check_resources(spec.get("resources"), capacity)
    restart = spec.get("restart", "always")
    if restart not in RESTART_POLICIES:
        raise SpecError(f"unknown restart policy {restart!r}; use one of {', '.join(RESTART_POLICIES)}")
    out["restart"] = restart
    network = spec.get("network", "private")
    if network not in NETWORKS:
        raise SpecError(f"unknown network {network!r}; use one of {', '.join(NETWORKS)}")
    out["network"] = network
    readonly = spec.get("readonly_rootfs", False)
    if not isinstance(readonly, bool):
        raise SpecError(f"readonly_rootfs must be true or false, not {readonly!r}")
    out["readonly_rootfs"] = readonly
    out["mounts"] = _check_mounts(spec.get("mounts"))
    port = spec.get("port")
    out["port"] = None if port is None else _check_port(port, "port")
    out["health"] = _check_health(spec.get("health"), out["port"])
    out["backoff"] = _check_backoff(spec.get("backoff"))
    grace = spec.get("stop_grace")
    out["stop_grace"] = STOP_GRACE if grace is None else _seconds(grace, "stop_grace", zero_ok=True)
    drain = spec.get("stop_drain")
    if drain is None:
        drain = STOP_DRAIN if out["port"] is not None else 0.0
    out["stop_drain"] = _seconds(drain, "stop_drain", zero_ok=True)
    init = spec.get("init", True)
    if not isinstance(init, bool):
        raise SpecError(f"init must be true or false, not {init!r}")
    out["init"] = init
    return out


def image_process(image_config) -> dict:
    """The process defaults of an OCI image config, checked.

    Args:
        image_config: the image config JSON (with a ``config`` object), or
            that ``config`` object itself.

    Returns:
        {entrypoint, cmd, env ({name: value}), cwd (or None), user (or None)}.

    Raises:
        SpecError: malformed fields, or a WorkingDir under /proc or relative.
    """
    if image_config is None:
        image_config = {}
    if not isinstance(image_config, dict):
        raise SpecError("the image config must be a JSON object")
    config = image_config.get("config", image_config) if "config" in image_config else image_config
    config = config or {}
    if not isinstance(config, dict):
        raise SpecError("the image config's 'config' must be a JSON object")
    entrypoint = _check_args(config.get("Entrypoint") or [], "image Entrypoint")
    cmd = _check_args(config.get("Cmd") or [], "image Cmd")
    workdir = config.get("WorkingDir") or None
    return {
        "entrypoint": entrypoint,
        "cmd": cmd,
        "env": _check_env(config.get("Env"), "image Env"),
        "cwd": None if workdir is None else check_working_dir(workdir, "image WorkingDir"),
        "user": _check_user(config.get("User") or None, "image User"),
    }


# ---------------------------------------------------------------------------
# reading the image's root filesystem


def resolve_in_rootfs(rootfs: str, path: str) -> str:
    """The container path ``path`` becomes once symlinks inside ``rootfs`` are followed, scoped to it.

    Absolute symlink targets and ``..`` are interpreted with ``rootfs`` as
    ``/``, as the kernel will inside the container; missing components are kept
    as written.

    Raises:
        SpecError: more than 40 symlinks.
    """
    pending = collections.deque(p for p in path.split("/") if p)
    resolved = []
    links = 0
    while pending:
        comp = pending.popleft()
        if comp == ".":
            continue
        if comp == "..":
            if resolved:
                resolved.pop()
            continue
        host = os.path.join(rootfs, *resolved, comp)
        try:
            st = os.lstat(host)
        except (FileNotFoundError, NotADirectoryError):
            resolved.append(comp)
            continue
        if not stat.S_ISLNK(st.st_mode):
            resolved.append(comp)
            continue
        links += 1
        if links > MAX_SYMLINKS:
            raise SpecError(f"too many symlinks resolving {path!r} in the image")
        target = os.readlink(host)
        if target.startswith("/"):
            resolved = []
        pending.extendleft(reversed([p for p in target.split("/") if p]))
    return "/" + "/".join(resolved)


def _under(path: str, tops) -> bool:
    return any(path == top or path.startswith(top.rstrip("/") + "/") for top in tops)


def check_program(rootfs: str, program: str, cwd: str, env: list, mounts: list) -> None:
    """Refuse a program the image does not have, as runc would when it starts the process.

    Under an init, a missing program would otherwise start a container whose
    init reports exit 127 a moment later; the user deserves the reason now.
    A program on a mounted path (the spec's mounts, /dev, /proc, /sys) cannot
    be checked here and is let through.

    Raises:
        SpecError: no executable file of that name in the image.
    """
    if "/" in program:
        candidates = [program if program.startswith("/") else os.path.join(cwd, program)]
    else:
        path = next((e[5:] for e in reversed(env) if e.startswith("PATH=")), DEFAULT_PATH)
        candidates = [os.path.join(d or ".", program) if d.startswith("/") else os.path.join(cwd, d, program)
                      for d in path.split(":")]
    mounted = ["/dev", "/proc", "/sys", *(m["destination"] for m in mounts)]
    for candidate in candidates:
        inside = resolve_in_rootfs(rootfs, os.path.normpath(candidate))
        if _under(os.path.normpath(candidate), mounted) or _under(inside, mounted):
            return
        try:
            st = os.stat(os.path.join(rootfs, inside.lstrip("/")), follow_symlinks=False)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) and st.st_mode & 0o111:
            return
    where = "" if "/" in program else " on PATH"
    raise SpecError(f"cannot run {program!r}: no such executable file{where} in the image")


def _read_rootfs_file(rootfs: str, path: str):
    """The text of a regular file inside the image, or None if it does not exist."""
    inside = resolve_in_rootfs(rootfs, path)
    try:
        fd = os.open(os.path.join(rootfs, inside.lstrip("/")), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        raise SpecError(f"cannot read {path} in the image: {e.strerror}") from e
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise SpecError(f"{path} in the image is not a regular file")
        data = f.read(MAX_ID_FILE + 1)
    if len(data) > MAX_ID_FILE:
        raise SpecError(f"{path} in the image is larger than {MAX_ID_FILE} bytes")
    return data.decode("utf-8", errors="replace")


def _id_table(text, fields: int) -> list:
    rows = []
    for line in (text or "").splitlines():
        if not line or line.startswith("#"):
            continue
        parts = line.split(":")
        if len(parts) < fields or not parts[2].isdigit():
            continue
        rows.append(parts)
    return rows


def _check_id(value: int, kind: str, user: str) -> int:
    if not 0 <= value < ID_RANGE:
        raise SpecError(f"user {user!r}: {kind} {value} is outside the container's id range 0..{ID_RANGE - 1}")
    return value


def resolve_user(user, rootfs: str) -> dict:
    """Numeric ids for ``user`` ("uid[:gid]" or "name[:group]"), from the image's own files.

    Returns:
        {uid, gid, additional_gids, home}.

    Raises:
        SpecError: a name the image's /etc/passwd or /etc/group does not
            know, or an id outside 0..65535.
    """
    user = user or "0"
    name, _, group = user.partition(":")
    passwd = _id_table(_read_rootfs_file(rootfs, "/etc/passwd"), 7)
    entry = None
    if name.isdigit():
        uid = int(name)
        entry = next((row for row in passwd if int(row[2]) == uid), None)
    else:
        entry = next((row for row in passwd if row[0] == name), None)
        if entry is None:
            raise SpecError(f"user {name!r} is not in the image's /etc/passwd")
        uid = int(entry[2])
    groups = None
    if group:
        if group.isdigit():
            gid = int(group)
        else:
            groups = _id_table(_read_rootfs_file(rootfs, "/etc/group"), 3)
            row = next((row for row in groups if row[0] == group), None)
            if row is None:
                raise SpecError(f"group {group!r} is not in the image's /etc/group")
            gid = int(row[2])
    else:
        gid = int(entry[3]) if entry is not None and entry[3].isdigit() else 0
    additional = []
    if entry is not None:
        additional.append(gid)  # as a login would: the primary group is among the supplementary ones
        if groups is None:
            groups = _id_table(_read_rootfs_file(rootfs, "/etc/group"), 3)
        for row in groups:
            members = row[3].split(",") if len(row) > 3 else []
            if entry[0] in members and int(row[2]) != gid and int(row[2]) not in additional:
                additional.append(int(row[2]))
    for value in (uid, gid, *additional):
        _check_id(value, "id", user)
    home = entry[5] if entry is not None and entry[5].startswith("/") else "/"
    return {"uid": uid, "gid": gid, "additional_gids": additional, "home": home}


# ---------------------------------------------------------------------------
# the configuration


def default_seccomp(machine: str = None) -> dict:
    """The Mayor's seccomp profile (OCI runtime-spec form) for this or the named architecture."""
    arches = SECCOMP_ARCHES.get(machine or platform.machine(), [])
    rules = [{"names": list(DENIED_SYSCALLS), "action": "SCMP_ACT_ERRNO", "errnoRet": EPERM}]
    for flag in CLONE_NAMESPACE_FLAGS:
        rules.append(
            {
                "names": ["clone"],
                "action": "SCMP_ACT_ERRNO",
                "errnoRet": EPERM,
                "args": [{"index": 0, "value": flag, "valueTwo": flag, "op": "SCMP_CMP_MASKED_EQ"}],
            }
        )
    rules.append({"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": ENOSYS})
    rules.append(
        {
            "names": ["socket"],
            "action": "SCMP_ACT_ERRNO",
            "errnoRet": EPERM,
            "args": [{"index": 0, "value": AF_VSOCK, "op": "SCMP_CMP_EQ"}],
        }
    )
    return {"defaultAction": "SCMP_ACT_ALLOW", "architectures": arches, "syscalls": rules}


def _mounts(network: str, extra: list, init: str | None) -> list:
    mounts = [
        {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
        {
            "destination": "/dev",
            "type": "tmpfs",
            "source": "tmpfs",
            "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
        },
        {
            "destination": "/dev/pts",
            "type": "devpts",
            "source": "devpts",
            "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"],
        },
        {
            "destination": "/dev/shm",
            "type": "tmpfs",
            "source": "shm",
            "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        },
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
    ]
    if network == "host":
        # A user namespace may mount sysfs only with a network namespace of its own: bind the host's, read-only.
        sys_mount = {"type": "none", "source": "/sys", "options": ["rbind", "nosuid", "noexec", "nodev", "ro"]}
        mounts.append({"destination": "/sys", **sys_mount})
    else:
        sys_mount = {"type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]}
        mounts.append({"destination": "/sys", **sys_mount})
        mounts.append(
            {
                "destination": "/sys/fs/cgroup",
                "type": "cgroup",
                "source": "cgroup",
                "options": ["nosuid", "noexec", "nodev", "relatime", "ro"],
            }
        )
    if init is not None:
        mounts.append({"destination": INIT_PATH, "type": "bind", "source": init,
                       "options": ["bind", "nosuid", "nodev", "ro"]})
    for m in extra:
        options = ["rbind", "nosuid", "nodev", "ro" if m["readonly"] else "rw"]
        mounts.append({"destination": m["destination"], "type": "bind", "source": m["source"], "options": options})
    return mounts


def _resources(resources: dict) -> dict:
    out = {"devices": [{"allow": False, "access": "rwm"}]}
    if resources["memory"] is not None:
        out["memory"] = {"limit": resources["memory"], "swap": resources["memory"]}
    if resources["cpu"] is not None:
        out["cpu"] = {"quota": max(MIN_CPU_QUOTA, int(resources["cpu"] * CPU_PERIOD)), "period": CPU_PERIOD}
    if resources["pids"] is not None:
        out["pids"] = {"limit": resources["pids"]}
    return out


def _environment(image_env: dict, spec_env: dict, home: str) -> list:
    merged = dict(image_env)
    for name, value in spec_env.items():
        merged.pop(name, None)  # the spec wins, and its definition takes the later place in the order
        merged[name] = value
    merged.setdefault("PATH", DEFAULT_PATH)
    merged.setdefault("HOME", home)
    return [f"{name}={value}" for name, value in merged.items()]


def check_searchable(rootfs: str) -> None:
    """Refuse a root filesystem the container's (unprivileged) root could not reach.

    Raises:
        SpecError: a directory above ``rootfs`` lacks o+x, saying which and how to fix it.
    """
    path = os.path.dirname(os.path.abspath(rootfs))
    while True:
        if not os.stat(path).st_mode & stat.S_IXOTH:
            raise SpecError(
                f"the container's root filesystem {rootfs} lies beneath {path}, which others cannot search; "
                f"runc mounts it as an unprivileged user: run `chmod o+x {path}` or keep bundles elsewhere"
            )
        if path == "/":
            return
        path = os.path.dirname(path)


def build_config(
    image_config,
    spec,
    rootfs: str,
    *,
    hostname: str = "keg",
    cgroups_path: str = None,
    id_base: int = ID_BASE,
    capacity=None,
    init: str | None = None,
) -> dict:
    """The runc ``config.json`` for running ``spec`` from an image, as a dict.

    Reads only the image's /etc/passwd and /etc/group under ``rootfs``; never
    calls runc. Everything is checked before the config is returned.

    Args:
        image_config: the OCI image config (or its ``config`` object).
        spec: the process spec; see ``validate_spec``.
        rootfs: the mounted root filesystem (``mount_rootfs`` target). Every
            directory above it must be searchable by others (mode o+x):
            runc mounts it from inside the user namespace, as host uid
            ``id_base``, which has no rights over root's private directories.
        hostname: the container's host name.
        cgroups_path: the container's cgroup. The Mayor should give an
            absolute path such as ``/keg/<id>`` so containers outlive a restart
            of the Mayor's own service; a relative path is taken beneath runc's
            own cgroup (tests use this). None leaves it to runc.
        id_base: first host uid/gid of the machine's user-namespace range; the
            layers must have been unpacked with ``uid_shift=id_base``.
        capacity: the machine's capacity for ``validate_spec``.
        init: a statically linked init on the host (tini-static), or None.
            Unless the spec says ``"init": false`` it is bound read-only at
            /dev/init and runs the process as its child: the process is then
            not PID 1 of its namespace, where the kernel drops every signal
            it has no handler for, so SIGTERM stops it as it would anywhere
            else, and orphans it leaves are reaped.

    Returns:
        The configuration, ready for ``write_config``.

    Raises:
        SpecError: the spec or the image cannot run as asked (no command, a
            working directory under /proc, an unknown user, a bad limit…), or
            ``rootfs`` lies beneath a directory the container cannot search.
    """
    spec = validate_spec(spec, capacity)
    check_searchable(rootfs)
    image = image_process(image_config)
    args = spec["args"] if spec["args"] is not None else image["entrypoint"] + image["cmd"]
    if not args:
        raise SpecError("nothing to run: the spec has no args and the image has no Entrypoint or Cmd")
    cwd = spec["cwd"] or image["cwd"] or "/"
    check_working_dir(resolve_in_rootfs(rootfs, cwd), f"working directory {cwd!r} (after following symlinks)")
    user = resolve_user(spec["user"] or image["user"], rootfs)
    env = _environment(image["env"], spec["env"], user["home"])
    check_program(rootfs, args[0], cwd, env, spec["mounts"])
    if init is not None and spec["init"]:
        args = [INIT_PATH, "--", *args]
    else:
        init = None
    namespaces = [{"type": t} for t in ("pid", "ipc", "uts", "mount", "user", "cgroup")]
    if spec["network"] != "host":
        namespaces.append({"type": "network"})
    linux = {
        "uidMappings": [{"containerID": 0, "hostID": id_base, "size": ID_RANGE}],
        "gidMappings": [{"containerID": 0, "hostID": id_base, "size": ID_RANGE}],
        "namespaces": namespaces,
        "resources": _resources(spec["resources"]),
        "seccomp": default_seccomp(),
        "maskedPaths": list(MASKED_PATHS),
        "readonlyPaths": list(READONLY_PATHS),
    }
    if cgroups_path:
        linux["cgroupsPath"] = cgroups_path
    process = {
        "terminal": False,
        "user": {"uid": user["uid"], "gid": user["gid"]},
        "args": args,
        "env": env,
        "cwd": cwd,
        "capabilities": {
            "bounding": list(CAPABILITIES),
            "effective": list(CAPABILITIES),
            "permitted": list(CAPABILITIES),
            "inheritable": [],
            "ambient": [],
        },
        "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
        "noNewPrivileges": True,
    }
    if user["additional_gids"]:
        process["user"]["additionalGids"] = user["additional_gids"]
    return {
        "ociVersion": "1.0.2",
        "process": process,
        "root": {"path": os.path.abspath(rootfs), "readonly": spec["readonly_rootfs"]},
        "hostname": hostname,
        "mounts": _mounts(spec["network"], spec["mounts"], init),
        "linux": linux,
    }


def write_config(bundle: str, config: dict) -> str:
    """Write ``config`` as ``bundle/config.json`` atomically (mode 0600: it holds the environment).

    Returns:
        The path written.
    """
    os.makedirs(bundle, exist_ok=True)
    path = os.path.join(bundle, "config.json")
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)
    return path
