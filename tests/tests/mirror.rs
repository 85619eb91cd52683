//! The registry mirror against a real registry (Debian's docker-registry): blobs through
//! the P2P engine, verified, ranged; manifests and tags passed through; clear errors.

use std::time::Duration;

use tests::{DaemonProc, Registry, SupernodeProc, http_request, random_bytes, sha256_hex};

const MIB: usize = 1 << 20;

struct Image {
    name: String,
    tag: String,
    manifest_digest: String,
    blobs: Vec<(String, bytes::Bytes)>,
    size: usize,
}

fn push_image(reg: &Registry, name: &str, layers: usize, layer_mib: usize) -> Image {
    let mut blobs = Vec::new();
    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","rootfs":{{"type":"layers","diff_ids":[]}},"seed":"{name}"}}"#
    );
    let config = bytes::Bytes::from(config);
    let config_digest = reg.push_blob(name, &config, None).unwrap();
    blobs.push((config_digest.clone(), config.clone()));
    let mut layer_json = Vec::new();
    for i in 0..layers {
        let data = random_bytes(layer_mib * MIB + i * 1000, 100 + i as u64);
        let d = reg.push_blob(name, &data, None).unwrap();
        layer_json.push(format!(r#"{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{d}","size":{}}}"#, data.len()));
        blobs.push((d, data));
    }
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config_digest}","size":{}}},"layers":[{}]}}"#,
        config.len(),
        layer_json.join(",")
    );
    let manifest_digest = reg
        .push_manifest(name, "v1", manifest.as_bytes(), None)
        .unwrap();
    let size = blobs.iter().map(|(_, b)| b.len()).sum();
    Image {
        name: name.into(),
        tag: "v1".into(),
        manifest_digest,
        blobs,
        size,
    }
}

/// What containerd does against a mirror: HEAD the tag, GET the manifest by digest, GET
/// every blob. Checks each answer.
fn pull(d: &DaemonProc, reg: &Registry, img: &Image) {
    let ns = format!("ns={}", reg.addr);
    let (st, h, _) = http_request(
        d.proxy_addr,
        "HEAD",
        &format!("/v2/{}/manifests/{}?{ns}", img.name, img.tag),
        &[("Accept", "application/vnd.oci.image.manifest.v1+json")],
        b"",
    )
    .unwrap();
    assert_eq!(st, 200);
    assert_eq!(h.get("docker-content-digest"), Some(&img.manifest_digest));
    assert!(h.contains_key("content-length"));
    let (st, _, body) = http_request(
        d.proxy_addr,
        "GET",
        &format!("/v2/{}/manifests/{}?{ns}", img.name, img.manifest_digest),
        &[("Accept", "application/vnd.oci.image.manifest.v1+json")],
        b"",
    )
    .unwrap();
    assert_eq!(st, 200);
    assert_eq!(format!("sha256:{}", sha256_hex(&body)), img.manifest_digest);
    for (digest, data) in &img.blobs {
        let (st, h, body) = http_request(
            d.proxy_addr,
            "GET",
            &format!("/v2/{}/blobs/{digest}?{ns}", img.name),
            &[],
            b"",
        )
        .unwrap();
        assert_eq!(
            st,
            200,
            "{digest}: {}",
            String::from_utf8_lossy(&body[..body.len().min(200)])
        );
        assert_eq!(h.get("docker-content-digest"), Some(digest));
        assert_eq!(body.len(), data.len());
        assert_eq!(format!("sha256:{}", sha256_hex(&body)), *digest);
    }
}

