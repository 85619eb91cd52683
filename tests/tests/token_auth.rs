//! A registry with token auth (the protocol of Docker Hub, GHCR, Harbor), a real token
//! service, a real containerd: containerd's own token flow works through the mirror, the
//! daemon's own credentials get a token from the registry's realm for clients that send
//! none, and a cached blob is never handed to a caller the registry would refuse.

use std::process::Output;

use tests::{
    Containerd, DaemonProc, Registry, SupernodeProc, TokenServer, http_request, random_bytes,
    sha256_hex,
};

const MIB: usize = 1 << 20;

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn token_auth_through_the_mirror() {
    let root = tempfile::tempdir().unwrap();
    // Push to an open registry; pull from a token-auth one serving the same storage.
    let open = Registry::start(&root.path().join("registry"), None).unwrap();
    let name = "private/app";
    let size = tests::push_tar_image(&open, name, 4 * MIB, 600).unwrap();
    let data = random_bytes(3 * MIB, 601);
    let digest = open.push_blob(name, &data, None).unwrap();
    let tokens = TokenServer::start(&root.path().join("tokens"), &[("alice", "s3cret")]).unwrap();
    let reg = Registry::start_token_auth(
        &root.path().join("registry-token"),
        &root.path().join("registry"),
        &tokens,
    )
    .unwrap();

    let sn = SupernodeProc::start(&root.path().join("sn")).unwrap();
    let d = DaemonProc::start(&sn, root.path(), "t0", &[]).unwrap();
    let hosts = tests::hosts_dir(&root.path().join("hosts"), &reg, Some(d.proxy_addr));
    let ctd = Containerd::start(&root.path().join("containerd")).unwrap();
    let reference = format!("{}/{name}:v1", reg.addr);
    let hosts_s = hosts.to_str().unwrap();
    let pull = |user: Option<&str>| {
        let mut args = vec![
            "images",
            "pull",
            "--snapshotter",
            "native",
            "--hosts-dir",
            hosts_s,
        ];
        if let Some(u) = user {
            args.extend(["--user", u]);
        }
        args.push(&reference);
        ctd.ctr(&args)
    };

    let out = pull(None);
    assert!(!out.status.success(), "anonymous pull of a private image");
    let msg = stderr(&out).to_ascii_lowercase();
    assert!(
        msg.contains("401") || msg.contains("unauthorized") || msg.contains("authoriz"),
        "the refusal names authorization: {msg}"
    );
    let out = pull(Some("alice:s3cret"));
    assert!(
        out.status.success(),
        "pull with credentials: {}",
        stderr(&out)
    );
    assert!(
        tokens.issued() >= 1,
        "containerd got a token from the realm"
    );
    let served = d.metric("dfdaemon_mirror_bytes_served_total", "");
    assert!(
        served as usize >= size,
        "blobs came through the mirror ({served} of {size} bytes), not the fallback"
    );

    // The daemon's own credentials: a client that sends none is served, with a token the
    // daemon got from the realm itself.
    let config = root.path().join("dfdaemon.toml");
    std::fs::write(
        &config,
        format!(
            "[[registry_credentials]]\nregistry = \"{}\"\nusername = \"alice\"\npassword = \"s3cret\"\n",
            reg.addr
        ),
    )
    .unwrap();
    let with_creds = DaemonProc::start(
        &sn,
        root.path(),
        "t1",
        &["--config", config.to_str().unwrap()],
    )
    .unwrap();
    let path = format!("/v2/{name}/blobs/{digest}?ns={}", reg.addr);
    let issued = tokens.issued();
    let (st, _, body) = http_request(with_creds.proxy_addr, "GET", &path, &[], b"").unwrap();
    assert_eq!(st, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(sha256_hex(&body), sha256_hex(&data));
    assert!(tokens.issued() > issued, "the daemon asked the realm");

    // The blob is now cached on t1 and in the swarm; t0, asked without credentials,
    // answers the registry's Bearer challenge, not the bytes.
    let (st, h, _) = http_request(d.proxy_addr, "GET", &path, &[], b"").unwrap();
    assert_eq!(st, 401, "cached blob without credentials");
    assert!(
        h.get("www-authenticate")
            .is_some_and(|v| v.starts_with("Bearer")),
        "Bearer challenge passed through: {h:?}"
    );
    // A token for another repository does not open this one.
    let (st, _, tok) = http_request(
        tokens.addr,
        "GET",
        &format!(
            "/token?service={}&scope=repository:other/app:pull",
            tests::TOKEN_SERVICE
        ),
        &[("Authorization", &basic("alice", "s3cret"))],
        b"",
    )
    .unwrap();
    assert_eq!(st, 200);
    let tok: serde_json::Value = serde_json::from_slice(&tok).unwrap();
    let bearer = format!("Bearer {}", tok["token"].as_str().unwrap());
    let (st, _, _) = http_request(
        d.proxy_addr,
        "GET",
        &path,
        &[("Authorization", &bearer)],
        b"",
    )
    .unwrap();
    assert_eq!(st, 401, "token scoped to another repository");
}

fn basic(user: &str, pass: &str) -> String {
    use base64::Engine as _;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
    )
}
