//! A real containerd pulls a real image from a real registry through the daemons'
//! mirrors: every layer leaves the registry about once for the whole cluster.

use tests::{Containerd, DaemonProc, Registry, SupernodeProc};

const MIB: usize = 1 << 20;

#[test]
fn containerd_pulls_through_the_mirror_and_the_registry_sends_each_layer_once() {
    let root = tempfile::tempdir().unwrap();
    let reg = Registry::start(&root.path().join("registry"), None).unwrap();

    // A 3-layer image of random data (valid gzip'd tars, so containerd can unpack it).
    let name = "rollout/app";
    // About 200 MiB in three layers, as the must-show asks.
    let size = tests::push_tar_image(&reg, name, 66 * MIB, 200).unwrap();

    let sn = SupernodeProc::start(&root.path().join("sn")).unwrap();
    let nodes = 4;
    let mut setups = Vec::new();
    for i in 0..nodes {
        let d = DaemonProc::start(&sn, root.path(), &format!("node{i}"), &[]).unwrap();
        let ctd = Containerd::start(&root.path().join(format!("containerd{i}"))).unwrap();
        // The hosts.toml comes from the daemon's own generator.
        let hosts = root.path().join(format!("hosts{i}"));
        let out = std::process::Command::new(&tests::bins().dfdaemon)
            .arg("containerd-config")
            .arg("--registry")
            .arg(reg.addr.to_string())
            .arg("--out")
            .arg(&hosts)
            .arg("--mirror")
            .arg(format!("http://{}", d.proxy_addr))
            .output()
            .unwrap();
        tests::assert_success(&out);
        setups.push((d, ctd, hosts));
    }

    let reference = format!("{}/{name}:v1", reg.addr);
    let before = reg.bytes_sent();
    std::thread::scope(|s| {
        for (d, ctd, hosts) in &setups {
            let reference = &reference;
            s.spawn(move || {
                let out = ctd.pull(hosts, reference);
                assert!(
                    out.status.success(),
                    "ctr pull via {} failed:\n{}\n{}",
                    d.host_id,
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            });
        }
    });
    let sent = reg.bytes_sent() - before;
    let ratio = sent as f64 / size as f64;
    eprintln!(
        "registry sent {sent} bytes for {nodes} containerd pulls of a {size}-byte image = {ratio:.3} x"
    );
    // When this fails, say whether containerd went around the mirrors (its fallback when
    // a mirror answers an error, e.g. after `mirror_no_progress_secs`) or the daemons
    // fetched the same bytes from the registry more than once.
    let per_daemon: Vec<String> = setups
        .iter()
        .map(|(d, _, _)| {
            let mib = |name: &str, labels: &str| d.metric(name, labels) / MIB as f64;
            format!(
                "{}: {} blob requests, {:.0} MiB served, {:.0} MiB from the registry, {:.0} MiB from peers",
                d.host_id,
                d.metric("dfdaemon_mirror_requests_total", "reason=\"blob\""),
                mib("dfdaemon_mirror_bytes_served_total", ""),
                mib("dfdaemon_piece_bytes_total", "source=\"origin\""),
                mib("dfdaemon_piece_bytes_total", "source=\"peer\""),
            )
        })
        .collect();
    eprintln!("{}", per_daemon.join("; "));
    assert!(
        ratio <= 1.1,
        "registry sent {ratio:.3} x the image for {nodes} pulls; {}",
        per_daemon.join("; ")
    );
    for (d, ctd, _) in &setups {
        // containerd checked every digest as it wrote the content; ask it what it holds.
        let out = ctd.ctr(&["images", "check", "--snapshotter", "native"]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("complete (4/4)") && text.contains("true"),
            "{}: image not complete and unpacked in containerd:\n{text}",
            d.host_id
        );
        let blobs = d.metric("dfdaemon_mirror_requests_total", "reason=\"blob\"");
        assert!(
            blobs >= 4.0,
            "{} served config and layers through its mirror ({blobs})",
            d.host_id
        );
    }
}