#[test]
fn blobs_leave_the_registry_about_once_for_three_mirrors() {
    let root = tempfile::tempdir().unwrap();
    let reg = Registry::start(&root.path().join("registry"), None).unwrap();
    let img = push_image(&reg, "team/app", 3, 8);
    let sn = SupernodeProc::start(&root.path().join("sn")).unwrap();
    let daemons: Vec<DaemonProc> = (0..3)
        .map(|i| DaemonProc::start(&sn, root.path(), &format!("m{i}"), &[]).unwrap())
        .collect();
    let before = reg.bytes_sent();
    std::thread::scope(|s| {
        for d in &daemons {
            let (reg, img) = (&reg, &img);
            s.spawn(move || pull(d, reg, img));
        }
    });
    let sent = reg.bytes_sent() - before;
    let ratio = sent as f64 / img.size as f64;
    eprintln!(
        "registry sent {sent} bytes for 3 pulls of {} = {ratio:.3} x the image",
        img.size
    );
    assert!(
        ratio <= 1.1,
        "registry sent {ratio:.3} x the image for three pulls"
    );

    // Ranged reads, as a resuming containerd sends them.
    let (digest, data) = &img.blobs[1];
    let ns = format!("ns={}", reg.addr);
    let (st, h, body) = http_request(
        daemons[0].proxy_addr,
        "GET",
        &format!("/v2/{}/blobs/{digest}?{ns}", img.name),
        &[("Range", "bytes=5000000-")],
        b"",
    )
    .unwrap();
    assert_eq!(st, 206);
    assert_eq!(
        h.get("content-range").unwrap(),
        &format!("bytes 5000000-{}/{}", data.len() - 1, data.len())
    );
    assert_eq!(&body[..], &data[5_000_000..]);
    // This layer's last 1 MiB and 1000 bytes are in 256 KiB tail pieces: a range across
    // the boundary into them, and one inside them.
    for (from, to) in [(7_000_000, 7_500_000), (7_900_000, data.len() - 10)] {
        let (st, h, body) = http_request(
            daemons[1].proxy_addr,
            "GET",
            &format!("/v2/{}/blobs/{digest}?{ns}", img.name),
            &[("Range", &format!("bytes={from}-{to}"))],
            b"",
        )
        .unwrap();
        assert_eq!(st, 206);
        assert_eq!(
            h.get("content-range").unwrap(),
            &format!("bytes {from}-{to}/{}", data.len())
        );
        assert_eq!(&body[..], &data[from..=to], "range {from}-{to}");
    }
    let (st, _, _) = http_request(
        daemons[0].proxy_addr,
        "GET",
        &format!("/v2/{}/blobs/{digest}?{ns}", img.name),
        &[("Range", &format!("bytes={}-", data.len()))],
        b"",
    )
    .unwrap();
    assert_eq!(st, 416);
}

#[test]
fn mirror_errors_are_clear_and_quick() {
    let root = tempfile::tempdir().unwrap();
    let reg = Registry::start(&root.path().join("registry"), None).unwrap();
    let img = push_image(&reg, "small", 1, 1);
    let sn = SupernodeProc::start(&root.path().join("sn")).unwrap();
    let d = DaemonProc::start(&sn, root.path(), "m0", &[]).unwrap();
    let ns = format!("ns={}", reg.addr);
    let missing = format!("sha256:{}", "0".repeat(64));
    let get = |path: &str| http_request(d.proxy_addr, "GET", path, &[], b"").unwrap().0;
    assert_eq!(get("/v2/"), 200);
    assert_eq!(
        get(&format!("/v2/{}/blobs/{missing}?{ns}", img.name)),
        404,
        "unknown blob"
    );
    assert_eq!(
        get(&format!("/v2/{}/manifests/nope?{ns}", img.name)),
        404,
        "unknown tag"
    );
    assert_eq!(
        get(&format!("/v2/../etc/passwd?{ns}")),
        400,
        "malformed path"
    );
    assert_eq!(
        get(&format!("/v2/{}/blobs/latest?{ns}", img.name)),
        400,
        "blob by tag"
    );
    assert_eq!(
        get(&format!("/v2/{}/manifests/v1", img.name)),
        400,
        "no ns, no default registry"
    );
    assert_eq!(
        http_request(
            d.proxy_addr,
            "POST",
            &format!("/v2/{}/blobs/uploads/?{ns}", img.name),
            &[],
            b""
        )
        .unwrap()
        .0,
        405
    );
    let t = std::time::Instant::now();
    assert_eq!(
        get(&format!("/v2/{}/manifests/v1?ns=127.0.0.1:1", img.name)),
        502,
        "dead upstream"
    );
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "dead upstream answered fast"
    );

    // Bound beyond loopback, the mirror only reaches allowlisted registries.
    let allowed = reg.addr.to_string();
    let listen = format!("0.0.0.0:{}", tests::free_tcp_port());
    let guarded = DaemonProc::start(
        &sn,
        root.path(),
        "m1",
        &["--proxy-listen", &listen, "--allow-registry", &allowed],
    )
    .unwrap();
    let head = |ns: &str| {
        http_request(
            guarded.proxy_addr,
            "HEAD",
            &format!("/v2/{}/manifests/v1?ns={ns}", img.name),
            &[("Accept", "application/vnd.oci.image.manifest.v1+json")],
            b"",
        )
        .unwrap()
        .0
    };
    assert_eq!(head("registry.example.com"), 403, "not on the allowlist");
    assert_eq!(head(&allowed), 200, "on the allowlist");
}

