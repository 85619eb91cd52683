//! The P2P core, end to end: real supernode, daemons and dfget processes on loopback,
//! a counting HTTP origin.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use tests::{DaemonProc, Origin, SupernodeProc, file_sha256, random_bytes, sha256_hex};

const MIB: usize = 1 << 20;

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out waiting for {what}");
}

/// A supernode with `scheduler` (lines of its `[scheduler]` table) and 1 MiB pieces, and
/// an origin serving `f`: one such piece of random data, a chunk every `pace`. For tests
/// whose timing is worked out for a single piece. Returns the file's sha256 too.
fn one_paced_piece(
    root: &Path,
    scheduler: &str,
    pace: Duration,
    seed: u64,
) -> (SupernodeProc, Origin, String) {
    let sn = SupernodeProc::start_with_config(
        &root.join("supernode"),
        &format!("[scheduler]\n{scheduler}min_piece_size = {MIB}\nmax_piece_size = {MIB}\n"),
    )
    .unwrap();
    let data = random_bytes(MIB, seed);
    let want = sha256_hex(&data);
    let origin = Origin::start_paced(HashMap::from([("f".to_string(), data)]), pace).unwrap();
    (sn, origin, want)
}

fn cluster(root: &Path, n: usize) -> (SupernodeProc, Vec<DaemonProc>) {
    cluster_with(root, n, &[])
}

fn cluster_with(root: &Path, n: usize, args: &[&str]) -> (SupernodeProc, Vec<DaemonProc>) {
    let sn = SupernodeProc::start(&root.join("supernode")).expect("supernode");
    let daemons = (0..n)
        .map(|i| DaemonProc::start(&sn, root, &format!("d{i}"), args).expect("daemon"))
        .collect();
    (sn, daemons)
}

/// Runs dfget on every daemon at once and checks that each one succeeded and wrote the
/// bytes whose sha256 is `want`.
fn fetch_all(daemons: &[DaemonProc], url: &str, root: &Path, want: &str) {
    let children: Vec<_> = daemons
        .iter()
        .enumerate()
        .map(|(i, d)| (i, d.dfget_spawn(url, &root.join(format!("out{i}")), &[])))
        .collect();
    for (i, c) in children {
        let out = c.wait_with_output().expect("dfget");
        assert!(
            out.status.success(),
            "dfget on d{i} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            file_sha256(&root.join(format!("out{i}"))).unwrap(),
            want,
            "d{i} bytes"
        );
    }
}

