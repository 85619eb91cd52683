//! Pre-warm jobs end to end: a real registry, a supernode, 8 daemons with labels, the
//! `dfget prewarm` hook, and a real containerd pulling from a warmed node.

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use tests::{Containerd, DaemonProc, Registry, SupernodeProc};

const MIB: usize = 1 << 20;

fn prewarm(sn: &SupernodeProc, args: &[&str]) -> Output {
    Command::new(&tests::bins().dfget)
        .arg("prewarm")
        .args(args)
        .arg("--supernode")
        .arg(format!("http://{}", sn.api))
        .arg("--no-progress")
        .output()
        .expect("running dfget prewarm")
}

fn text(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn wait_hosts(sn: &SupernodeProc, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let count = sn
            .get_json("/api/v1/hosts")
            .ok()
            .and_then(|v| v.as_array().map(Vec::len))
            .unwrap_or(0);
        if count >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "only {count} of {n} hosts registered"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn job(sn: &SupernodeProc, id: &str) -> serde_json::Value {
    sn.get_json(&format!("/api/v1/prewarm/{id}")).unwrap()
}

fn hosts_of(batch: &serde_json::Value) -> Vec<String> {
    batch["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["host"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn batches_of_labelled_hosts_are_warmed_in_order_and_a_pull_needs_no_blob_from_the_registry() {
    let root = tempfile::tempdir().unwrap();
    let reg = Registry::start(&root.path().join("registry"), None).unwrap();
    let size = tests::push_tar_image(&reg, "rollout/app", 8 * MIB, 700).unwrap();
    let image = format!("{}/rollout/app:v1", reg.addr);
    let sn = SupernodeProc::start(&root.path().join("sn")).unwrap();
    let daemons: Vec<DaemonProc> = (0..8)
        .map(|i| {
            let role = if i < 6 { "role=web" } else { "role=db" };
            DaemonProc::start(&sn, root.path(), &format!("node{i}"), &["--label", role]).unwrap()
        })
        .collect();
    wait_hosts(&sn, 8);
    let labels = sn.get_json("/api/v1/hosts").unwrap();
    assert!(
        labels
            .as_array()
            .unwrap()
            .iter()
            .filter(|h| h["labels"]["role"] == "web")
            .count()
            == 6,
        "the supernode shows the daemons' labels: {labels}"
    );

    let before = reg.bytes_sent();
    let spec = ["--selector", "role=web", "--batch-sizes", "2,4"];
    // The hook before rollout batch 1: returns once batch 1 is warm.
    let mut args = vec![image.as_str()];
    args.extend(spec);
    args.extend(["--batch", "1"]);
    let out = prewarm(&sn, &args);
    assert!(out.status.success(), "{}", text(&out));
    let jobs = sn.get_json("/api/v1/prewarm").unwrap();
    let id = jobs[0]["id"].as_str().unwrap().to_string();
    let j = job(&sn, &id);
    assert!(
        j["batches"][0]["hosts"]
            .as_array()
            .unwrap()
            .iter()
            .all(|h| h["state"] == "warm"),
        "batch 1 warm when the hook returns: {j}"
    );
    // The same spec again is the same job (idempotent), and --wait covers every batch.
    let mut args = vec![image.as_str()];
    args.extend(spec);
    args.push("--wait");
    let out = prewarm(&sn, &args);
    assert!(out.status.success(), "{}", text(&out));
    let jobs = sn.get_json("/api/v1/prewarm").unwrap();
    assert_eq!(jobs.as_array().unwrap().len(), 1, "one job for one spec");
    let j = job(&sn, &id);
    assert_eq!(j["state"], "succeeded", "{j}");
    let batches = j["batches"].as_array().unwrap();
    assert_eq!(batches.len(), 2);
    assert_eq!(hosts_of(&batches[0]), vec!["node0", "node1"]);
    assert_eq!(
        hosts_of(&batches[1]),
        vec!["node2", "node3", "node4", "node5"]
    );
    for b in batches {
        for h in b["hosts"].as_array().unwrap() {
            assert_eq!(h["state"], "warm", "{h}");
            assert_eq!(
                h["layers"].as_array().unwrap().len(),
                4,
                "config + 3 layers"
            );
        }
    }
    let sent = reg.bytes_sent() - before;
    let ratio = sent as f64 / size as f64;
    eprintln!("registry sent {sent} bytes ({ratio:.3} x the image) to warm 6 hosts");
    assert!(ratio <= 1.1, "registry sent {ratio:.3} x the image");
    // The db nodes were not targets.
    for d in &daemons[6..] {
        assert_eq!(d.tasks().unwrap().as_array().unwrap().len(), 0);
    }

    // A containerd pull on a warmed node: the registry sees the tag and manifest
    // requests, no blob.
    let d = &daemons[3];
    let hosts = tests::hosts_dir(&root.path().join("hosts"), &reg, Some(d.proxy_addr));
    let ctd = Containerd::start(&root.path().join("containerd")).unwrap();
    let before = reg.bytes_sent();
    let out = ctd.pull(&hosts, &image);
    assert!(out.status.success(), "{}", text(&out));
    let sent = reg.bytes_sent() - before;
    eprintln!("registry sent {sent} bytes for the pull on a warmed node");
    assert!(
        sent < 64 * 1024,
        "the registry sent {sent} bytes: more than tags and manifests"
    );
    assert!(
        d.metric("dfdaemon_mirror_cache_total", "reason=\"hit\"") >= 4.0,
        "config and layers came from the local cache"
    );
}

#[test]
fn the_hook_fails_clearly_on_bad_targets_missing_images_and_timeouts() {
    let root = tempfile::tempdir().unwrap();
    let reg = Registry::start(&root.path().join("registry"), None).unwrap();
    tests::push_tar_image(&reg, "hook/app", 2 * MIB, 710).unwrap();
    let image = format!("{}/hook/app:v1", reg.addr);
    let sn = SupernodeProc::start(&root.path().join("sn")).unwrap();
    let mut d0 = DaemonProc::start(&sn, root.path(), "a0", &["--label", "zone=z1"]).unwrap();
    wait_hosts(&sn, 1);

    let out = prewarm(
        &sn,
        &[
            &format!("{}/hook/missing:v1", reg.addr),
            "--hosts",
            "a0",
            "--wait",
        ],
    );
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    assert!(text(&out).contains("not found"), "{}", text(&out));

    let out = prewarm(&sn, &[&image, "--hosts", "a0,nosuchhost", "--wait"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("nosuchhost"), "{}", text(&out));

    let out = prewarm(&sn, &[&image, "--selector", "zone=nowhere", "--wait"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("matches no host"), "{}", text(&out));

    // A node that is gone (still listed: the supernode has not timed it out yet): the
    // job's deadline fails it, by name, with the reason.
    d0.kill();
    let t = Instant::now();
    let out = prewarm(&sn, &[&image, "--hosts", "a0", "--timeout", "3s", "--wait"]);
    assert!(t.elapsed() < Duration::from_secs(30), "no hang");
    assert_eq!(out.status.code(), Some(8), "{}", text(&out));
    assert!(
        text(&out).contains("a0") && text(&out).contains("timed out"),
        "{}",
        text(&out)
    );
    let out = prewarm(
        &sn,
        &[&image, "--hosts", "a0", "--timeout", "1s", "--batch", "3"],
    );
    assert_eq!(
        out.status.code(),
        Some(2),
        "--batch beyond the job: {}",
        text(&out)
    );
}

#[test]
fn a_job_survives_a_supernode_restart() {
    let root = tempfile::tempdir().unwrap();
    let reg = Registry::start(&root.path().join("registry"), None).unwrap();
    tests::push_tar_image(&reg, "restart/app", 24 * MIB, 720).unwrap();
    let image = format!("{}/restart/app:v1", reg.addr);
    let mut sn = SupernodeProc::start(&root.path().join("sn")).unwrap();
    let _daemons: Vec<DaemonProc> = (0..3)
        .map(|i| DaemonProc::start(&sn, root.path(), &format!("r{i}"), &[]).unwrap())
        .collect();
    wait_hosts(&sn, 3);
    let out = prewarm(&sn, &[&image, "--hosts", "r0,r1,r2", "--batch-sizes", "1"]);
    assert!(out.status.success(), "{}", text(&out));
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    std::thread::sleep(Duration::from_millis(700));
    sn.restart().unwrap();
    let j = job(&sn, &id);
    assert_eq!(j["state"], "running", "restored from sled: {j}");
    let out = prewarm(
        &sn,
        &[
            &image,
            "--hosts",
            "r0,r1,r2",
            "--batch-sizes",
            "1",
            "--wait",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let j = job(&sn, &id);
    assert_eq!(j["state"], "succeeded", "{j}");
}

#[test]
fn an_index_resolves_to_the_requested_platform() {
    let root = tempfile::tempdir().unwrap();
    let reg = Registry::start(&root.path().join("registry"), None).unwrap();
    tests::push_tar_image(&reg, "multi/app", MIB, 730).unwrap();
    // An index over the amd64 image just pushed and an arm64 entry.
    let (st, h, _) = tests::http_request(
        reg.addr,
        "HEAD",
        "/v2/multi/app/manifests/v1",
        &[("Accept", "application/vnd.oci.image.manifest.v1+json")],
        b"",
    )
    .unwrap();
    assert_eq!(st, 200);
    let digest = h["docker-content-digest"].clone();
    let size = h["content-length"].clone();
    let index = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[
        {{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{digest}","size":{size},"platform":{{"architecture":"arm64","os":"linux","variant":"v8"}}}},
        {{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{digest}","size":{size},"platform":{{"architecture":"amd64","os":"linux"}}}}]}}"#
    );
    reg.push_manifest_typed(
        "multi/app",
        "multi",
        index.as_bytes(),
        "application/vnd.oci.image.index.v1+json",
        None,
    )
    .unwrap();
    let sn = SupernodeProc::start(&root.path().join("sn")).unwrap();
    let _d = DaemonProc::start(&sn, root.path(), "m0", &[]).unwrap();
    wait_hosts(&sn, 1);
    let image = format!("{}/multi/app:multi", reg.addr);
    let out = prewarm(&sn, &[&image, "--hosts", "m0", "--wait"]);
    assert!(out.status.success(), "{}", text(&out));
    let jobs = sn.get_json("/api/v1/prewarm").unwrap();
    assert_eq!(
        jobs[0]["manifest"].as_str().unwrap(),
        digest,
        "the amd64 entry"
    );
    assert_eq!(jobs[0]["layers"].as_array().unwrap().len(), 4);
    let out = prewarm(&sn, &[&image, "--hosts", "m0", "--platform", "linux/s390x"]);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    assert!(text(&out).contains("linux/s390x"), "{}", text(&out));
}
