//! `cargo bench -p tests --bench mirror`: a real containerd pulling a real image, side by
//! side in one run: straight from the local registry, through a warm daemon (blobs
//! cached), through a cold one (blobs fetched from the registry as the pull runs); and
//! time to first byte of a cold blob, registry vs mirror.
//!
//! Size: 3 layers of `BENCH_LAYER_MIB` (default 64) MiB of random data; `BENCH_ROUNDS`
//! (default 3) rounds of direct, cold, warm, each containerd removed and synced after its
//! pull; medians reported.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tests::{Containerd, DaemonProc, Registry, SupernodeProc, random_bytes};

const MIB: usize = 1 << 20;

fn hosts_dir(
    root: &std::path::Path,
    name: &str,
    reg: &Registry,
    mirror: Option<SocketAddr>,
) -> std::path::PathBuf {
    tests::hosts_dir(&root.join(name), reg, mirror)
}

fn timed_pull(
    root: &std::path::Path,
    label: &str,
    hosts: &std::path::Path,
    reference: &str,
) -> Duration {
    let dir = root.join(format!("ctd-{label}"));
    let ctd = Containerd::start(&dir).unwrap();
    let t = Instant::now();
    let out = ctd.pull(hosts, reference);
    let el = t.elapsed();
    assert!(
        out.status.success(),
        "{label}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A finished pull leaves ~2x the image as dirty pages; written back during the next
    // pull, they would be charged to it (measured: +/-50% between identical runs).
    drop(ctd);
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::process::Command::new("sync").status();
    el
}

/// Time from sending a GET to receiving the first body byte.
fn ttfb(addr: SocketAddr, path: &str) -> Duration {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    let t = Instant::now();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "closed before the body");
        seen.extend_from_slice(&buf[..n]);
        if let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n")
            && seen.len() > end + 4
        {
            let el = t.elapsed();
            let status = String::from_utf8_lossy(&seen[..12]).to_string();
            assert!(status.contains("200"), "{status}");
            return el;
        }
    }
}

fn main() {
    let layer_mib: usize = std::env::var("BENCH_LAYER_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64);
    let root = tempfile::tempdir().unwrap();
    let reg = Registry::start(&root.path().join("registry"), None).unwrap();
    let size = tests::push_tar_image(&reg, "bench/app", layer_mib * MIB, 300).unwrap();
    let reference = format!("{}/bench/app:v1", reg.addr);
    let rounds: usize = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let direct_hosts = hosts_dir(root.path(), "hosts-direct", &reg, None);
    let (mut direct, mut cold, mut warm) = (Vec::new(), Vec::new(), Vec::new());
    let mut last = None;
    for r in 0..rounds {
        // A fresh supernode and daemon per round, so the cold pull is cold.
        let sn = SupernodeProc::start(&root.path().join(format!("sn{r}"))).unwrap();
        let d = DaemonProc::start(&sn, root.path(), &format!("bench{r}"), &[]).unwrap();
        let mirror_hosts = hosts_dir(
            root.path(),
            &format!("hosts-mirror{r}"),
            &reg,
            Some(d.proxy_addr),
        );
        direct.push(timed_pull(root.path(), "direct", &direct_hosts, &reference));
        cold.push(timed_pull(root.path(), "cold", &mirror_hosts, &reference));
        warm.push(timed_pull(root.path(), "warm", &mirror_hosts, &reference));
        eprintln!(
            "round {r}: direct {:.3} s, cold {:.3} s, warm {:.3} s",
            direct[r].as_secs_f64(),
            cold[r].as_secs_f64(),
            warm[r].as_secs_f64()
        );
        last = Some((sn, d));
    }
    let (_sn, d) = last.expect("at least one round");

    // Time to first byte of a blob nobody has: registry vs a daemon's mirror.
    let mut reg_ttfb = Vec::new();
    let mut mirror_ttfb = Vec::new();
    for i in 0..5 {
        let blob = random_bytes(32 * MIB, 900 + i);
        let dg = reg.push_blob("bench/ttfb", &blob, None).unwrap();
        reg_ttfb.push(ttfb(reg.addr, &format!("/v2/bench/ttfb/blobs/{dg}")));
        let blob2 = random_bytes(32 * MIB, 950 + i);
        let dg2 = reg.push_blob("bench/ttfb", &blob2, None).unwrap();
        mirror_ttfb.push(ttfb(
            d.proxy_addr,
            &format!("/v2/bench/ttfb/blobs/{dg2}?ns={}", reg.addr),
        ));
    }
    reg_ttfb.sort();
    mirror_ttfb.sort();
    let med = |v: &[Duration]| v[v.len() / 2].as_secs_f64() * 1000.0;

    for v in [&mut direct, &mut cold, &mut warm] {
        v.sort();
    }
    let median = |v: &[Duration]| v[v.len() / 2];
    let (best_direct, cold, warm) = (median(&direct), median(&cold), median(&warm));
    println!(
        "| `ctr images pull` of a {:.0} MiB 3-layer image (median of {rounds}) | time | vs direct |",
        size as f64 / MIB as f64
    );
    println!("|---|---|---|");
    println!(
        "| straight from the registry | {:.3} s | 1.00 |",
        best_direct.as_secs_f64()
    );
    println!(
        "| through a cold dfdaemon mirror | {:.3} s | {:.2} |",
        cold.as_secs_f64(),
        cold.as_secs_f64() / best_direct.as_secs_f64()
    );
    println!(
        "| through a warm dfdaemon mirror | {:.3} s | {:.2} |",
        warm.as_secs_f64(),
        warm.as_secs_f64() / best_direct.as_secs_f64()
    );
    println!();
    println!("| time to first byte, 32 MiB blob nobody has (median of 5) | ms |");
    println!("|---|---|");
    println!("| registry | {:.1} |", med(&reg_ttfb));
    println!("| dfdaemon mirror (cold) | {:.1} |", med(&mirror_ttfb));
}