#[test]
fn five_daemons_fetch_256mib_with_origin_sending_it_about_once() {
    let root = tempfile::tempdir().unwrap();
    let size = std::env::var("P2P_TEST_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
        * MIB;
    let data = random_bytes(size, 1);
    let want = sha256_hex(&data);
    let origin = Origin::start(HashMap::from([("big.bin".to_string(), data)]), true).unwrap();
    let (_sn, daemons) = cluster(root.path(), 5);
    fetch_all(&daemons, &origin.url("big.bin"), root.path(), &want);
    let sent = origin.bytes_sent();
    let ratio = sent as f64 / size as f64;
    eprintln!("origin sent {sent} bytes = {ratio:.4} x file size");
    assert!(ratio <= 1.05, "origin sent {ratio:.3} x the file");
    let from_peers: f64 = daemons
        .iter()
        .map(|d| d.metric("dfdaemon_piece_bytes_total", "source=\"peer\""))
        .sum();
    assert!(
        from_peers >= 3.0 * size as f64,
        "most bytes moved between daemons: {from_peers}"
    );
    // Some pieces were taken from their origin fetch while it landed (a requester sent
    // for that may also find the piece already stored, so the counts differ).
    let sum = |name: &str| -> f64 { daemons.iter().map(|d| d.metric(name, "")).sum() };
    let (taken, sent) = (
        sum("dfdaemon_landing_pieces_total"),
        sum("dfdaemon_landing_uploads_total"),
    );
    eprintln!("landing relays: {taken} pieces taken, {sent} sent");
    assert!(
        taken > 0.0 && sent > 0.0,
        "no piece was relayed while it landed"
    );
}

/// Polls a daemon until its task has at least `n` pieces stored.
fn wait_pieces(d: &DaemonProc, n: u64, timeout: Duration) {
    wait_for(
        &format!("{} to hold {n} pieces", d.host_id),
        timeout,
        || {
            d.task()
                .ok()
                .and_then(|t| t["pieces_stored"].as_u64())
                .is_some_and(|s| s >= n)
        },
    );
}

#[test]
fn killed_daemon_does_not_stop_the_others_and_resumes_after_restart() {
    let root = tempfile::tempdir().unwrap();
    let data = random_bytes(128 * MIB, 2);
    let want = sha256_hex(&data);
    let origin = Origin::start(HashMap::from([("f".to_string(), data)]), true).unwrap();
    let url = origin.url("f");
    let (_sn, mut daemons) = cluster(root.path(), 5);
    let children: Vec<_> = daemons
        .iter()
        .enumerate()
        .map(|(i, d)| d.dfget_spawn(&url, &root.path().join(format!("out{i}")), &[]))
        .collect();
    wait_pieces(&daemons[4], 6, Duration::from_secs(60));
    // Stored pieces become durable when announced (one sync per batch); give the batch
    // in flight a moment, as a real crash would not wait for us.
    std::thread::sleep(Duration::from_millis(300));
    daemons[4].kill();
    for (i, c) in children.into_iter().enumerate() {
        let out = c.wait_with_output().unwrap();
        if i == 4 {
            assert!(
                !out.status.success(),
                "dfget on the killed daemon must fail"
            );
            continue;
        }
        assert!(
            out.status.success(),
            "d{i}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            file_sha256(&root.path().join(format!("out{i}"))).unwrap(),
            want
        );
    }
    assert!(
        !root.path().join("out4").exists(),
        "no partial file left behind"
    );

    daemons[4].restart().unwrap();
    let out = daemons[4].dfget(&url, &root.path().join("out4"), &[]);
    tests::assert_success(&out);
    assert_eq!(file_sha256(&root.path().join("out4")).unwrap(), want);
    let t = daemons[4].task().unwrap();
    let (total, at_start) = (
        t["pieces_total"].as_u64().unwrap(),
        t["pieces_at_start"].as_u64().unwrap(),
    );
    let fetched =
        t["pieces_from_origin"].as_u64().unwrap() + t["pieces_from_peers"].as_u64().unwrap();
    eprintln!("restarted daemon: {at_start} of {total} pieces survived, fetched {fetched}");
    assert!(at_start >= 6, "pieces stored before the kill survived: {t}");
    assert_eq!(
        fetched,
        total - at_start,
        "fetched only what it lacked: {t}"
    );
}

#[test]
fn corrupt_piece_on_disk_is_never_served() {
    let root = tempfile::tempdir().unwrap();
    let data = random_bytes(16 * MIB, 3);
    let want = sha256_hex(&data);
    let origin = Origin::start(HashMap::from([("f".to_string(), data)]), true).unwrap();
    let url = origin.url("f");
    // Nothing in memory: every upload is read back from disk (where the flip will be).
    let (_sn, daemons) = cluster_with(root.path(), 2, &["--memory-cache", "0"]);
    let out = daemons[0].dfget(&url, &root.path().join("a"), &[]);
    tests::assert_success(&out);
    let task = daemons[0].task().unwrap()["task"]
        .as_str()
        .unwrap()
        .to_string();
    let sent_before = origin.bytes_sent();
    assert_eq!(
        nlink(&root.path().join("a")),
        2,
        "output linked to the store"
    );

    // Flip one byte in piece 2 of d0's data file, under the running daemon (and so in
    // the output `a` that shares it).
    let path = daemons[0].data_file(&task);
    let mut bytes = std::fs::read(&path).unwrap();
    let at = 2 * 4 * MIB + 12345;
    bytes[at] ^= 0x40;
    std::fs::write(&path, &bytes).unwrap();

    let out = daemons[1].dfget(&url, &root.path().join("b"), &[]);
    tests::assert_success(&out);
    assert_eq!(
        file_sha256(&root.path().join("b")).unwrap(),
        want,
        "requester got the right bytes"
    );
    assert!(
        daemons[0].metric("dfdaemon_corrupt_local_pieces_total", "") >= 1.0,
        "d0 caught its corrupt piece"
    );
    assert!(
        daemons[1].metric("dfdaemon_piece_failures_total", "reason=\"corrupt\"") >= 1.0,
        "d1 saw the piece refused as corrupt"
    );
    let refetched = origin.bytes_sent() - sent_before;
    assert!(
        refetched <= 4 * MIB as u64,
        "only the bad piece came from the origin again ({refetched} bytes)"
    );

    // d0 itself repairs: its next read refetches the dropped piece.
    let out = daemons[0].dfget(&url, &root.path().join("a2"), &[]);
    tests::assert_success(&out);
    assert_eq!(file_sha256(&root.path().join("a2")).unwrap(), want);
    // The repair went to the store's own copy, not into the caller's file `a`.
    assert_eq!(std::fs::read(root.path().join("a")).unwrap()[at], bytes[at]);
}

#[test]
fn supernode_stopped_mid_run_downloads_still_complete_and_reannounce_later() {
    let root = tempfile::tempdir().unwrap();
    let data = random_bytes(128 * MIB, 4);
    let want = sha256_hex(&data);
    let origin = Origin::start(HashMap::from([("f".to_string(), data)]), true).unwrap();
    let url = origin.url("f");
    let (mut sn, daemons) = cluster(root.path(), 3);
    let children: Vec<_> = daemons
        .iter()
        .enumerate()
        .map(|(i, d)| d.dfget_spawn(&url, &root.path().join(format!("out{i}")), &[]))
        .collect();
    wait_pieces(&daemons[0], 4, Duration::from_secs(60));
    sn.kill();
    for (i, c) in children.into_iter().enumerate() {
        let out = c.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "d{i}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            file_sha256(&root.path().join(format!("out{i}"))).unwrap(),
            want,
            "d{i}"
        );
    }
    // A download started while the supernode is down works too (origin).
    let out = daemons[1].dfget(&url, &root.path().join("again"), &[]);
    assert!(out.status.success());

    // When it returns, every daemon registers again and re-announces its pieces.
    sn.restart().unwrap();
    wait_for(
        "hosts and pieces re-announced",
        Duration::from_secs(30),
        || {
            let Ok(tasks) = sn.get_json("/api/v1/tasks") else {
                return false;
            };
            let Some(t) = tasks.as_array().and_then(|a| a.first()) else {
                return false;
            };
            let total = t["pieces"].as_u64().unwrap_or(0);
            let full = t["peers"].as_array().map_or(0, |p| {
                p.iter()
                    .filter(|p| p["pieces"].as_u64() == Some(total))
                    .count()
            });
            full == 3 && total > 0
        },
    );
    let hosts = sn.get_json("/api/v1/hosts").unwrap();
    assert_eq!(hosts.as_array().unwrap().len(), 3);
}

