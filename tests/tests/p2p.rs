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

fn cluster(root: &Path, n: usize) -> (SupernodeProc, Vec<DaemonProc>) {
    let sn = SupernodeProc::start(&root.join("supernode")).expect("supernode");
    let daemons = (0..n)
        .map(|i| DaemonProc::start(&sn, root, &format!("d{i}"), &[]).expect("daemon"))
        .collect();
    (sn, daemons)
}

/// Runs dfget on every daemon at once; returns (daemon index, exit ok, stderr).
fn fetch_all(daemons: &[DaemonProc], url: &str, root: &Path) -> Vec<(usize, bool, String)> {
    let children: Vec<_> = daemons
        .iter()
        .enumerate()
        .map(|(i, d)| (i, d.dfget_spawn(url, &root.join(format!("out{i}")), &[])))
        .collect();
    children
        .into_iter()
        .map(|(i, c)| {
            let out = c.wait_with_output().expect("dfget");
            (i, out.status.success(), String::from_utf8_lossy(&out.stderr).to_string())
        })
        .collect()
}

#[test]
fn five_daemons_fetch_256mib_with_origin_sending_it_about_once() {
    let root = tempfile::tempdir().unwrap();
    let size = std::env::var("P2P_TEST_MIB").ok().and_then(|v| v.parse().ok()).unwrap_or(256) * MIB;
    let data = random_bytes(size, 1);
    let want = sha256_hex(&data);
    let origin = Origin::start(HashMap::from([("big.bin".to_string(), data)]), true).unwrap();
    let (_sn, daemons) = cluster(root.path(), 5);
    let results = fetch_all(&daemons, &origin.url("big.bin"), root.path());
    for (i, ok, err) in &results {
        assert!(ok, "dfget on d{i} failed: {err}");
        assert_eq!(file_sha256(&root.path().join(format!("out{i}"))).unwrap(), want, "d{i} bytes");
    }
    let sent = origin.bytes_sent();
    let ratio = sent as f64 / size as f64;
    eprintln!("origin sent {sent} bytes = {ratio:.4} x file size");
    assert!(ratio <= 1.05, "origin sent {ratio:.3} x the file");
    let from_peers: f64 = daemons.iter().map(|d| d.metric("dfdaemon_piece_bytes_total", "source=\"peer\"")).sum();
    assert!(from_peers >= 3.0 * size as f64, "most bytes moved between daemons: {from_peers}");
}
