"""CommandBody (master/bodies.py): a command's output streamed as an answer, on an event loop or a thread.

Real commands (sh); the event-loop case runs on a real asyncio loop, as master/server.py drives it.
"""

from __future__ import annotations

import asyncio
import os

import pytest

from master.bodies import CommandBody


def body_of(script: str, started: list) -> CommandBody:
    return CommandBody(lambda status, headers: started.append(status), ["sh", "-c", script], dict(os.environ),
                       headers=[("Content-Type", "application/octet-stream")], what="the test command")


def on_loop(body: CommandBody) -> list:
    """Drive ``body`` as the server does: ``poll`` after each wake until it is finished; the chunks."""
    async def run():
        woken = asyncio.Event()
        body.arm(asyncio.get_running_loop(), woken.set)
        chunks = []
        while True:
            await asyncio.wait_for(woken.wait(), 10)
            woken.clear()
            more, done = body.poll()
            chunks += more
            if done:
                return chunks
    return asyncio.run(run())


@pytest.mark.parametrize("driven", ["by a thread", "on an event loop"])
def test_a_command_streams_its_output_and_its_failures_are_never_a_whole_answer(driven):
    drive = list if driven == "by a thread" else on_loop

    started: list = []
    assert b"".join(drive(body_of("printf abc; printf def", started))) == b"abcdef"
    assert started == ["200 OK"]

    # Failing before any output: a 500 that says why.
    started = []
    assert drive(body_of("echo nothing to pack >&2; exit 2", started)) == [b"the test command failed: "
                                                                           b"nothing to pack\n"]
    assert started == ["500 Internal Server Error"]

    # Failing after its answer began: the answer is cut off (the server drops the connection), not ended.
    started = []
    with pytest.raises(OSError, match="the test command failed after its answer began: broke midway"):
        drive(body_of("printf abc; sleep 0.1; echo broke midway >&2; exit 3", started))
    assert started == ["200 OK"]