/// Announces that could not reach the supernode are sent again once it answers, by the
/// heartbeat, without the daemon registering again: a daemon that fetched a file while
/// the supernode was frozen (SIGSTOP, not restarted) is then a parent for it.
#[test]
fn announces_lost_while_the_supernode_was_frozen_arrive_later() {
    let root = tempfile::tempdir().unwrap();
    // Long enough that the frozen supernode does not drop the hosts when it wakes.
    let sn = SupernodeProc::start_with_config(
        &root.path().join("supernode"),
        "[scheduler]\nhost_timeout_secs = 120\n",
    )
    .unwrap();
    let data = random_bytes(8 * MIB, 13);
    let want = sha256_hex(&data);
    let len = data.len() as u64;
    let origin = Origin::start(HashMap::from([("f".to_string(), data)]), true).unwrap();
    let url = origin.url("f");
    let a = DaemonProc::start(&sn, root.path(), "a", &[]).unwrap();
    let b = DaemonProc::start(&sn, root.path(), "b", &[]).unwrap();
    let pid = sn.proc.pid().unwrap().to_string();
    let signal = |sig: &str| {
        let st = std::process::Command::new("kill")
            .args([sig, pid.as_str()])
            .status()
            .unwrap();
        assert!(st.success(), "kill {sig}");
    };
    signal("-STOP");
    let out = a.dfget(&url, &root.path().join("a.out"), &[]);
    let pending = a.metric("dfdaemon_pending_announces", "");
    signal("-CONT");
    assert!(pending >= 8.0, "{pending} announces pending while frozen");
    tests::assert_success(&out);
    assert_eq!(file_sha256(&root.path().join("a.out")).unwrap(), want);
    wait_for(
        "a's pieces to reach the supernode",
        Duration::from_secs(30),
        || {
            let Ok(tasks) = sn.get_json("/api/v1/tasks") else {
                return false;
            };
            tasks.as_array().and_then(|a| a.first()).is_some_and(|t| {
                let all = t["pieces"].as_u64().filter(|&n| n > 0);
                t["peers"].as_array().is_some_and(|p| {
                    p.iter()
                        .any(|p| all.is_some() && p["pieces"].as_u64() == all)
                })
            })
        },
    );
    let registrations = sn.metric(
        "supernode_control_requests_total",
        "kind=\"register_host\",result=\"ok\"",
    );
    assert_eq!(registrations, 2.0, "each daemon registered once");
    wait_for("no announce pending", Duration::from_secs(10), || {
        a.metric("dfdaemon_pending_announces", "") == 0.0
    });
    let sent = origin.bytes_sent();
    tests::assert_success(&b.dfget(&url, &root.path().join("b.out"), &[]));
    assert_eq!(file_sha256(&root.path().join("b.out")).unwrap(), want);
    let again = origin.bytes_sent() - sent;
    assert!(again < len / 8, "b took {again} bytes from the origin");
}

