//! The daemon as an HTTP proxy (for clients that can't use mirrors), driven by a real
//! client (curl) against a real registry: plain HTTP proxying with pulls through the P2P
//! network and everything else passed through; CONNECT tunnels; HTTPS interception for
//! listed hosts with the daemon's generated CA.

use std::process::{Command, Output};

use tests::{DaemonProc, Registry, SupernodeProc, file_sha256, random_bytes, sha256_hex};

const MIB: usize = 1 << 20;

fn curl(args: &[&str]) -> Output {
    Command::new("curl")
        .args(["-sS", "--max-time", "60", "--noproxy", ""])
        .args(args)
        .output()
        .expect("running curl")
}

/// `curl ... -o /dev/null -w %{http_code}`: the status, whatever it is.
fn status(args: &[&str]) -> u16 {
    let mut all = vec!["-o", "/dev/null", "-w", "%{http_code}"];
    all.extend_from_slice(args);
    let out = curl(&all);
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}

fn assert_ok(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what}: curl exit {:?}: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn http_proxy_pulls_blobs_through_the_swarm_and_passes_the_rest_through() {
    let root = tempfile::tempdir().unwrap();
    let reg = Registry::start(&root.path().join("registry"), None).unwrap();
    let data = random_bytes(24 * MIB, 71);
    let digest = reg.push_blob("proxy/app", &data, None).unwrap();
    let sn = SupernodeProc::start(&root.path().join("sn")).unwrap();
    let daemons: Vec<DaemonProc> = (0..2)
        .map(|i| DaemonProc::start(&sn, root.path(), &format!("p{i}"), &[]).unwrap())
        .collect();

    let url = format!("http://{}/v2/proxy/app/blobs/{digest}", reg.addr);
    let before = reg.bytes_sent();
    for (i, d) in daemons.iter().enumerate() {
        let out_file = root.path().join(format!("blob{i}"));
        let proxy = format!("http://{}", d.proxy_addr);
        let out = curl(&["-f", "-x", &proxy, &url, "-o", out_file.to_str().unwrap()]);
        assert_ok(&out, "blob through the proxy");
        assert_eq!(file_sha256(&out_file).unwrap(), sha256_hex(&data));
    }
    let sent = reg.bytes_sent() - before;
    let ratio = sent as f64 / data.len() as f64;
    eprintln!("registry sent {ratio:.3} x the blob for 2 proxied pulls");
    assert!(ratio <= 1.1, "registry sent {ratio:.3} x the blob");

    let proxy = format!("http://{}", daemons[0].proxy_addr);
    // Not pulls: passed through to the registry as they are.
    let v2 = format!("http://{}/v2/", reg.addr);
    assert_eq!(status(&["-x", &proxy, &v2]), 200, "/v2/ passed through");
    let upload = format!("http://{}/v2/proxy/app/blobs/uploads/", reg.addr);
    let out = curl(&[
        "-x",
        &proxy,
        "-X",
        "POST",
        "-D",
        "-",
        "-o",
        "/dev/null",
        &upload,
    ]);
    assert_ok(&out, "upload start through the proxy");
    let head = String::from_utf8_lossy(&out.stdout).to_ascii_lowercase();
    assert!(
        head.starts_with("http/1.1 202") && head.contains("location:"),
        "a push request reaches the registry untouched:\n{head}"
    );
    // A blob the registry doesn't have is its 404, not a hang or a 5xx.
    let missing = format!(
        "http://{}/v2/proxy/app/blobs/sha256:{}",
        reg.addr,
        "0".repeat(64)
    );
    assert_eq!(status(&["-x", &proxy, &missing]), 404);
    // A CONNECT whose target is down fails at request open (containerd and Docker act on
    // that), not after a 200.
    let out = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "10",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ])
        .args(["--proxy", &proxy, "--proxytunnel", "--noproxy", ""])
        .arg(format!("http://{}:1/v2/", "127.0.0.1"))
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "CONNECT to a closed port must fail at once: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("502"),
        "a dead tunnel target is a 502: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let m =
        |k: &str| daemons[0].metric("dfdaemon_proxy_requests_total", &format!("reason=\"{k}\""));
    assert!(m("pull") >= 1.0, "pull counted");
    assert!(m("forward") >= 2.0, "forwards counted");
    let misses: f64 = daemons
        .iter()
        .map(|d| d.metric("dfdaemon_mirror_cache_total", "reason=\"miss\""))
        .sum();
    assert!(misses >= 2.0, "both first reads were misses ({misses})");
    let served = daemons[1].metric("dfdaemon_mirror_bytes_served_total", "");
    assert_eq!(served as usize, data.len(), "bytes served counted");
}

