//! Bad input gets a clear error, never a panic or a hang: dfget failures, malformed and
//! oversized frames on the QUIC ports, unknown ids on the HTTP APIs, unauthenticated peers.

use std::collections::HashMap;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use proto::Frame;
use proto::control::{ControlErrorCode, ControlRequest, ControlResponse};
use proto::piece::{PieceRequest, PieceResponse};
use proto::{PieceIndex, TaskId};
use supernode::tls::ClusterCa;
use tests::{DaemonProc, Origin, SupernodeProc, random_bytes, sha256_hex, unix_get};

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

#[test]
fn dfget_reports_origin_404_digest_mismatch_and_dead_daemon() {
    let root = tempfile::tempdir().unwrap();
    let data = random_bytes(300_000, 9);
    let origin = Origin::start(HashMap::from([("f".to_string(), data.clone())]), true).unwrap();
    let sn = SupernodeProc::start(&root.path().join("sn")).unwrap();
    let d = DaemonProc::start(&sn, root.path(), "d0", &[]).unwrap();

    let out = d.dfget(&origin.url("missing"), &root.path().join("x"), &[]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("404"),
        "names the origin status: {}",
        stderr(&out)
    );
    assert_eq!(
        stderr(&out).trim().lines().count(),
        1,
        "one line: {}",
        stderr(&out)
    );
    assert!(!root.path().join("x").exists());

    let wrong = sha256_hex(b"something else");
    let out = d.dfget(
        &origin.url("f"),
        &root.path().join("y"),
        &["--digest", &format!("sha256:{wrong}")],
    );
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert!(stderr(&out).contains("digest"), "{}", stderr(&out));
    assert!(
        !root.path().join("y").exists(),
        "no file on digest mismatch"
    );

    let out = d.dfget(
        &origin.url("f"),
        &root.path().join("z"),
        &["--digest", "sha256:nothex"],
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));

    let out = tests::dfget_cmd(
        &root.path().join("nope.sock"),
        &origin.url("f"),
        &root.path().join("w"),
        &[],
    )
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("daemon not reachable"),
        "{}",
        stderr(&out)
    );

    let out = d.dfget("ftp://example/x", &root.path().join("v"), &[]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));

    // Unreachable origin: nothing listens on this port.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let out = d.dfget(&format!("http://{dead}/f"), &root.path().join("u"), &[]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));

    // The daemon is still fine, and a good request still works.
    let out = d.dfget(
        &origin.url("f"),
        &root.path().join("ok"),
        &["--digest", &sha256_hex(&data)],
    );
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn http_apis_reject_unknown_and_malformed_ids() {
    let root = tempfile::tempdir().unwrap();
    let sn = SupernodeProc::start(&root.path().join("sn")).unwrap();
    let d = DaemonProc::start(&sn, root.path(), "d0", &[]).unwrap();
    let unknown = TaskId::from_bytes([7; 32]).to_string();
    assert_eq!(
        tests::http_get(sn.api, &format!("/api/v1/tasks/{unknown}"))
            .unwrap()
            .0,
        404
    );
    assert_eq!(tests::http_get(sn.api, "/api/v1/tasks/zzz").unwrap().0, 400);
    assert_eq!(
        unix_get(&d.sock, &format!("/v1/tasks/{unknown}"))
            .unwrap()
            .0,
        404
    );
    assert_eq!(unix_get(&d.sock, "/v1/tasks/not-an-id").unwrap().0, 400);
    let (status, body) = tests::http_get(sn.api, "/metrics").unwrap();
    assert_eq!(status, 200);
    assert!(String::from_utf8_lossy(&body).contains("supernode_control_requests"));
    let hosts = sn.get_json("/api/v1/hosts").unwrap();
    assert_eq!(hosts[0]["host"], "d0");
}

/// A QUIC client holding a cluster certificate, as a misbehaving daemon would.
struct RawClient {
    endpoint: quinn::Endpoint,
    ca: ClusterCa,
    rt: tokio::runtime::Runtime,
}

impl RawClient {
    fn new(sn: &SupernodeProc) -> Self {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let (c, k) = sn.ca();
        let ca = ClusterCa::load(&c, &k).unwrap();
        let endpoint =
            rt.block_on(async { quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap() });
        Self { endpoint, ca, rt }
    }

    /// Sends raw bytes on a fresh stream and returns whatever comes back (or the error).
    fn exchange(
        &self,
        addr: std::net::SocketAddr,
        alpn: &[u8],
        name: &str,
        payload: &[u8],
    ) -> Result<Vec<u8>, String> {
        let id = self.ca.issue(&["attacker"]).unwrap();
        let cfg = self.ca.client_config(&id, alpn).unwrap();
        self.rt.block_on(async {
            let conn = self
                .endpoint
                .connect_with(cfg, addr, name)
                .map_err(|e| e.to_string())?
                .await
                .map_err(|e| e.to_string())?;
            let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
            send.write_all(payload).await.map_err(|e| e.to_string())?;
            let _ = send.finish();
            let got = tokio::time::timeout(Duration::from_secs(10), recv.read_to_end(1 << 20))
                .await
                .map_err(|_| "no answer in 10s".to_string())?;
            got.map_err(|e| e.to_string())
        })
    }
}