#[test]
fn embedded_supernode_default_serves_a_file() {
    let root = tempfile::tempdir().unwrap();
    let data = random_bytes(5 * MIB + 7, 5);
    let want = sha256_hex(&data);
    let origin = Origin::start(HashMap::from([("f".to_string(), data)]), true).unwrap();
    let sock = root.path().join("d.sock");
    let mut cmd = std::process::Command::new(&tests::bins().dfdaemon);
    cmd.arg("--data-dir")
        .arg(root.path().join("d"))
        .arg("--api-sock")
        .arg(&sock)
        .arg("--peer-listen")
        .arg("127.0.0.1:0")
        .arg("--proxy-listen")
        .arg("127.0.0.1:0");
    let _d = tests::Proc::spawn_cmd("embedded", cmd, root.path().join("d.log")).unwrap();
    wait_for("embedded daemon", Duration::from_secs(20), || {
        tests::unix_get(&sock, "/healthz").is_ok()
    });
    let out = tests::dfget_cmd(
        &sock,
        &origin.url("f"),
        &root.path().join("o"),
        &["--digest", &format!("sha256:{want}")],
    )
    .output()
    .unwrap();
    tests::assert_success(&out);
    assert_eq!(file_sha256(&root.path().join("o")).unwrap(), want);
    // -O on the daemon's filesystem is a hard link to the verified store file: the
    // bytes were written once.
    assert_eq!(nlink(&root.path().join("o")), 2, "o and the store's name");
    // The caller writes into its file in place, through the shared inode.
    let mut scribbled = std::fs::read(root.path().join("o")).unwrap();
    scribbled[MIB + 3] ^= 0xff;
    std::fs::write(root.path().join("o"), &scribbled).unwrap();
    // Second fetch is a cache hit: the origin sees no more body bytes.
    let before = origin.bytes_sent();
    let out = tests::dfget_cmd(
        &sock,
        &origin.url("f"),
        &root.path().join("o2"),
        &["--digest", &want],
    )
    .output()
    .unwrap();
    tests::assert_success(&out);
    // The second caller gets the right bytes (the scribbled piece was caught on disk and
    // refetched, 1 MiB from the origin) in a file of its own; the first keeps its edit.
    assert_eq!(file_sha256(&root.path().join("o2")).unwrap(), want);
    assert_eq!(std::fs::read(root.path().join("o")).unwrap(), scribbled);
    assert_eq!(nlink(&root.path().join("o")), 1, "o left the store");
    assert_eq!(nlink(&root.path().join("o2")), 2, "o2 and the store's name");
    let refetched = origin.bytes_sent() - before;
    assert!(
        refetched <= 2 * MIB as u64,
        "only the bad piece again: {refetched}"
    );
    let before = origin.bytes_sent();
    // On another filesystem (tmpfs) the file is copied; stdout is streamed.
    let shm = tempfile::tempdir_in("/dev/shm").unwrap();
    let same = ["--digest", want.as_str()];
    let out = tests::dfget_cmd(&sock, &origin.url("f"), &shm.path().join("o3"), &same)
        .output()
        .unwrap();
    tests::assert_success(&out);
    assert_eq!(file_sha256(&shm.path().join("o3")).unwrap(), want);
    assert_eq!(nlink(&shm.path().join("o3")), 1);
    let out = tests::dfget_cmd(&sock, &origin.url("f"), Path::new("-"), &same)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(sha256_hex(&out.stdout), want);
    assert_eq!(origin.bytes_sent(), before);
}

