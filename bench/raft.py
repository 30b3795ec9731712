"""Raft master benchmark: write rate of 3 replicas against a single node, failover, and the long fault loops.

    .venv/bin/python bench/raft.py                       # rates + 20 leader kills + 10 restarts
    .venv/bin/python bench/raft.py --leader-kills 100 --restarts 50 --out bench/out/raft.json

In one run, on this machine:

1. durable single-key writes over HTTP (PUT, distinct keys) for ``--seconds``
   with 1 and with 32 client threads, against a single-node master and
   against a 3-replica Raft master (clients spread over the replicas) on
   loopback; the ratio is the DESIGN §9 goal (>= 50%);
2. ``--leader-kills`` times: kill -9 the leader of a 3-replica cluster (each
   replica in a network namespace), time until a write is accepted again,
   restart it; a CAS workload runs throughout and its history is checked for
   linearizability and lost acknowledged writes at the end;
3. ``--restarts`` times: kill -9 all replicas at once and restart them under
   the same workload; every restart must elect a leader (none hangs).  Each
   line says how long each replica took to say it serves; one that takes more
   than 5 s gets the stacks of its threads written into its log (faulthandler,
   ``Cluster(stacks=True)``), and a failed run keeps the logs (``--keep DIR``
   keeps them in any case; ``--no-rates`` runs the fault loops alone).

Needs root (network namespaces) and the installed ``keg``.  Reuses the test
harness (tests/raft_harness.py).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import urllib.parse

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

import netns  # noqa: E402
from conftest import MasterProcess, init_keg_with_token  # noqa: E402
from raft_harness import Cluster, Workload, git_heads  # noqa: E402


def write_rate(urls: list, token: str, clients: int, seconds: float) -> float:
    """Acknowledged PUTs per second from ``clients`` threads, each on its own keep-alive connection."""
    counts = [0] * clients
    stop = time.monotonic() + seconds

    def run(n):
        url = urllib.parse.urlsplit(urls[n % len(urls)])
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
        i = 0
        while time.monotonic() < stop:
            conn.request("PUT", f"/v1/keg/bench/c{n}/k{i}", b"x" * 100, {"Authorization": f"Bearer {token}"})
            response = conn.getresponse()
            response.read()
            if response.status != 200:
                raise SystemExit(f"write failed: {response.status}")
            counts[n] += 1
            i += 1
        conn.close()

    threads = [threading.Thread(target=run, args=(n,)) for n in range(clients)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.monotonic() - started)


def rates(root: str, seconds: float) -> dict:
    out = {}
    keg_dir = os.path.join(root, "single")
    single = MasterProcess(keg_dir, init_keg_with_token(keg_dir))
    try:
        for clients in (1, 32):
            out[f"single_{clients}"] = write_rate([single.url], single.token, clients, seconds)
    finally:
        single.stop()
    cluster = Cluster(os.path.join(root, "raft"), 3).start()
    try:
        leader = cluster.wait_leader()
        for clients in (1, 32):
            out[f"raft_leader_{clients}"] = write_rate([leader.url], cluster.token, clients, seconds)
            out[f"raft_spread_{clients}"] = write_rate([r.url for r in cluster.replicas], cluster.token, clients,
                                                       seconds)
    finally:
        cluster.close()
    for clients in (1, 32):
        out[f"ratio_leader_{clients}"] = out[f"raft_leader_{clients}"] / out[f"single_{clients}"]
        out[f"ratio_spread_{clients}"] = out[f"raft_spread_{clients}"] / out[f"single_{clients}"]
    return out


def faults(root: str, kills: int, restarts: int) -> dict:
    out = {}
    with netns.Network() as net:
        # stacks: a replica slow to start writes its threads' stacks into its log (kept with --keep)
        cluster = Cluster(os.path.join(root, "faults"), 3, net=net, stacks=True).start()
        try:
            work = Workload(cluster).start()
            failovers = []
            for cycle in range(kills):
                seconds, leader = cluster.kill_leader_and_measure(f"/probe/{cycle}")
                failovers.append(seconds)
                leader.start()
                print(f"kill {cycle + 1}/{kills}: writes again after {failovers[-1]:.2f}s", flush=True)
            hangs = 0
            restart_starts = []
            for cycle in range(restarts):
                time.sleep(0.5)
                took = cluster.restart_all(leader_timeout=30)
                if took > 15:
                    hangs += 1
                starts = [r.start_seconds for r in cluster.replicas]
                restart_starts.extend(starts)
                print(f"restart {cycle + 1}/{restarts}: leader after {took:.2f}s "
                      f"(replicas serving after {', '.join(f'{s:.2f}' for s in starts)} s)", flush=True)
            time.sleep(1.0)
            work.stop()
            work.verify()  # raises on a lost acknowledged write or a non-linearizable history
            head = cluster.wait_converged()
            cluster.close()
            identical = set(git_heads([r.keg_path for r in cluster.replicas])) == {head[2:]}
            out.update({
                "leader_kills": kills, "restarts_all_at_once": restarts,
                "failover_median_s": statistics.median(failovers) if failovers else None,
                "failover_p90_s": sorted(failovers)[int(0.9 * (len(failovers) - 1))] if failovers else None,
                "failover_max_s": max(failovers) if failovers else None,
                "acknowledged_cas": len(work.acked), "history_ops": len(work.history),
                "lost_acknowledged_writes": 0, "linearizable": True, "replicas_identical": identical,
                "restart_hangs": hangs,
                "start_max_s": max(cluster.start_seconds),
                "restart_start_median_s": statistics.median(restart_starts) if restart_starts else None,
                "restart_start_max_s": max(restart_starts) if restart_starts else None,
            })
        finally:
            cluster.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds per write-rate measurement")
    parser.add_argument("--leader-kills", type=int, default=20, help="leader kills in a row")
    parser.add_argument("--restarts", type=int, default=10, help="all-replicas-at-once restarts")
    parser.add_argument("--no-rates", action="store_true", help="skip the write rates (only the fault loops)")
    parser.add_argument("--keep", metavar="DIR",
                        help="work in DIR (new or empty) and keep it: the kegs and each replica's log, faults/r<i>.log")
    parser.add_argument("--out", help="also write the figures as JSON here")
    args = parser.parse_args()
    reason = netns.unavailable()
    if reason:
        raise SystemExit(f"bench/raft.py needs network namespaces: {reason}")
    if args.keep:
        os.makedirs(args.keep, exist_ok=True)
        if os.listdir(args.keep):
            raise SystemExit(f"--keep {args.keep}: the directory is not empty")
        root = os.path.abspath(args.keep)
    else:
        root = tempfile.mkdtemp(prefix="keg-bench-raft-")
    try:
        figures = {"rates_per_s": rates(root, args.seconds)} if not args.no_rates else {}
        figures["faults"] = faults(root, args.leader_kills, args.restarts)
    except BaseException:
        # The replicas' logs are what explains a failure: never delete them with it.
        print(f"bench/raft.py failed; the kegs and the replicas' logs are kept in {root}", file=sys.stderr)
        raise
    if not args.keep:
        shutil.rmtree(root)
    text = json.dumps(figures, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
