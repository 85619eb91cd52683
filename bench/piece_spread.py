#!/usr/bin/env python3
"""How pieces spread through a dfp2p swarm run, from the daemons' trace logs.

Run the swarm bench with the daemons' piece log on and the logs kept:

    RUST_LOG=dfdaemon::download=trace KEEP_LOGS=/tmp/keep \
        N=16 F_MIB=256 RATE=100mbit VARIANTS=dfp2p bench/swarm.sh
    bench/piece_spread.py /tmp/keep/swarm-*/

It prints, with times from the first piece stored anywhere:
- per piece, the time from landing (from the origin) to being stored on every host;
- the relay copies stored per second (peer) and origin pieces landed per second;
- how many piece copies were still missing at a few instants around the last origin
  piece: if the drain after that instant runs at the swarm's full upload rate, the tail
  is work left over, not latency;
- the hop-by-hop history of the last two pieces to complete.
"""

import collections
import datetime
import glob
import re
import sys

STORED = re.compile(r"(\S+) TRACE dfdaemon::download: piece stored .* piece=(\d+) source=(\w+)")
FROM_PARENT = re.compile(
    r"(\S+) DEBUG dfdaemon::download: piece from parent .* piece=(\d+) parent=(\S+) "
    r"fetched=([\d.]+)(ms|µs|s)\b"
)
UNIT_MS = {"ms": 1.0, "µs": 1e-3, "s": 1e3}


def ts(s):
    return datetime.datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()


def main(run_dir):
    stored = collections.defaultdict(dict)  # piece -> host -> (time, source)
    parent_of = {}  # (host, piece) -> (parent, fetch ms)
    logs = glob.glob(run_dir.rstrip("/") + "/logs/dfdaemon-h*.log")
    if not logs:
        sys.exit(f"no dfdaemon-h*.log under {run_dir}/logs")
    for f in logs:
        host = re.search(r"dfdaemon-(h\d+)", f).group(1)
        for line in open(f, encoding="utf-8", errors="replace"):
            m = STORED.match(line)
            if m:
                stored[int(m.group(2))][host] = (ts(m.group(1)), m.group(3))
                continue
            m = FROM_PARENT.match(line)
            if m:
                ms = float(m.group(4)) * UNIT_MS[m.group(5)]
                parent_of[(host, int(m.group(2)))] = (m.group(3), ms)
    if not stored:
        sys.exit("no 'piece stored' lines: run the daemons with RUST_LOG=dfdaemon::download=trace")
    hosts = len(logs)
    t0 = min(t for p in stored.values() for t, _ in p.values())

    rows = []  # (complete everywhere, landed from origin, piece)
    for piece, by_host in stored.items():
        origin = [t for t, s in by_host.values() if s == "Origin"]
        if len(by_host) == hosts and origin:
            rows.append((max(t for t, _ in by_host.values()) - t0, origin[0] - t0, piece))
    rows.sort()
    last_origin = max(r[1] for r in rows)
    print(f"{len(stored)} pieces, {hosts} hosts; times from the first piece stored")
    print(f"last origin piece landed at {last_origin:.2f} s; last piece everywhere at {rows[-1][0]:.2f} s")
    spread = sorted(r[0] - r[1] for r in rows)
    print("landing -> on every host: " + ", ".join(
        f"p{int(q * 100)} {spread[min(len(spread) - 1, int(q * len(spread)))]:.2f} s"
        for q in (0.1, 0.5, 0.9, 1.0)))

    peer = [t - t0 for p in stored.values() for t, s in p.values() if s == "Peer"]
    origin = [t - t0 for p in stored.values() for t, s in p.values() if s == "Origin"]
    end = int(rows[-1][0]) + 1
    print("per second, relay copies stored / origin pieces landed:")
    print("  " + " ".join(
        f"{sec}:{sum(sec <= x < sec + 1 for x in peer)}/{sum(sec <= x < sec + 1 for x in origin)}"
        for sec in range(end)))

    copies = sorted(t - t0 for p in stored.values() for t, _ in p.values())
    total = len(stored) * hosts
    print("piece copies still missing:")
    for dt in (-2.0, -1.0, -0.5, 0.0, 0.25, 0.5, 0.75, 1.0):
        at = last_origin + dt
        missing = total - sum(1 for x in copies if x <= at)
        print(f"  {at:6.2f} s (last origin {dt:+.2f}): {missing}")

    for _, _, piece in rows[-2:]:
        print(f"piece {piece}:")
        for host, (t, source) in sorted(stored[piece].items(), key=lambda kv: kv[1][0]):
            via = parent_of.get((host, piece))
            how = f"from {via[0]} in {via[1]:.0f} ms" if via else ""
            print(f"  {t - t0:7.3f} {host:>4} {source:6} {how}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