fn nlink(p: &Path) -> u64 {
    std::os::unix::fs::MetadataExt::nlink(&std::fs::metadata(p).unwrap())
}

#[test]
fn origin_without_range_is_streamed_once_and_shared() {
    let root = tempfile::tempdir().unwrap();
    let data = random_bytes(40 * MIB + 3, 6);
    let want = sha256_hex(&data);
    let origin = Origin::start(HashMap::from([("f".to_string(), data)]), false).unwrap();
    let (_sn, daemons) = cluster(root.path(), 3);
    fetch_all(&daemons, &origin.url("f"), root.path(), &want);
    let ratio = origin.bytes_sent() as f64 / (40 * MIB) as f64;
    eprintln!(
        "no-range origin sent {ratio:.3} x file size in {} requests",
        origin.requests()
    );
    for d in &daemons {
        eprintln!("{}: {}", d.host_id, d.task().unwrap());
    }
    // The probe's 200 answer is the one stream every piece comes from.
    assert!(ratio <= 1.05, "origin sent {ratio:.3} x the file");
}

/// `--worker-threads` sizes the daemon's runtime (the swarm bench runs each of its 16
/// daemons on one, as they share two CPUs), and daemons on one worker still share a file.
#[test]
fn daemons_on_one_worker_thread_share_a_file() {
    let root = tempfile::tempdir().unwrap();
    let data = random_bytes(8 * MIB, 7);
    let want = sha256_hex(&data);
    let origin = Origin::start(HashMap::from([("f.bin".to_string(), data)]), true).unwrap();
    let (sn, daemons) = cluster_with(root.path(), 2, &["--worker-threads", "1"]);
    // Three differs from one and from the default on this 2-CPU machine.
    let three = DaemonProc::start(&sn, root.path(), "w3", &["--worker-threads", "3"]).unwrap();
    for (d, n) in daemons.iter().map(|d| (d, 1)).chain([(&three, 3)]) {
        let log = d.proc.log_tail();
        assert!(
            log.lines()
                .any(|l| l.contains("dfdaemon starting") && l.contains(&format!("workers={n} "))),
            "{} did not start with {n} workers:\n{log}",
            d.host_id
        );
    }
    fetch_all(&daemons, &origin.url("f.bin"), root.path(), &want);
    assert!(
        daemons
            .iter()
            .map(|d| d.metric("dfdaemon_pieces_total", "source=\"peer\""))
            .sum::<f64>()
            > 0.0,
        "no piece went from one daemon to the other"
    );
}

/// A slow but live origin fetch keeps its lease: the daemon renews it while bytes
/// arrive, so the piece is not handed to a second host and fetched from the origin
/// twice. The lease here (10 s) is well under the fetch (16 chunks, 1 s apart).
#[test]
fn slow_origin_fetch_keeps_its_lease() {
    let root = tempfile::tempdir().unwrap();
    // No landing relays: the second host can only wait for the piece or take the lease.
    let (sn, origin, want) = one_paced_piece(
        root.path(),
        "origin_lease_secs = 10\nlanding_relays = 0\n",
        Duration::from_secs(1),
        12,
    );
    let a = DaemonProc::start(&sn, root.path(), "a", &[]).unwrap();
    let b = DaemonProc::start(&sn, root.path(), "b", &[]).unwrap();
    let (out_a, out_b) = (root.path().join("a.out"), root.path().join("b.out"));
    let mut first = a.dfget_spawn(&origin.url("f"), &out_a, &[]);
    std::thread::sleep(Duration::from_secs(1));
    let second = b.dfget(&origin.url("f"), &out_b, &[]);
    assert!(first.wait().unwrap().success(), "first dfget failed");
    tests::assert_success(&second);
    assert_eq!(file_sha256(&out_a).unwrap(), want);
    assert_eq!(file_sha256(&out_b).unwrap(), want);
    let sent = origin.bytes_sent();
    assert!(
        sent < MIB as u64 * 3 / 2,
        "the origin sent the piece more than once: {sent} bytes"
    );
    assert!(sn.metric("supernode_origin_lease_renewals_total", "") >= 1.0);
    assert_eq!(sn.metric("supernode_origin_leases_lapsed_total", ""), 0.0);
}

