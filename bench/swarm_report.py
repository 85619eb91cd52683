#!/usr/bin/env python3
"""Helper of bench/swarm.sh: torrent info, tracker scrape, statistics, plot, BENCHMARKS.md.

Subcommands:
  infohash TORRENT            hex info-hash
  piecelen TORRENT            piece length in bytes
  scrape URL HEXHASH          print complete=/incomplete= from a tracker scrape
  report RESDIR [--png P] [--json J] [--md BENCHMARKS.md]
  check RESDIR [--max-egress 1.1]   exit 1 on a failed variant or dfp2p egress > limit
"""
import argparse
import hashlib
import json
import math
import os
import re
import sys
import urllib.parse
import urllib.request

BEGIN = "<!-- swarm-bench:begin -->"
END = "<!-- swarm-bench:end -->"
# Ethernet 14 + IPv4 20 + TCP 32 (the timestamp option Linux sends on every segment by
# default). The few non-TCP frames (ARP) are taken off at this size too; negligible.
TCP_SEGMENT_HEADERS = 66
LABELS = {"dfp2p": "dfp2p (dfget)", "mirror": "dfp2p (registry mirror, curl)", "http": "direct HTTP (curl)", "bt": "BitTorrent (aria2c)"}


# ------------------------------------------------------------------ bencode
def bdecode(data, i=0):
    c = data[i:i + 1]
    if c == b"i":
        j = data.index(b"e", i)
        return int(data[i + 1:j]), j + 1
    if c == b"l":
        i += 1
        out = []
        while data[i:i + 1] != b"e":
            v, i = bdecode(data, i)
            out.append(v)
        return out, i + 1
    if c == b"d":
        i += 1
        out = {}
        while data[i:i + 1] != b"e":
            k, i = bdecode(data, i)
            start = i
            v, i = bdecode(data, i)
            out[k] = v
            if k == b"info":
                out[b"__info_span"] = (start, i)
        return out, i + 1
    j = data.index(b":", i)
    n = int(data[i:j])
    return data[j + 1:j + 1 + n], j + 1 + n


def torrent(path):
    data = open(path, "rb").read()
    d, _ = bdecode(data)
    s, e = d[b"__info_span"]
    return d, hashlib.sha1(data[s:e]).hexdigest()


def cmd_scrape(url, hexhash):
    q = urllib.parse.quote(bytes.fromhex(hexhash))
    body = urllib.request.urlopen(f"{url}?info_hash={q}", timeout=3).read()
    d, _ = bdecode(body)
    files = d.get(b"files", {})
    for k, v in files.items():
        if k == b"__info_span":
            continue
        print(f"complete={v.get(b'complete', 0)}")
        print(f"incomplete={v.get(b'incomplete', 0)}")
        return 0
    print("complete=0")
    return 0


# ------------------------------------------------------------------ reading results
def read_env(path):
    out = {}
    if not os.path.exists(path):
        return out
    for line in open(path):
        line = line.rstrip("\n")
        if "=" in line:
            k, v = line.split("=", 1)
            out[k] = v
    return out


def cpu_fields(line):
    f = [int(x) for x in line.split()[1:]]
    total = sum(f[:8])  # user nice system idle iowait irq softirq steal (guest is in user)
    idle = f[3] + f[4]
    return total, idle


def busy(l0, l1):
    t0, i0 = cpu_fields(l0)
    t1, i1 = cpu_fields(l1)
    return 100.0 * (1 - (i1 - i0) / (t1 - t0)) if t1 > t0 else float("nan")


def nearest_rank(sorted_vals, p):
    if not sorted_vals:
        return float("nan")
    k = max(1, math.ceil(p / 100.0 * len(sorted_vals)))
    return sorted_vals[k - 1]


def median(v):
    if not v:
        return float("nan")
    n = len(v)
    return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2


def metric_sum(path, name, label=None):
    total = 0.0
    if not os.path.exists(path):
        return None
    for line in open(path):
        if line.startswith("#"):
            continue
        m = re.match(r"([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+(\S+)", line)
        if not m or m.group(1) != name:
            continue
        if label and label not in (m.group(2) or ""):
            continue
        total += float(m.group(3))
    return total


