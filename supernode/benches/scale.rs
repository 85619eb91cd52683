//! `cargo bench -p supernode --bench scale`: the scheduler alone, in process, no network:
//! 10,000 simulated peers on 1,000 tasks registering, announcing and asking for parents.
//!
//! Peers are spread over tasks Zipf-like (task k gets a share proportional to 1/(k+1)),
//! so one hot task holds over a thousand peers, as a rollout of one image would, while
//! most tasks have a handful. Each task is 64 pieces of 4 MiB (256 MiB). Rounds: every
//! unfinished peer asks for up to 16 pieces, "fetches" what it was given at once and
//! announces it; until every peer holds every piece.
//!
//! Reported: registration throughput (hosts and peers), the latency of each scheduling
//! decision (p50, p99, max), overall and on the hot task, and memory per peer (the
//! process's resident set before the scheduler exists vs with every peer registered and
//! every piece announced). Env: `SIM_PEERS` (10000), `SIM_TASKS` (1000), `SIM_PIECES` (64).

use std::time::{Duration, Instant};

use proto::control::{AnnounceSource, HostInfo, PieceRecord, PieceSource};
use proto::layout::LayoutRule;
use proto::{HostId, PieceSet, SessionId, Sha256Digest, TaskId};
use supernode::scheduler::{Scheduler, SchedulerConfig};

const PIECE: u64 = 4 << 20;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e6
}

struct Peer {
    host: HostId,
    task: usize,
    have: PieceSet,
    done: bool,
}