fn basic(user: &str, pass: &str) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let input = format!("{user}:{pass}").into_bytes();
    let mut out = String::new();
    for c in input.chunks(3) {
        let b = [c[0], *c.get(1).unwrap_or(&0), *c.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    format!("Basic {out}")
}

#[test]
fn private_repository_needs_credentials_even_from_the_cache() {
    let root = tempfile::tempdir().unwrap();
    let htpasswd = root.path().join("htpasswd");
    let hash = bcrypt::hash("s3cret", 4).unwrap();
    std::fs::write(&htpasswd, format!("alice:{hash}\n")).unwrap();
    let reg = Registry::start(&root.path().join("registry"), Some(&htpasswd)).unwrap();
    let good = basic("alice", "s3cret");
    let bad = basic("alice", "wrong");
    let data = random_bytes(3 * MIB, 7);
    let digest = reg.push_blob("private/app", &data, Some(&good)).unwrap();
    let sn = SupernodeProc::start(&root.path().join("sn")).unwrap();
    let d = DaemonProc::start(&sn, root.path(), "m0", &[]).unwrap();
    let path = format!("/v2/private/app/blobs/{digest}?ns={}", reg.addr);
    let get = |auth: Option<&str>| {
        let h: Vec<(&str, &str)> = auth.map(|a| vec![("Authorization", a)]).unwrap_or_default();
        http_request(d.proxy_addr, "GET", &path, &h, b"").unwrap()
    };

    let (st, h, _) = get(None);
    assert_eq!(st, 401, "no credentials");
    assert!(
        h.get("www-authenticate")
            .is_some_and(|v| v.starts_with("Basic")),
        "challenge passed through: {h:?}"
    );
    let (st, _, body) = get(Some(&good));
    assert_eq!(st, 200);
    assert_eq!(format!("sha256:{}", sha256_hex(&body)), digest);
    // Now the blob is cached on this daemon: still no bytes without valid credentials.
    assert_eq!(get(None).0, 401, "cache hit does not bypass auth");
    assert_eq!(get(Some(&bad)).0, 401, "wrong password");
    assert_eq!(get(Some(&good)).0, 200);
}

#[test]
fn daemon_credentials_serve_clients_that_send_none() {
    let root = tempfile::tempdir().unwrap();
    let htpasswd = root.path().join("htpasswd");
    let hash = bcrypt::hash("s3cret", 4).unwrap();
    std::fs::write(&htpasswd, format!("alice:{hash}\n")).unwrap();
    let reg = Registry::start(&root.path().join("registry"), Some(&htpasswd)).unwrap();
    let data = random_bytes(2 * MIB, 8);
    let digest = reg
        .push_blob("private/app", &data, Some(&basic("alice", "s3cret")))
        .unwrap();
    let sn = SupernodeProc::start(&root.path().join("sn")).unwrap();
    // Credentials live in the daemon's config file (CRI sends none to a mirror).
    let config = root.path().join("dfdaemon.toml");
    std::fs::write(
        &config,
        format!("[[registry_credentials]]\nregistry = \"{}\"\nusername = \"alice\"\npassword = \"s3cret\"\n", reg.addr),
    )
    .unwrap();
    let d = DaemonProc::start(
        &sn,
        root.path(),
        "m0",
        &["--config", config.to_str().unwrap()],
    )
    .unwrap();
    let (st, _, body) = http_request(
        d.proxy_addr,
        "GET",
        &format!("/v2/private/app/blobs/{digest}?ns={}", reg.addr),
        &[],
        b"",
    )
    .unwrap();
    assert_eq!(st, 200);
    assert_eq!(format!("sha256:{}", sha256_hex(&body)), digest);
    // A daemon without them still gets the registry's 401.
    let d2 = DaemonProc::start(&sn, root.path(), "m1", &[]).unwrap();
    let (st, _, _) = http_request(
        d2.proxy_addr,
        "GET",
        &format!("/v2/private/app/blobs/{digest}?ns={}", reg.addr),
        &[],
        b"",
    )
    .unwrap();
    assert_eq!(st, 401);
}

#[test]
fn moved_tag_resolves_to_the_new_digest() {
    let root = tempfile::tempdir().unwrap();
    let mut reg = Registry::start(&root.path().join("registry"), None).unwrap();
    let first = push_image(&reg, "moving", 1, 1);
    let sn = SupernodeProc::start(&root.path().join("sn")).unwrap();
    let d = DaemonProc::start(&sn, root.path(), "m0", &[]).unwrap();
    let accept = [("Accept", "application/vnd.oci.image.manifest.v1+json")];
    let head = || {
        let (st, h, _) = http_request(
            d.proxy_addr,
            "HEAD",
            &format!("/v2/moving/manifests/v1?ns={}", reg.addr),
            &accept,
            b"",
        )
        .unwrap();
        assert_eq!(st, 200);
        h.get("docker-content-digest").cloned().unwrap()
    };
    assert_eq!(head(), first.manifest_digest);
    pull(&d, &reg, &first);
    // Push different content under the same tag.
    let second = push_image(&reg, "moving", 2, 1);
    assert_ne!(first.manifest_digest, second.manifest_digest);
    assert_eq!(
        head(),
        second.manifest_digest,
        "the tag is resolved upstream, not cached"
    );
    pull(&d, &reg, &second);

    // Manifests by digest and blobs are now cached on the daemon: with the registry gone
    // (and its answers to the credential checks still fresh), they are served from there.
    reg.kill();
    let ns = format!("ns={}", reg.addr);
    let (st, _, body) = http_request(
        d.proxy_addr,
        "GET",
        &format!("/v2/moving/manifests/{}?{ns}", second.manifest_digest),
        &accept,
        b"",
    )
    .unwrap();
    assert_eq!(st, 200, "manifest by digest from the cache");
    assert_eq!(
        format!("sha256:{}", sha256_hex(&body)),
        second.manifest_digest
    );
    let (digest, data) = &second.blobs[1];
    let (st, _, body) = http_request(
        d.proxy_addr,
        "GET",
        &format!("/v2/moving/blobs/{digest}?{ns}"),
        &[],
        b"",
    )
    .unwrap();
    assert_eq!(st, 200, "blob from the cache");
    assert_eq!(&body[..], &data[..]);
}

#[test]
fn stalled_upstream_becomes_a_quick_error_not_a_hang() {
    let root = tempfile::tempdir().unwrap();
    // An "upstream" that accepts connections and never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in silent.incoming().flatten() {
            held.push(c);
        }
    });
    let sn = SupernodeProc::start(&root.path().join("sn")).unwrap();
    let config = root.path().join("dfdaemon.toml");
    std::fs::write(&config, "mirror_no_progress_secs = 2\n").unwrap();
    let d = DaemonProc::start(
        &sn,
        root.path(),
        "m0",
        &["--config", config.to_str().unwrap()],
    )
    .unwrap();
    let blob = format!("sha256:{}", "1".repeat(64));
    for path in [
        format!("/v2/a/blobs/{blob}?ns={addr}"),
        format!("/v2/a/manifests/v1?ns={addr}"),
    ] {
        let t = std::time::Instant::now();
        let (st, _, _) = http_request(d.proxy_addr, "GET", &path, &[], b"").unwrap();
        let took = t.elapsed();
        assert_eq!(st, 504, "{path}");
        assert!(
            took < Duration::from_secs(6),
            "{path} answered after {took:?}"
        );
    }
}