def metric_labels(path, name, label):
    out = {}
    if not os.path.exists(path):
        return out
    for line in open(path):
        m = re.match(r"([a-zA-Z_:][\w:]*)\{([^}]*)\}\s+(\S+)", line)
        if not m or m.group(1) != name:
            continue
        lm = re.search(label + r'="([^"]*)"', m.group(2))
        if lm:
            out[lm.group(1)] = out.get(lm.group(1), 0) + float(m.group(3))
    return out


def load_variant(resdir, name, run):
    vd = os.path.join(resdir, name)
    meta = read_env(os.path.join(vd, "meta.env"))
    n = int(run["n"])
    fbytes = int(run["f_bytes"])
    ncpu = int(run.get("ncpu", "2"))
    v = {"name": name, "label": LABELS.get(name, name), "status": meta.get("status", "missing"),
         "error": meta.get("error", ""), "placement": meta.get("placement", ""),
         "piece_len": meta.get("piece_len"), "pre_busy_pct": meta.get("pre_busy", "")}
    t0 = float(meta["t0"]) if "t0" in meta else None
    hosts = []
    tsv = os.path.join(vd, "times.tsv")
    if os.path.exists(tsv) and t0 is not None:
        for line in open(tsv):
            h, s, e, rc, ok = line.rstrip("\n").split("\t")
            good = ok == "1" and rc == "0"
            t = float(e) - t0 if good and e != "nan" else None
            hosts.append({"host": h, "time_s": t, "exit": rc, "sha_ok": ok == "1"})
    v["hosts"] = hosts
    times = sorted(x["time_s"] for x in hosts if x["time_s"] is not None)
    v["ok"] = len(times)
    v["n"] = n
    v["min"] = times[0] if times else float("nan")
    v["median"] = median(times)
    v["p90"] = nearest_rank(times, 90)
    v["max"] = times[-1] if times and len(times) == n else float("nan")
    v["times"] = times
    skew = []
    for h in hosts:
        sp = os.path.join(vd, h["host"] + ".time.start")
        if t0 is not None and os.path.exists(sp):
            try:
                skew.append(float(open(sp).read().split()[0]) - t0)
            except (ValueError, IndexError):
                pass
    v["start_skew_ms"] = 1000 * max(skew) if skew else float("nan")
    q0, q1 = meta.get("qtx0", "").split(), meta.get("qtx1", "").split()
    if len(q0) == 2 and len(q1) == 2:
        # The qdisc counts each segment with its headers, as a wire would (the veth's
        # tx_bytes counts one header per GSO batch, so it moves with the batch size);
        # taking the headers off leaves the payload, duplicates and resends included.
        wire, segs = int(q1[0]) - int(q0[0]), int(q1[1]) - int(q0[1])
        v["egress_wire_bytes"] = wire
        v["egress_wire_f"] = wire / fbytes
        v["egress_payload_f"] = (wire - segs * TCP_SEGMENT_HEADERS) / fbytes
    elif "tx0" in meta and "tx1" in meta:
        # Runs recorded before the qdisc counters: only the veth's count, which is neither
        # the wire nor the payload; the check falls back to it.
        v["egress_veth_f"] = (int(meta["tx1"]) - int(meta["tx0"])) / fbytes
    body = 0
    reqs = 0
    spans = []
    acc = os.path.join(vd, "access.log")
    if os.path.exists(acc):
        for line in open(acc):
            p = line.split()
            if len(p) >= 6:
                body += int(p[3])
                reqs += 1
                if t0 is not None and int(p[3]) > 1:
                    end = float(p[0]) - t0
                    spans.append((end - float(p[-1]), end))
    if spans:
        v["origin_last_response_s"] = max(e for _, e in spans)
        ev = sorted([(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans])
        cur = peak = 0
        for _, d in ev:
            cur += d
            peak = max(peak, cur)
        v["origin_peak_concurrent"] = peak
    if "tcp0" in meta and "tcp1" in meta:
        try:
            o0, r0 = map(int, meta["tcp0"].split())
            o1, r1 = map(int, meta["tcp1"].split())
            v["origin_tcp_out_segs"] = o1 - o0
            v["origin_tcp_retrans_segs"] = r1 - r0
        except ValueError:
            pass
    for key in ("speed_before", "speed_after"):
        if meta.get(key, "").isdigit():
            v[key + "_mib_s"] = int(meta[key])
    if meta.get("udpdrop0", "").isdigit() and meta.get("udpdrop1", "").isdigit():
        v["hosts_udp_rcvbuf_drops"] = int(meta["udpdrop1"]) - int(meta["udpdrop0"])
    v["origin_http_body_bytes"] = body
    v["origin_http_body_f"] = body / fbytes
    v["origin_http_requests"] = reqs
    if "stat0" in meta and "stat1" in meta:
        v["cpu_busy_pct"] = busy(meta["stat0"], meta["stat1"])
    if "t1" in meta and t0 is not None:
        v["wall_s"] = float(meta["t1"]) - t0
    try:
        cg = (int(meta["cg1"]) - int(meta["cg0"])) / 1e9
        if cg > 0 and v.get("wall_s"):
            v["bench_cpu_s"] = cg
            v["bench_cpu_pct"] = 100.0 * cg / (v["wall_s"] * ncpu)
    except (KeyError, ValueError):
        pass
    samples = []
    cpul = os.path.join(vd, "cpu.log")
    if os.path.exists(cpul):
        prev = None
        for line in open(cpul):
            p = line.split(None, 1)
            if len(p) != 2 or not p[1].startswith("cpu "):
                continue
            if prev is not None:
                samples.append(busy(prev, p[1]))
            prev = p[1]
    if samples:
        v["cpu_busy_max1s"] = max(samples)
        v["cpu_sat_pct"] = 100.0 * sum(1 for s in samples if s >= 95) / len(samples)
    if name in ("dfp2p", "mirror"):
        origin = peer = cache = up = 0.0
        fails = 0.0
        landing = 0.0
        reasons = {}
        per_up = []
        per_origin = []
        for h in range(1, n + 1):
            mp = os.path.join(vd, f"h{h}.metrics")
            o = metric_sum(mp, "dfdaemon_piece_bytes_total", 'source="origin"') or 0
            origin += o
            per_origin.append(o / 1048576)
            peer += metric_sum(mp, "dfdaemon_piece_bytes_total", 'source="peer"') or 0
            landing += metric_sum(mp, "dfdaemon_landing_pieces_total") or 0
            cache += metric_sum(mp, "dfdaemon_piece_bytes_total", 'source="cache"') or 0
            u = metric_sum(mp, "dfdaemon_upload_bytes_total") or 0
            up += u
            per_up.append(u / 1048576)
            fails += metric_sum(mp, "dfdaemon_piece_failures_total") or 0
            for reason, val in metric_labels(mp, "dfdaemon_piece_failures_total", "reason").items():
                reasons[reason] = reasons.get(reason, 0) + val
        v["pieces_from_origin_f"] = origin / fbytes
        v["pieces_from_peers_f"] = peer / fbytes
        v["landing_pieces"] = landing
        v["upload_mib_per_host"] = per_up
        v["origin_mib_per_host"] = per_origin
        v["piece_failures"] = fails
        sm = os.path.join(vd, "supernode.metrics")
        v["sn_schedule_requests"] = metric_sum(sm, "supernode_control_requests_total", 'kind="schedule"')
        v["sn_parent_assignments"] = metric_sum(sm, "supernode_parent_assignments_total")
        v["sn_origin_assignments"] = metric_sum(sm, "supernode_origin_assignments_total")
        v["piece_failure_reasons"] = reasons
        try:
            tasks = json.load(open(os.path.join(vd, "tasks.json")))
            if tasks:
                v["piece_size"] = tasks[0].get("piece_size")
                v["piece_count"] = tasks[0].get("pieces")
        except (OSError, ValueError, AttributeError, KeyError, IndexError, TypeError):
            pass
        w = os.path.join(vd, "warnings.txt")
        lines = open(w).read().splitlines() if os.path.exists(w) else []
        v["log_warn"] = sum(1 for x in lines if re.search(r"\bWARN\b", x))
        v["log_error"] = sum(1 for x in lines if re.search(r"\bERROR\b", x))
        v["log_excerpt"] = lines[:5]
    return v


def fmt(x, nd=1):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.{nd}f}"


