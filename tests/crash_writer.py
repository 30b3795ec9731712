"""A writer for the crash tests: applies transactions forever and prints each one it saw acknowledged.

Usage: python crash_writer.py KEG_DIR SEED (odd seeds checkpoint in the background)
Each acknowledged write prints: revision, revision KID, path, value (tab-separated), flushed at once,
so the line exists only for writes the store had already acknowledged.
"""

import os
import random
import sys

import keg
from keg import Transaction, put

keg_dir, seed = sys.argv[1], int(sys.argv[2])
rng = random.Random(seed)
# Odd seeds write checkpoints in a child process, as the master does: kills land while one is under way.
store = keg.Store(keg_dir, durable=True, checkpoint_revisions=rng.choice([3, 7, 20]),
                  background_checkpoints=seed % 2 == 1)
out = os.fdopen(1, "w", buffering=1)
i = 0
while True:
    group = []
    for _ in range(rng.choice([1, 1, 1, 3])):
        i += 1
        path = f"/crash/s{seed}/k{i % 40}"
        value = f"seed {seed} write {i} " + "x" * rng.choice([0, 10, 3000])
        group.append((path, value, Transaction((put(path, value),))))
    results = store.commit([t for _, _, t in group])
    for (path, value, _), r in zip(group, results):
        assert r.ok
        out.write(f"{r.revision}\t{r.revision_kid}\t{path}\t{value}\n")