/// A piece still landing at its lessee has no other source, so a relay the lessee
/// answers busy (its landing slots taken) asks again shortly instead of giving the piece
/// up to a whole fetch once it is stored.
#[test]
fn relay_answered_busy_by_a_landing_piece_asks_again() {
    let root = tempfile::tempdir().unwrap();
    // 16 paces of 60 ms: the piece lands over about 1 s, and the relay answered busy
    // asks again for 1.8 s.
    let (sn, origin, want) = one_paced_piece(
        root.path(),
        "landing_relays = 2\n",
        Duration::from_millis(60),
        13,
    );
    let one_slot = root.path().join("one-slot.toml");
    std::fs::write(&one_slot, "landing_upload_slots = 1\n").unwrap();
    let one_slot = one_slot.display().to_string();
    let a = DaemonProc::start(&sn, root.path(), "a", &["--config", &one_slot]).unwrap();
    let relays: Vec<DaemonProc> = ["b", "c"]
        .iter()
        .map(|n| DaemonProc::start(&sn, root.path(), n, &[]).unwrap())
        .collect();
    let mut first = a.dfget_spawn(&origin.url("f"), &root.path().join("a.out"), &[]);
    // The probe, then the piece's range: from then on the piece is landing at `a`.
    wait_for("the origin fetch to start", Duration::from_secs(30), || {
        origin.requests() >= 2
    });
    let children: Vec<_> = relays
        .iter()
        .map(|d| {
            let out = root.path().join(format!("{}.out", d.host_id));
            (d.dfget_spawn(&origin.url("f"), &out, &[]), out)
        })
        .collect();
    assert!(first.wait().unwrap().success(), "dfget on a failed");
    for (c, out) in children {
        let o = c.wait_with_output().unwrap();
        tests::assert_success(&o);
        assert_eq!(file_sha256(&out).unwrap(), want);
    }
    assert!(
        origin.bytes_sent() < MIB as u64 * 3 / 2,
        "the origin sent the piece more than once: {} bytes",
        origin.bytes_sent()
    );
    let taken: f64 = relays
        .iter()
        .map(|d| d.metric("dfdaemon_landing_pieces_total", ""))
        .sum();
    // One relay had the slot; the other was told busy at least once and still took the
    // piece on the landing path (as it landed, or whole if it was done by the time it
    // asked again), not as a fresh assignment after it was stored.
    assert!(
        a.metric("dfdaemon_upload_busy_total", "") >= 1.0,
        "the single landing slot was never contended"
    );
    assert_eq!(taken, 2.0, "a relay gave the landing piece up");
}

/// By default every origin request (the probe and each range) comes on a connection of
/// its own; with `reuse_origin_connections = true` the daemon keeps them.
#[test]
fn origin_requests_get_a_connection_each_unless_reused() {
    let root = tempfile::tempdir().unwrap();
    let sn = SupernodeProc::start(&root.path().join("supernode")).unwrap();
    let kept_cfg = root.path().join("kept.toml");
    std::fs::write(&kept_cfg, "reuse_origin_connections = true\n").unwrap();
    let kept_arg = kept_cfg.display().to_string();
    for (name, extra, fresh) in [
        ("fresh", vec![], true),
        ("kept", vec!["--config", kept_arg.as_str()], false),
    ] {
        let data = random_bytes(16 * MIB, 11);
        let want = sha256_hex(&data);
        let origin = Origin::start(HashMap::from([("f".to_string(), data)]), true).unwrap();
        let d = DaemonProc::start(&sn, root.path(), name, &extra).unwrap();
        let out = root.path().join(format!("{name}.out"));
        tests::assert_success(&d.dfget(&origin.url("f"), &out, &[]));
        assert_eq!(file_sha256(&out).unwrap(), want);
        let (requests, connections) = (origin.requests(), origin.connections());
        assert!(
            requests >= 17,
            "{name}: probe and 16 ranges, got {requests} requests"
        );
        if fresh {
            assert_eq!(connections, requests, "{name}: a connection per request");
        } else {
            assert!(
                connections < requests,
                "{name}: {connections} connections for {requests} requests"
            );
        }
    }
}
