//! The swarm benchmark in its small form (`bench/swarm.sh --quick`): 4 hosts in their own
//! network namespaces with 100 Mbit/s upload limits (htb), an nginx origin, a supernode
//! and a dfdaemon per host, 64 MiB fetched on all hosts at once, plus the same blob
//! through every host's registry mirror. The script fails unless every host got the right
//! bytes and the origin sent at most 1.1 x the file per variant; times are reported, not
//! asserted.

use std::path::Path;
use std::process::Command;

#[test]
fn quick_swarm_in_network_namespaces_gets_every_byte_right_with_one_origin_copy() {
    let uid = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    assert_eq!(
        uid, "0",
        "this test builds network namespaces and needs root (CI runs as root)"
    );
    let bins = tests::bins();
    let bin_dir = bins.dfdaemon.parent().expect("binary dir");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/swarm.sh");
    let out = Command::new("bash")
        .arg(&script)
        .arg("--quick")
        .env("BIN_DIR", bin_dir)
        .env("VARIANTS", "dfp2p,mirror")
        .env("BENCH_MD", "0")
        .output()
        .expect("running bench/swarm.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stdout}");
    assert!(
        out.status.success(),
        "bench/swarm.sh --quick failed ({:?}):\n{stdout}\n{stderr}",
        out.status.code()
    );
    for variant in ["dfp2p (dfget)", "dfp2p (registry mirror, curl)"] {
        let row = stdout
            .lines()
            .find(|l| l.starts_with(&format!("| {variant}")))
            .unwrap_or_else(|| panic!("no result row for {variant}:\n{stdout}"));
        assert!(row.contains("| 4/4 |"), "every host done: {row}");
    }
}