#[test]
fn https_proxy_tunnels_by_default_and_intercepts_listed_hosts() {
    let root = tempfile::tempdir().unwrap();
    let plain = Registry::start(&root.path().join("registry"), None).unwrap();
    let data = random_bytes(16 * MIB, 72);
    let digest = plain.push_blob("secure/app", &data, None).unwrap();
    let (ca, cert, key) = tests::test_server_cert(&root.path().join("pki")).unwrap();
    let reg = Registry::start_tls(
        &root.path().join("registry-tls"),
        &root.path().join("registry"),
        &cert,
        &key,
    )
    .unwrap();
    let host = reg.addr.to_string();
    let sn = SupernodeProc::start(&root.path().join("sn")).unwrap();
    let ca_s = ca.to_str().unwrap();

    // No interception configured: CONNECT is a tunnel, the client sees the registry's
    // own certificate.
    let tunnel = DaemonProc::start(&sn, root.path(), "tunnel", &[]).unwrap();
    let proxy = format!("http://{}", tunnel.proxy_addr);
    let v2 = format!("https://{host}/v2/");
    assert_eq!(status(&["-x", &proxy, "--cacert", ca_s, &v2]), 200);
    assert!(tunnel.metric("dfdaemon_proxy_requests_total", "reason=\"tunnel\"") >= 1.0);

    // Interception for this host: TLS ends at the daemon, blobs go through the swarm.
    let args = ["--proxy-intercept", &host, "--registry-ca-cert", ca_s];
    let daemons: Vec<DaemonProc> = (0..2)
        .map(|i| DaemonProc::start(&sn, root.path(), &format!("mitm{i}"), &args).unwrap())
        .collect();
    let url = format!("https://{host}/v2/secure/app/blobs/{digest}");
    let before = reg.bytes_sent();
    for (i, d) in daemons.iter().enumerate() {
        let proxy = format!("http://{}", d.proxy_addr);
        let proxy_ca = d.data_dir.join("proxy-ca.pem");
        let out_file = root.path().join(format!("secure{i}"));
        let out = curl(&[
            "-f",
            "-x",
            &proxy,
            "--cacert",
            proxy_ca.to_str().unwrap(),
            &url,
            "-o",
            out_file.to_str().unwrap(),
        ]);
        assert_ok(&out, "intercepted blob pull");
        assert_eq!(file_sha256(&out_file).unwrap(), sha256_hex(&data));
        // The registry's CA alone does not verify what the client got: the daemon
        // answered with its own certificate.
        let out = curl(&["-x", &proxy, "--cacert", ca_s, &v2, "-o", "/dev/null"]);
        assert_eq!(
            out.status.code(),
            Some(60),
            "expected a certificate error: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(d.metric("dfdaemon_proxy_requests_total", "reason=\"intercept\"") >= 1.0);
        assert!(d.metric("dfdaemon_proxy_requests_total", "reason=\"pull\"") >= 1.0);
    }
    let sent = reg.bytes_sent() - before;
    let ratio = sent as f64 / data.len() as f64;
    eprintln!("TLS registry sent {ratio:.3} x the blob for 2 intercepted pulls");
    assert!(ratio <= 1.1, "registry sent {ratio:.3} x the blob");

    // Inside an intercepted session, non-pull requests pass through to the registry.
    let d = &daemons[0];
    let proxy = format!("http://{}", d.proxy_addr);
    let proxy_ca = d.data_dir.join("proxy-ca.pem");
    assert_eq!(
        status(&["-x", &proxy, "--cacert", proxy_ca.to_str().unwrap(), &v2]),
        200
    );
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(d.data_dir.join("proxy-ca-key.pem"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o077, 0, "proxy CA key readable by others");
}