def build(resdir):
    run = read_env(os.path.join(resdir, "run.env"))
    n = int(run["n"])
    fbytes = int(run["f_bytes"])
    u = float(run["u_bps"])
    rate = run["rate"]
    kr = max(fbytes * 8 / u, n * fbytes * 8 / ((n + 1) * u))
    cs = n * fbytes * 8 / u  # client-server bound (origin serves everyone)
    variants = [load_variant(resdir, v, run) for v in run["variants"].split(",") if v]
    for v in variants:
        v["max_over_bound"] = v["max"] / kr if not math.isnan(v["max"]) else float("nan")
    bg = busy(run["bg_stat0"], run["bg_stat1"]) if run.get("bg_stat0") else float("nan")
    return {"run": run, "n": n, "f_bytes": fbytes, "f_mib": int(run["f_mib"]), "rate": rate,
            "u_bps": u, "kr_bound_s": kr, "client_server_bound_s": cs, "background_busy_pct": bg,
            "variants": variants}


def piece_size_text(size):
    """1 MiB, 512 KiB: the supernode's piece size as set, in the largest whole unit."""
    size = int(size or 0)
    return f"{size >> 20} MiB" if size and size % (1 << 20) == 0 else f"{size >> 10} KiB"


def markdown(r, png_rel):
    run = r["run"]
    n, fm = r["n"], r["f_mib"]
    L = []
    L.append(BEGIN)
    L.append(f"## Swarm: {n} hosts fetch one {fm} MiB file at once ({run['date']})")
    L.append("")
    L.append("Reproduce (root, prebuilt release binaries in `BIN_DIR`, default `/tmp/dfp2p-bin`):")
    L.append("")
    L.append("```sh")
    L.append(run["cmdline"])
    L.append("```")
    L.append("")
    L.append(f"Emulated hosts: one network namespace per host (origin, control, h1..h{n}), each with one veth "
             f"into a Linux bridge in its own namespace. Upload of the origin and of every host is limited by "
             f"htb at {r['rate']} on its veth egress; **download is not limited** (d_min = infinity). "
             f"u = {r['u_bps'] / 1e6:.1f} Mbit/s ({run['u_src']}), used for the origin and every host. "
             f"Kumar-Ross lower bound T = max(F/u, N*F/((N+1)*u)) = **{r['kr_bound_s']:.1f} s** "
             f"(a single origin serving all N alone would need N*F/u = {r['client_server_bound_s']:.1f} s). "
             f"Origin: nginx-light on the origin host. Machine: {run['ncpu']} CPUs, kernel {run['kernel']}; "
             + (f"every process of the harness held to {run['cpu_limit']} CPUs (CPU_LIMIT); "
                if run.get("cpu_limit") else "") +
             f"machine load when the script started: {fmt(r['background_busy_pct'], 0)}% busy "
             f"(per variant below: load just before it and the non-harness load during it).")
    L.append("")
    L.append("| variant | hosts ok | min s | median s | p90 s | max s | max / bound | origin egress / F "
             "| origin wire / F | origin HTTP body / F | CPU busy avg % (max 1 s) | harness procs CPU % |")
    L.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for v in r["variants"]:
        st = "" if v["status"] == "ok" else " **FAILED**"
        L.append(f"| {v['label']}{st} | {v['ok']}/{v['n']} | {fmt(v['min'])} | {fmt(v['median'])} | "
                 f"{fmt(v['p90'])} | {fmt(v['max'])} | {fmt(v['max_over_bound'], 2)} | "
                 f"{fmt(v.get('egress_payload_f'), 3)} | "
                 f"{fmt(v.get('egress_wire_f'), 3)} | {fmt(v.get('origin_http_body_f'), 3)} | "
                 f"{fmt(v.get('cpu_busy_pct'), 0)} ({fmt(v.get('cpu_busy_max1s'), 0)}) | "
                 f"{fmt(v.get('bench_cpu_pct'), 0)} |")
    L.append("")
    L.append("Times are per host from one common start instant to its completion (p90: nearest rank). "
             "Origin wire is every byte the origin's link sent (its htb counters: each TCP segment with its "
             "headers); origin egress is that less 66 B of Ethernet, IP and TCP headers per segment, i.e. the "
             "TCP payload, retransmissions and protocol messages included; HTTP body is what nginx logged as "
             "sent. (Stops before 13 reported the veth's tx_bytes, which counts one header per GSO batch and so "
             "moved with the sender's batch size: 1.003 to 1.023 F for the same 1.046 F on the wire.) "
             "Start skew is the largest delay between the common start and a host's own start. "
             "CPU busy is the whole machine (/proc/stat) over the variant; \"harness procs\" is the CPU of "
             "every process the harness started (cpuacct cgroup) over the same time, as a share of all CPUs.")
    L.append("")
    for v in r["variants"]:
        notes = []
        if v.get("placement"):
            notes.append(v["placement"])
        notes.append(f"start skew {fmt(v.get('start_skew_ms'), 0)} ms")
        if v.get("cpu_sat_pct") is not None:
            notes.append(f"machine at >=95% busy in {fmt(v['cpu_sat_pct'], 0)}% of the 1-s samples")
        if v.get("pre_busy_pct") not in (None, ""):
            notes.append(f"machine {v['pre_busy_pct']}% busy just before")
        if v.get("speed_before_mib_s") is not None and v.get("speed_after_mib_s") is not None:
            notes.append(f"machine speed (one core hashing the file) {v['speed_before_mib_s']} MiB/s "
                         f"before, {v['speed_after_mib_s']} after")
        if v.get("cpu_busy_pct") is not None and v.get("bench_cpu_pct") is not None:
            notes.append(f"other (non-harness) load during the variant about "
                         f"{fmt(max(0.0, v['cpu_busy_pct'] - v['bench_cpu_pct']), 0)}%")
        if v["status"] != "ok":
            notes.append(f"error: {v['error']}")
        if v.get("hosts_udp_rcvbuf_drops") is not None and v["name"] in ("dfp2p", "mirror"):
            notes.append(f"UDP receive-buffer drops on the hosts {v['hosts_udp_rcvbuf_drops']}")
        if v.get("origin_tcp_out_segs"):
            notes.append(f"origin TCP retransmitted {v['origin_tcp_retrans_segs']} of "
                         f"{v['origin_tcp_out_segs']} segments")
        if v.get("origin_last_response_s") is not None:
            notes.append(f"{v['origin_http_requests']} origin HTTP requests, up to "
                         f"{v['origin_peak_concurrent']} at once, last one done at "
                         f"{fmt(v['origin_last_response_s'])} s")
        if v["name"] in ("dfp2p", "mirror"):
            notes.append(f"pieces from origin {fmt(v.get('pieces_from_origin_f'), 3)} F, from peers "
                         f"{fmt(v.get('pieces_from_peers_f'), 2)} F (daemon metrics), "
                         f"{fmt(v.get('landing_pieces'), 0)} piece copies taken while landing; piece failures "
                         f"{fmt(v.get('piece_failures'), 0)} "
                         f"({', '.join(f'{k} {int(x)}' for k, x in sorted(v.get('piece_failure_reasons', {}).items())) or '-'}); "
                         f"piece size {piece_size_text(v.get('piece_size'))} x {v.get('piece_count', '?')}; log lines WARN {v.get('log_warn', 0)}, "
                         f"ERROR {v.get('log_error', 0)}")
            if v.get("sn_schedule_requests") is not None:
                notes.append(f"supernode: {fmt(v['sn_schedule_requests'], 0)} schedule requests, "
                             f"{fmt(v['sn_parent_assignments'], 0)} parent and "
                             f"{fmt(v['sn_origin_assignments'], 0)} origin assignments")
            ups = v.get("upload_mib_per_host") or []
            if ups:
                notes.append("MiB uploaded per host: min " + fmt(min(ups), 0) + ", max " + fmt(max(ups), 0))
        if v["name"] == "bt":
            pl = int(v.get("piece_len") or 0)
            notes.append(f"torrent piece length {pl // 1024} KiB; completion time = aria2c's "
                         "on-bt-download-complete hook")
        L.append(f"* {v['label']}: " + "; ".join(notes))
    L.append("")
    if png_rel:
        L.append(f"![CDF of per-host completion time]({png_rel})")
        L.append("")
    L.append(END)
    return "\n".join(L) + "\n"


