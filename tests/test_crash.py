"""A crash at any instant loses nothing acknowledged and leaves a valid git repository."""

import os
import random
import signal
import subprocess
import sys
import time

import pytest

import keg

from conftest import git

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.slow
def test_sigkill_at_50_random_moments_loses_no_acknowledged_revision(keg_dir):
    keg.init(keg_dir).close()
    rng = random.Random(20261121)
    acknowledged = {}  # revision -> (revision KID, {path: value})
    for cycle in range(50):
        errors = open(os.path.join(os.path.dirname(keg_dir), f"writer{cycle}.err"), "w+")
        writer = subprocess.Popen([sys.executable, os.path.join(HERE, "crash_writer.py"), keg_dir, str(cycle)],
                                  stdout=subprocess.PIPE, stderr=errors, text=True)
        # Wait for the writer to start writing, then kill it at a random moment.
        first = writer.stdout.readline()
        assert first, errors.seek(0) or errors.read()
        time.sleep(rng.uniform(0.0, 0.25))
        writer.send_signal(signal.SIGKILL)
        rest = writer.stdout.read()  # through the same buffered stream that read the first line
        writer.wait()
        errors.close()
        # The kill may cut the last line short; an unfinished line is not an acknowledgement.
        lines = [first.rstrip("\n")] + rest.split("\n")[:-1]
        for line in lines:
            revision, revision_kid, path, value = line.split("\t")
            acknowledged.setdefault(int(revision), (revision_kid, {}))[1][path] = value

        # Straight after the kill, before Keg recovers anything, stock git sees a valid repository.
        fsck = git(keg_dir, "fsck", "--strict", "--no-dangling")
        assert fsck.returncode == 0, f"cycle {cycle}, before recovery: {fsck.stdout}{fsck.stderr}"

        store = keg.Store(keg_dir)
        store.lock()  # recovery: replay the journal, checkpoint
        try:
            for revision, (revision_kid, values) in acknowledged.items():
                assert store.revision(revision).kid == revision_kid, f"cycle {cycle}: revision {revision} changed"
                for path, value in values.items():
                    assert store.read(path, revision).decode() == value
        finally:
            store.close()
        fsck = git(keg_dir, "fsck", "--strict", "--no-dangling")
        assert fsck.returncode == 0, f"cycle {cycle}: {fsck.stdout}{fsck.stderr}"
    assert len(acknowledged) > 200  # the writers did real work between kills
