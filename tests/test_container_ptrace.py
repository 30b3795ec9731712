"""Inside a container, ptrace of another process fails: the seccomp profile refuses the call.

busybox has no ptrace applet, so the test carries its own program: 80 bytes of x86-64
machine code in a minimal static ELF that calls ``ptrace(PTRACE_SEIZE, getppid(), 0, 0)``
and exits with the errno it got (0 when the call succeeded). The same program run on the
host, and in a container without the seccomp profile, succeeds: the refusal is the
profile's doing, not an accident of the program.
"""

from __future__ import annotations

import io
import os
import platform
import struct
import subprocess

import pytest

from mayor import layers
from test_container import (  # noqa: F401 (fixtures)
    busybox_layer, containers_available, digest_of, machine, needs_runc, tar_entry,
)

EPERM = 1


def tiny_elf(code: bytes) -> bytes:
    """A static x86-64 ELF executable: one loadable segment holding the headers and ``code``."""
    base, ehsize, phsize = 0x400000, 64, 56
    header = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)
    header += struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, base + ehsize + phsize, ehsize, 0, 0, ehsize, phsize, 1, 0, 0, 0)
    total = ehsize + phsize + len(code)
    return header + struct.pack("<IIQQQQQQ", 1, 5, 0, base, base, total, total, 0x1000) + code


PTRACE_PARENT = tiny_elf(bytes.fromhex(
    "b86e000000"   # mov eax, 110 (getppid)
    "0f05"         # syscall
    "89c6"         # mov esi, eax (the pid to trace)
    "b865000000"   # mov eax, 101 (ptrace)
    "bf06420000"   # mov edi, 0x4206 (PTRACE_SEIZE: no stop of the tracee)
    "31d2"         # xor edx, edx
    "4531d2"       # xor r10d, r10d
    "0f05"         # syscall
    "f7d8"         # neg eax (-errno -> errno; 0 stays 0)
    "89c7"         # mov edi, eax
    "b83c000000"   # mov eax, 60 (exit)
    "0f05"         # syscall
))


@pytest.fixture
def ptrace_machine(machine):  # noqa: F811 (the fixture imported above)
    if platform.machine() != "x86_64":
        pytest.fail("the ptrace program is x86-64 machine code; this test runs on x86-64 machines")
    machine.blob = busybox_layer([tar_entry("bin/ptrace-parent", data=PTRACE_PARENT, mode=0o755)])
    machine.layer = machine.cache.ensure(digest_of(machine.blob), lambda: io.BytesIO(machine.blob), layers.TAR)
    return machine


def test_the_program_can_ptrace_on_the_host(tmp_path):
    program = tmp_path / "ptrace-parent"
    program.write_bytes(PTRACE_PARENT)
    os.chmod(program, 0o755)
    assert subprocess.run([str(program)]).returncode == 0  # root on the host may trace its parent


@needs_runc
def test_ptrace_of_another_process_fails_in_a_container(ptrace_machine):
    code, out, err = ptrace_machine.run(["/bin/sh", "-c", "/bin/ptrace-parent; echo errno=$?"])
    assert (code, out) == (0, f"errno={EPERM}\n"), err

    def no_seccomp(config):
        del config["linux"]["seccomp"]

    code, out, err = ptrace_machine.run(["/bin/sh", "-c", "/bin/ptrace-parent; echo errno=$?"], edit=no_seccomp)
    assert (code, out) == (0, "errno=0\n"), err
