//! `cargo bench -p tests --bench p2p`: side-by-side numbers for the P2P core, one run.
//!
//! 1. Cached fetch: `dfget -O -` of a file the daemon already holds vs `cat` of the same
//!    file (page cache warm for both), both into a pipe drained by `cat > /dev/null`.
//! 2. Daemon-to-daemon: a second daemon fetching the file from the first (every piece
//!    over QUIC, verified, stored) vs a bare quinn stream of the same size on loopback with
//!    the same TLS setup.
//! 3. Peak RSS (VmHWM) of an idle daemon and of the daemons after the transfers.
//!
//! Size: `BENCH_MIB` (default 1024). Prints a markdown table.

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use supernode::tls::ClusterCa;
use tests::{DaemonProc, Origin, SupernodeProc, random_bytes};

const MIB: usize = 1 << 20;

fn vm_hwm_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .map(|l| l.to_string())
        })
        .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

/// User+system CPU seconds a process has used so far.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are 14 and 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

fn time_shell(cmd: &str) -> Duration {
    let t = Instant::now();
    let st = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success(), "{cmd}");
    t.elapsed()
}

fn best_of(n: usize, mut f: impl FnMut() -> Duration) -> Duration {
    (0..n).map(|_| f()).min().unwrap()
}

fn bare_quinn(size: usize) -> Duration {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca =
        ClusterCa::load_or_create(&dir.path().join("ca.pem"), &dir.path().join("k.pem")).unwrap();
    let id_s = ca.issue(&[proto::PEER_SERVER_NAME]).unwrap();
    let id_c = ca.issue(&["client"]).unwrap();
    rt.block_on(async {
        let server = quinn::Endpoint::server(
            ca.server_config(&id_s, proto::PEER_ALPN).unwrap(),
            "127.0.0.1:0".parse().unwrap(),
        )
        .unwrap();
        let addr = server.local_addr().unwrap();
        let sender = tokio::spawn(async move {
            let conn = server.accept().await.unwrap().await.unwrap();
            let mut s = conn.open_uni().await.unwrap();
            let chunk = bytes::Bytes::from(vec![7u8; 4 * MIB]);
            for _ in 0..size / (4 * MIB) {
                s.write_chunk(chunk.clone()).await.unwrap();
            }
            s.finish().unwrap();
            let _ = s.stopped().await;
        });
        let client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        let conn = client
            .connect_with(
                ca.client_config(&id_c, proto::PEER_ALPN).unwrap(),
                addr,
                proto::PEER_SERVER_NAME,
            )
            .unwrap()
            .await
            .unwrap();
        let mut r = conn.accept_uni().await.unwrap();
        let t = Instant::now();
        let mut got = 0usize;
        let mut buf = vec![0u8; 1 << 20];
        while let Some(n) = r.read(&mut buf).await.unwrap() {
            got += n;
        }
        let el = t.elapsed();
        assert_eq!(got, size / (4 * MIB) * 4 * MIB);
        sender.await.unwrap();
        el
    })
}

/// Writes `size` bytes as 4 MiB pieces from 16 threads into a new sparse file, as the
/// piece store does: the storage bound of a fetching daemon on this machine.
fn bare_store_writes(dir: &std::path::Path, size: usize) -> Duration {
    use std::os::unix::fs::FileExt;
    let path = dir.join("pwrite.bin");
    let _ = std::fs::remove_file(&path);
    let f = std::fs::File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    f.set_len(size as u64).unwrap();
    let piece = vec![5u8; 4 * MIB];
    let next = std::sync::atomic::AtomicUsize::new(0);
    let t = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..16 {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= size / (4 * MIB) {
                        break;
                    }
                    f.write_all_at(&piece, (i * 4 * MIB) as u64).unwrap();
                }
            });
        }
    });
    let el = t.elapsed();
    let _ = std::fs::remove_file(&path);
    el
}

fn rate(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e6
}