def plot(r, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("swarm_report: matplotlib missing, no plot", file=sys.stderr)
        return False
    fig, ax = plt.subplots(figsize=(7, 4.2))
    n = r["n"]
    for v in r["variants"]:
        t = v["times"]
        if not t:
            continue
        xs = [0.0] + t
        ys = [0.0] + [(i + 1) / n for i in range(len(t))]
        ax.step(xs, ys, where="post", label=f"{v['label']} (last {fmt(v['max'])} s)")
    ax.axvline(r["kr_bound_s"], color="k", ls="--", lw=1,
               label=f"Kumar-Ross bound {r['kr_bound_s']:.1f} s")
    ax.set_xlabel("completion time from common start (s)")
    ax.set_ylabel("fraction of hosts done")
    ax.set_ylim(0, 1.02)
    ax.set_xlim(left=0)
    ax.set_title(f"N={n}, F={r['f_mib']} MiB, upload {r['rate']} per host, download unlimited")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def update_md(md_path, section):
    text = open(md_path).read() if os.path.exists(md_path) else ""
    if BEGIN in text and END in text and text.index(BEGIN) < text.index(END):
        a = text.index(BEGIN)
        b = text.index(END) + len(END)
        if text[b:b + 1] == "\n":
            b += 1
        text = text[:a] + section + text[b:]
    else:
        if text and not text.endswith("\n"):
            text += "\n"
        text += ("\n" if text else "") + section
    tmp = md_path + ".tmp"
    open(tmp, "w").write(text)
    os.replace(tmp, md_path)


def cmd_report(a):
    r = build(a.resdir)
    png_rel = None
    if a.png:
        if plot(r, a.png):
            base = os.path.dirname(os.path.abspath(a.md)) if a.md else os.getcwd()
            png_rel = os.path.relpath(os.path.abspath(a.png), base)
    section = markdown(r, png_rel)
    print(section)
    for v in r["variants"]:
        if v["name"] == "dfp2p" and v.get("log_excerpt"):
            print(f"dfp2p log WARN/ERROR lines (first {len(v['log_excerpt'])}):")
            for x in v["log_excerpt"]:
                print("    " + x[:300])
        per = " ".join(f"{h['host']}={fmt(h['time_s'])}" for h in v["hosts"])
        print(f"{v['name']} per host (s): {per}")
        if v["name"] == "dfp2p" and v.get("upload_mib_per_host"):
            print("dfp2p MiB uploaded per host: " + " ".join(fmt(x, 0) for x in v["upload_mib_per_host"]))
            print("dfp2p MiB from origin per host: " + " ".join(fmt(x, 0) for x in v["origin_mib_per_host"]))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(r, f, indent=1, default=str)
    if a.md:
        update_md(a.md, section)
        print(f"(section written to {a.md})", file=sys.stderr)
    return 0


def cmd_check(a):
    r = build(a.resdir)
    bad = 0
    for v in r["variants"]:
        if v["status"] != "ok" or v["ok"] != v["n"]:
            print(f"CHECK FAILED: {v['name']}: {v['ok']}/{v['n']} hosts got correct bytes; {v['error']}")
            bad = 1
        egress = v.get("egress_payload_f", v.get("egress_veth_f", 0))
        if v["name"] in ("dfp2p", "mirror") and egress > a.max_egress:
            print(f"CHECK FAILED: {v['name']} origin egress {egress:.3f} F > {a.max_egress} F")
            bad = 1
    if not bad:
        print("check: ok")
    return bad


def main():
    p = argparse.ArgumentParser()
    sp = p.add_subparsers(dest="cmd", required=True)
    x = sp.add_parser("infohash"); x.add_argument("torrent")
    x = sp.add_parser("piecelen"); x.add_argument("torrent")
    x = sp.add_parser("scrape"); x.add_argument("url"); x.add_argument("hash")
    x = sp.add_parser("report"); x.add_argument("resdir"); x.add_argument("--png")
    x.add_argument("--json"); x.add_argument("--md")
    x = sp.add_parser("check"); x.add_argument("resdir"); x.add_argument("--max-egress", type=float, default=1.1)
    a = p.parse_args()
    if a.cmd == "infohash":
        print(torrent(a.torrent)[1]); return 0
    if a.cmd == "piecelen":
        print(torrent(a.torrent)[0][b"info"][b"piece length"]); return 0
    if a.cmd == "scrape":
        return cmd_scrape(a.url, a.hash)
    if a.cmd == "report":
        return cmd_report(a)
    if a.cmd == "check":
        return cmd_check(a)


if __name__ == "__main__":
    sys.exit(main())