fn frame<F: Frame>(msg: &F) -> Vec<u8> {
    msg.to_bytes().unwrap().to_vec()
}

#[test]
fn malformed_frames_get_errors_and_servers_survive() {
    let root = tempfile::tempdir().unwrap();
    let sn = SupernodeProc::start(&root.path().join("sn")).unwrap();
    let d = DaemonProc::start(&sn, root.path(), "d0", &[]).unwrap();
    let c = RawClient::new(&sn);
    let ctl = |payload: &[u8]| {
        c.exchange(
            sn.control,
            proto::CONTROL_ALPN,
            proto::SUPERNODE_SERVER_NAME,
            payload,
        )
    };
    let bad_request = |answer: Result<Vec<u8>, String>| {
        let bytes = answer.expect("an answer");
        let mut b = bytes::Bytes::from(bytes);
        matches!(
            ControlResponse::decode(&mut b),
            Ok(Some(ControlResponse::Error {
                code: ControlErrorCode::BadRequest,
                ..
            }))
        )
    };

    // Oversized length prefix: refused before any body is read.
    assert!(
        bad_request(ctl(&[0xff, 0xff, 0xff, 0xff])),
        "oversized control frame"
    );
    // Truncated: header promises 100 bytes, stream ends after 3.
    let mut t = BytesMut::new();
    t.put_u32(100);
    t.put_slice(&[1, 2, 3]);
    assert!(bad_request(ctl(&t)), "truncated control frame");
    // Garbage body of the declared length.
    let mut g = BytesMut::new();
    g.put_u32(8);
    g.put_slice(&[0xee; 8]);
    assert!(bad_request(ctl(&g)), "garbage control frame");
    // Well-formed request for a task nobody registered.
    let req = ControlRequest::AnnouncePieces {
        host: proto::HostId::new("d0").unwrap(),
        task: TaskId::from_bytes([1; 32]),
        source: proto::control::AnnounceSource::Origin,
        pieces: vec![],
    };
    let mut b = bytes::Bytes::from(ctl(&frame(&req)).unwrap());
    assert!(matches!(
        ControlResponse::decode(&mut b),
        Ok(Some(ControlResponse::Error {
            code: ControlErrorCode::UnknownTask,
            ..
        }))
    ));

    // Piece server: unknown task -> NotFound; oversized frame -> stream dropped, no panic.
    let peer = |payload: &[u8]| {
        c.exchange(
            d.peer_addr,
            proto::PEER_ALPN,
            proto::PEER_SERVER_NAME,
            payload,
        )
    };
    let mut b = bytes::Bytes::from(
        peer(&frame(&PieceRequest {
            task: TaskId::from_bytes([2; 32]),
            piece: PieceIndex(0),
        }))
        .unwrap(),
    );
    assert_eq!(
        PieceResponse::decode(&mut b).unwrap(),
        Some(PieceResponse::NotFound)
    );
    let answer = peer(&[0x7f, 0xff, 0xff, 0xff]).unwrap_or_default();
    assert!(answer.is_empty(), "no data for an oversized piece request");

    // Both processes still answer.
    assert_eq!(tests::http_get(sn.api, "/healthz").unwrap().0, 200);
    assert_eq!(unix_get(&d.sock, "/healthz").unwrap().0, 200);
}

#[test]
fn peers_without_a_cluster_certificate_are_refused() {
    let root = tempfile::tempdir().unwrap();
    let sn = SupernodeProc::start(&root.path().join("sn")).unwrap();
    let d = DaemonProc::start(&sn, root.path(), "d0", &[]).unwrap();
    // A certificate from another CA: the handshake must fail both ways.
    let other_dir = tempfile::tempdir().unwrap();
    let other = ClusterCa::load_or_create(
        &other_dir.path().join("ca.pem"),
        &other_dir.path().join("k.pem"),
    )
    .unwrap();
    let id = other.issue(&["intruder"]).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let result: Result<(), String> = rt.block_on(async {
        let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        let cfg = other.client_config(&id, proto::PEER_ALPN).unwrap();
        let conn = endpoint
            .connect_with(cfg, d.peer_addr, proto::PEER_SERVER_NAME)
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())?;
        let (mut s, mut r) = conn.open_bi().await.map_err(|e| e.to_string())?;
        s.write_all(&frame(&PieceRequest {
            task: TaskId::from_bytes([2; 32]),
            piece: PieceIndex(0),
        }))
        .await
        .map_err(|e| e.to_string())?;
        let _ = s.finish();
        r.read_to_end(1024).await.map_err(|e| e.to_string())?;
        Ok(())
    });
    let err = result.expect_err("foreign certificate accepted");
    assert!(!err.is_empty());
}