fn main() {
    let n_peers = env("SIM_PEERS", 10_000);
    let n_tasks = env("SIM_TASKS", 1_000);
    let pieces = env("SIM_PIECES", 64) as u32;
    let rss_before = rss_kib();
    let t_start = Instant::now();
    let mut now = t_start;
    // The simulated tasks are `pieces` pieces of 4 MiB, so the layout rule must cut them
    // so: with the defaults' 1 MiB pieces and tail the reported length comes out as
    // other pieces than the simulated peers hold, and nothing is ever assigned.
    let mut s = Scheduler::new(SchedulerConfig {
        layout: LayoutRule {
            min_piece_size: PIECE as u32,
            max_piece_size: PIECE as u32,
            tail_piece_size: 0,
            ..Default::default()
        },
        ..Default::default()
    });

    // Hosts, with topology labels.
    let t = Instant::now();
    let hosts: Vec<HostId> = (0..n_peers)
        .map(|i| HostId::new(format!("node-{i:05}")).expect("host id"))
        .collect();
    for (i, h) in hosts.iter().enumerate() {
        s.handle_register_host(
            HostInfo {
                host: h.clone(),
                session: SessionId(i as u64 + 1),
                peer_addr: ([10, (i >> 16) as u8, (i >> 8) as u8, i as u8], 65000).into(),
                labels: vec![
                    ("idc".into(), format!("idc{}", i % 3)),
                    ("zone".into(), format!("zone{}", i % 12)),
                    ("rack".into(), format!("rack{}", i % 240)),
                ],
                upload_slots: 16,
            },
            now,
        );
    }
    let host_reg = t.elapsed();

    // Zipf-like share of peers per task; every task gets at least one.
    let weights: Vec<f64> = (0..n_tasks).map(|k| 1.0 / (k as f64 + 1.0)).collect();
    let total: f64 = weights.iter().sum();
    let mut per_task: Vec<usize> = weights
        .iter()
        .map(|w| ((w / total) * n_peers as f64).floor().max(1.0) as usize)
        .collect();
    let assigned: usize = per_task.iter().sum();
    per_task[0] += n_peers.saturating_sub(assigned);
    let tasks: Vec<TaskId> = (0..n_tasks)
        .map(|k| TaskId::for_url(&format!("http://registry/blob/{k}"), &[], None))
        .collect();
    let digest = |task: usize, p: u32| Sha256Digest::of(format!("{task}/{p}").as_bytes());

    let mut peers: Vec<Peer> = Vec::with_capacity(n_peers);
    let mut next = 0;
    for (k, &count) in per_task.iter().enumerate() {
        for _ in 0..count {
            if next >= n_peers {
                break;
            }
            peers.push(Peer {
                host: hosts[next].clone(),
                task: k,
                have: PieceSet::new(pieces),
                done: false,
            });
            next += 1;
        }
    }
    let t = Instant::now();
    for p in &peers {
        let view = s
            .handle_register_peer(&p.host, tasks[p.task], "http://registry/blob", None, now)
            .expect("register peer");
        if view.probe {
            let l = s
                .handle_report_layout(&p.host, tasks[p.task], u64::from(pieces) * PIECE, true, now)
                .expect("layout");
            assert_eq!(l.piece_count(), pieces, "the layout rule cuts other pieces");
        }
    }
    let peer_reg = t.elapsed();

    let mut decisions: Vec<Duration> = Vec::new();
    let mut hot: Vec<Duration> = Vec::new();
    let mut announces: Vec<Duration> = Vec::new();
    let (mut from_origin, mut from_peers) = (vec![0u32; n_tasks], 0u64);
    let mut rounds = 0;
    let mut peak_rss = 0;
    while peers.iter().any(|p| !p.done) {
        rounds += 1;
        assert!(rounds < 1000, "simulation does not converge");
        now += Duration::from_millis(100);
        for p in peers.iter_mut().filter(|p| !p.done) {
            let busy = PieceSet::new(pieces);
            let t = Instant::now();
            let reply = s
                .handle_schedule(&p.host, tasks[p.task], p.have.clone(), &busy, 16, now)
                .expect("schedule");
            let el = t.elapsed();
            decisions.push(el);
            if p.task == 0 {
                hot.push(el);
            }
            let mut got_origin = Vec::new();
            let mut got_peer = Vec::new();
            for a in reply.assignments {
                let rec = PieceRecord {
                    piece: a.piece,
                    digest: digest(p.task, a.piece.0),
                };
                match a.source {
                    PieceSource::Origin | PieceSource::OriginWhole => got_origin.push(rec),
                    PieceSource::Parents { digest: d, parents } => {
                        assert_eq!(d, rec.digest, "digest handed out is the recorded one");
                        assert!(!parents.is_empty() && parents.iter().all(|x| x.host != p.host));
                        got_peer.push(rec);
                    }
                    // Leases end within the same step here, so this is rare; the
                    // lessee is never its own relay.
                    PieceSource::Landing { parent } => {
                        assert!(parent.host != p.host);
                        got_peer.push(rec);
                    }
                }
            }
            for (src, recs) in [
                (AnnounceSource::Origin, &got_origin),
                (AnnounceSource::Peer, &got_peer),
            ] {
                if recs.is_empty() {
                    continue;
                }
                let t = Instant::now();
                s.handle_announce(&p.host, tasks[p.task], src, recs, now)
                    .expect("announce");
                announces.push(t.elapsed());
                for r in recs.iter() {
                    p.have.insert(r.piece);
                }
            }
            from_origin[p.task] += got_origin.len() as u32;
            from_peers += got_peer.len() as u64;
            p.done = p.have.is_full();
        }
        peak_rss = peak_rss.max(rss_kib());
        // Heartbeats keep every host alive between rounds.
        for p in &peers {
            let _ = s.handle_heartbeat(&p.host, SessionId(0), 0, now);
        }
        s.handle_tick(now);
    }
    let rss_after = rss_kib().max(peak_rss);
    decisions.sort();
    hot.sort();
    announces.sort();
    let extra_origin: u32 = from_origin.iter().map(|&n| n.saturating_sub(pieces)).sum();
    let per_peer = (rss_after.saturating_sub(rss_before) as f64 * 1024.0) / n_peers as f64;

    println!(
        "| scheduler simulation: {n_peers} peers, {n_tasks} tasks x {pieces} pieces, hot task {} peers | |",
        per_task[0]
    );
    println!("|---|---|");
    println!(
        "| host registrations | {:.0} /s |",
        n_peers as f64 / host_reg.as_secs_f64()
    );
    println!(
        "| peer registrations (incl. layout) | {:.0} /s |",
        peers.len() as f64 / peer_reg.as_secs_f64()
    );
    println!(
        "| scheduling decisions | {} in {rounds} rounds |",
        decisions.len()
    );
    println!(
        "| decision latency p50 / p99 / max, all tasks | {:.1} / {:.1} / {:.1} us |",
        pct(&decisions, 0.5),
        pct(&decisions, 0.99),
        pct(&decisions, 1.0)
    );
    println!(
        "| decision latency p50 / p99 / max, hot task | {:.1} / {:.1} / {:.1} us |",
        pct(&hot, 0.5),
        pct(&hot, 0.99),
        pct(&hot, 1.0)
    );
    println!(
        "| announce latency p50 / p99 | {:.1} / {:.1} us |",
        pct(&announces, 0.5),
        pct(&announces, 0.99)
    );
    println!(
        "| memory per peer (RSS delta / peers) | {:.0} B ({} KiB -> {} KiB) |",
        per_peer, rss_before, rss_after
    );
    println!(
        "| pieces from the origin beyond one copy | {extra_origin} (of {}) |",
        n_tasks as u64 * u64::from(pieces)
    );
    println!("| pieces from peers | {from_peers} |");
    println!(
        "| wall time of the simulation | {:.1} s |",
        t_start.elapsed().as_secs_f64()
    );
    assert_eq!(
        extra_origin, 0,
        "every piece left the origin exactly once per task"
    );
}