fn main() {
    let mib: usize = std::env::var("BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let size = mib * MIB;
    let root = tempfile::tempdir().unwrap();
    let data = random_bytes(size, 42);
    let file = root.path().join("source.bin");
    std::fs::write(&file, &data).unwrap();
    let origin = Origin::start(HashMap::from([("f".to_string(), data)]), true).unwrap();
    let url = origin.url("f");
    let sn = SupernodeProc::start(&root.path().join("sn")).unwrap();
    let d0 = DaemonProc::start(&sn, root.path(), "bench0", &[]).unwrap();
    let d1 = DaemonProc::start(&sn, root.path(), "bench1", &[]).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let idle_rss = vm_hwm_kib(d1.proc.pid().unwrap_or(0));

    // This VM's page-cache writes slow down a lot while earlier writes are still being
    // written back, so each measured phase starts with no dirty pages of an earlier one.
    let settle = || time_shell("sync");
    let dfget_bin = tests::bins().dfget.display().to_string();
    settle();
    // Warm d0 from the origin (output discarded: only the daemon's store writes).
    let sock0 = d0.sock.display().to_string();
    let origin_time = time_shell(&format!(
        "{dfget_bin} {url} -O - --no-progress --daemon-sock {sock0} > /dev/null"
    ));
    settle();

    // Let d0's last announcement land, so every piece has a parent.
    std::thread::sleep(Duration::from_secs(1));
    // Daemon-to-daemon: d1 fetches everything from d0 (output discarded).
    let (p0, p1) = (d0.proc.pid().unwrap_or(0), d1.proc.pid().unwrap_or(0));
    let (c0, c1) = (cpu_secs(p0), cpu_secs(p1));
    let t = Instant::now();
    let sock1 = d1.sock.display().to_string();
    time_shell(&format!(
        "{dfget_bin} {url} -O - --no-progress --daemon-sock {sock1} > /dev/null"
    ));
    let p2p_time = t.elapsed();
    let (c0, c1) = (cpu_secs(p0) - c0, cpu_secs(p1) - c1);
    let from_peers = d1.metric("dfdaemon_piece_bytes_total", "source=\"peer\"");
    assert_eq!(from_peers as usize, size, "all bytes came from the peer");
    settle();
    let quinn_time = best_of(3, || bare_quinn(size));
    settle();
    let pwrite_time = bare_store_writes(root.path(), size);
    settle();

    // Cached fetch vs cat, both piped into `cat > /dev/null`.
    let dfget = tests::bins().dfget.display().to_string();
    let sock = d0.sock.display().to_string();
    let cat_time = best_of(3, || {
        time_shell(&format!("cat {} > /dev/null", file.display()))
    });
    let cached_time = best_of(3, || {
        time_shell(&format!(
            "{dfget} {url} -O - --no-progress --daemon-sock {sock} > /dev/null"
        ))
    });
    let copy = root.path().join("copy");
    let cp_time = best_of(3, || {
        settle();
        time_shell(&format!("cat {} > {}", file.display(), copy.display()))
    });
    let cached_file_time = best_of(3, || {
        settle();
        time_shell(&format!(
            "{dfget} {url} -O {} --no-progress --daemon-sock {sock}",
            copy.display()
        ))
    });
    let busy_rss0 = vm_hwm_kib(d0.proc.pid().unwrap_or(0));
    let busy_rss1 = vm_hwm_kib(d1.proc.pid().unwrap_or(0));

    println!("| measurement ({mib} MiB) | time | MB/s | ratio |");
    println!("|---|---|---|---|");
    println!(
        "| `cat file > /dev/null` | {:.3} s | {:.0} | 1.00 |",
        cat_time.as_secs_f64(),
        rate(size, cat_time)
    );
    println!(
        "| cached `dfget -O - > /dev/null` | {:.3} s | {:.0} | {:.2} of cat |",
        cached_time.as_secs_f64(),
        rate(size, cached_time),
        cat_time.as_secs_f64() / cached_time.as_secs_f64()
    );
    println!(
        "| `cat file > copy` | {:.3} s | {:.0} | 1.00 |",
        cp_time.as_secs_f64(),
        rate(size, cp_time)
    );
    println!(
        "| cached `dfget -O copy` | {:.3} s | {:.0} | {:.2} of cat |",
        cached_file_time.as_secs_f64(),
        rate(size, cached_file_time),
        cp_time.as_secs_f64() / cached_file_time.as_secs_f64()
    );
    println!(
        "| bare quinn stream, loopback | {:.3} s | {:.0} | 1.00 |",
        quinn_time.as_secs_f64(),
        rate(size, quinn_time)
    );
    println!(
        "| daemon-to-daemon `dfget -O - > /dev/null` (verified, stored) | {:.3} s | {:.0} | {:.2} of quinn |",
        p2p_time.as_secs_f64(),
        rate(size, p2p_time),
        quinn_time.as_secs_f64() / p2p_time.as_secs_f64()
    );
    println!(
        "| bare page-cache writes, 16 threads x 4 MiB pwrite, new file | {:.3} s | {:.0} | |",
        pwrite_time.as_secs_f64(),
        rate(size, pwrite_time)
    );
    println!(
        "| CPU during daemon-to-daemon: serving daemon {c0:.2} s, fetching daemon {c1:.2} s, over {:.2} s wall (2 cores) | | | |",
        p2p_time.as_secs_f64()
    );
    println!(
        "| first fetch from the local HTTP origin | {:.3} s | {:.0} | |",
        origin_time.as_secs_f64(),
        rate(size, origin_time)
    );
    println!();
    if let Ok(dir) = std::env::var("BENCH_LOGS") {
        for name in ["bench0.log", "bench1.log"] {
            let _ = std::fs::copy(
                root.path().join(name),
                std::path::Path::new(&dir).join(name),
            );
        }
    }
    println!("| daemon | peak RSS (VmHWM) |");
    println!("|---|---|");
    println!("| idle daemon | {} MiB |", idle_rss / 1024);
    println!(
        "| busy daemon (served {mib} MiB to a peer, then cached reads) | {} MiB |",
        busy_rss0 / 1024
    );
    println!(
        "| busy daemon (fetched {mib} MiB from a peer) | {} MiB |",
        busy_rss1 / 1024
    );
}