#[test]
fn a_cached_blob_is_not_served_through_a_repository_that_does_not_link_it() {
    let root = tempfile::tempdir().unwrap();
    let reg = Registry::start(&root.path().join("registry"), None).unwrap();
    let secret = random_bytes(MIB, 11);
    let secret_digest = reg.push_blob("team/secret", &secret, None).unwrap();
    let public = random_bytes(MIB, 12);
    let public_digest = reg.push_blob("team/public", &public, None).unwrap();
    let sn = SupernodeProc::start(&root.path().join("sn")).unwrap();
    let d = DaemonProc::start(&sn, root.path(), "m0", &[]).unwrap();
    let get = |repo: &str, digest: &str| {
        http_request(
            d.proxy_addr,
            "GET",
            &format!("/v2/{repo}/blobs/{digest}?ns={}", reg.addr),
            &[],
            b"",
        )
        .unwrap()
        .0
    };
    assert_eq!(
        get("team/secret", &secret_digest),
        200,
        "cached on the daemon now"
    );
    assert_eq!(
        get("team/public", &public_digest),
        200,
        "access to team/public is known good"
    );
    assert_eq!(
        get("team/public", &secret_digest),
        404,
        "the registry does not link it there"
    );
}

/// A registry that keeps blobs in object storage answers blob GETs with a 307 to a signed
/// URL whose signature changes every time. The daemon follows it, the task is still the
/// digest (not the URL), so a second daemon, and a second registry name for the same
/// storage, get the blob from the swarm and the cache: storage sends it once.
#[test]
fn redirects_to_signed_storage_urls_are_followed_and_do_not_split_the_task() {
    use std::collections::HashMap;
    let root = tempfile::tempdir().unwrap();
    let data = random_bytes(20 * MIB + 123, 404);
    let digest = format!("sha256:{}", sha256_hex(&data));
    let storage_path = format!("storage/blobs/{}", sha256_hex(&data));
    let origin = tests::Origin::start_redirecting(
        HashMap::from([(storage_path.clone(), data.clone())]),
        HashMap::from([(format!("v2/redir/app/blobs/{digest}"), storage_path)]),
    )
    .unwrap();
    let sn = SupernodeProc::start(&root.path().join("sn")).unwrap();
    let daemons: Vec<DaemonProc> = (0..2)
        .map(|i| DaemonProc::start(&sn, root.path(), &format!("r{i}"), &[]).unwrap())
        .collect();
    let port = origin.addr.port();
    let get = |d: &DaemonProc, ns: &str| {
        let (st, _, body) = http_request(
            d.proxy_addr,
            "GET",
            &format!("/v2/redir/app/blobs/{digest}?ns={ns}"),
            &[],
            b"",
        )
        .unwrap();
        assert_eq!(st, 200, "{}", String::from_utf8_lossy(&body));
        assert_eq!(sha256_hex(&body), sha256_hex(&data));
    };
    get(&daemons[0], &format!("127.0.0.1:{port}"));
    get(&daemons[1], &format!("127.0.0.1:{port}"));
    // Another name for the same registry: a different upstream URL, the same blob.
    get(&daemons[1], &format!("localhost:{port}"));
    let ratio = origin.bytes_sent() as f64 / data.len() as f64;
    eprintln!(
        "storage sent {ratio:.4} x the blob over {} requests for 3 pulls",
        origin.requests()
    );
    assert!(ratio <= 1.1, "storage sent {ratio:.3} x the blob");
    let tasks = sn.get_json("/api/v1/tasks").unwrap();
    let n = tasks.as_array().map_or(0, Vec::len);
    assert_eq!(
        n, 1,
        "one task for the blob, whatever URL served it: {tasks}"
    );
}
