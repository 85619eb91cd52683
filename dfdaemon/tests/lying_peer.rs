//! A parent that serves bytes not matching the supernode's record (a lying or buggy peer
//! whose own digest bookkeeping agrees with its bad bytes) is caught by the requester:
//! real QUIC on loopback, the real piece server and client.

use std::sync::Arc;

use dfdaemon::metrics::Metrics;
use dfdaemon::peer::{PeerClient, PeerError, serve_connection};
use dfdaemon::store::Store;
use proto::layout::MIN_PIECE_SIZE;
use proto::{PieceIndex, PieceLayout, Sha256Digest, TaskId};
use supernode::tls::ClusterCa;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

#[tokio::test]
async fn requester_rejects_bytes_that_do_not_match_the_record() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ClusterCa::load_or_create(&dir.path().join("ca.pem"), &dir.path().join("ca-key.pem"))
        .unwrap();

    // The lying parent: stores garbage for piece 0 under the garbage's own digest, so its
    // read-side check passes and it serves the garbage as if it were good.
    let store = Store::open(&dir.path().join("liar"), u64::MAX).unwrap();
    let task = TaskId::for_url("http://origin/file", &[], None);
    let len = MIN_PIECE_SIZE as usize;
    let good = vec![1u8; len];
    let garbage = vec![2u8; len];
    let _lease = store.open_task(task, "http://origin/file", None).unwrap();
    store
        .set_layout(
            &task,
            PieceLayout::new(len as u64, MIN_PIECE_SIZE).unwrap(),
            true,
        )
        .unwrap();
    store
        .write_piece(
            &task,
            PieceIndex(0),
            garbage.clone().into(),
            Sha256Digest::of(&garbage),
        )
        .unwrap();

    let server_id = ca.issue(&[proto::PEER_SERVER_NAME]).unwrap();
    let server = quinn::Endpoint::server(
        ca.server_config(&server_id, proto::PEER_ALPN).unwrap(),
        "127.0.0.1:0".parse().unwrap(),
    )
    .unwrap();
    let addr = server.local_addr().unwrap();
    let tracker = TaskTracker::new();
    let cancel = CancellationToken::new();
    tracker.spawn(supernode::transport::accept_loop(
        server.clone(),
        8,
        cancel.clone(),
        tracker.clone(),
        {
            let (store, tracker) = (store.clone(), tracker.clone());
            move |conn| {
                serve_connection(
                    conn,
                    store.clone(),
                    Arc::new(tokio::sync::Semaphore::new(4)),
                    Arc::new(Metrics::default()),
                    tracker.clone(),
                )
            }
        },
    ));

    let client_id = ca.issue(&["requester"]).unwrap();
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let client = PeerClient::new(
        endpoint,
        ca.client_config(&client_id, proto::PEER_ALPN).unwrap(),
    );

    // Against the real record the bytes are refused...
    let err = client
        .fetch(
            addr,
            task,
            PieceIndex(0),
            len as u32,
            Sha256Digest::of(&good),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, PeerError::DigestMismatch { .. }), "{err}");
    // ...against the liar's own digest they would have passed: the check is the record's.
    let data = client
        .fetch(
            addr,
            task,
            PieceIndex(0),
            len as u32,
            Sha256Digest::of(&garbage),
        )
        .await
        .unwrap();
    assert_eq!(&data[..], &garbage[..]);
    // A piece of the wrong declared length is refused before its bytes are read.
    let err = client
        .fetch(
            addr,
            task,
            PieceIndex(0),
            len as u32 - 1,
            Sha256Digest::of(&good),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, PeerError::Length { .. }), "{err}");

    cancel.cancel();
    tracker.close();
    tracker.wait().await;
}
