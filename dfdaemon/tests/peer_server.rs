//! The piece server and client over real QUIC on loopback:
//! - a parent that serves bytes not matching the supernode's record (a lying or buggy
//!   peer whose own digest bookkeeping agrees with its bad bytes) is caught by the
//!   requester;
//! - a piece still landing from the origin is streamed as it lands, and only a requester
//!   sent for exactly that takes it.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use dfdaemon::landing::Landings;
use dfdaemon::metrics::Metrics;
use dfdaemon::peer::{PeerClient, PeerError, ServeCtx, serve_connection};
use dfdaemon::store::Store;
use proto::layout::MIN_PIECE_SIZE;
use proto::{PieceIndex, PieceLayout, Sha256Digest, TaskId};
use supernode::tls::ClusterCa;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A piece server on loopback and a client for it; stops when the token is cancelled.
struct Pair {
    addr: SocketAddr,
    client: PeerClient,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

impl Pair {
    /// With a cluster CA made in `dir`.
    fn start(dir: &Path, store: Arc<Store>, landings: Arc<Landings>) -> Self {
        let ca = ClusterCa::load_or_create(&dir.join("ca.pem"), &dir.join("ca-key.pem")).unwrap();
        let server_id = ca.issue(&[proto::PEER_SERVER_NAME]).unwrap();
        let server = quinn::Endpoint::server(
            ca.server_config(&server_id, proto::PEER_ALPN).unwrap(),
            "127.0.0.1:0".parse().unwrap(),
        )
        .unwrap();
        let addr = server.local_addr().unwrap();
        let tracker = TaskTracker::new();
        let cancel = CancellationToken::new();
        let ctx = ServeCtx {
            store,
            slots: Arc::new(tokio::sync::Semaphore::new(4)),
            landings,
            landing_slots: Arc::new(tokio::sync::Semaphore::new(4)),
            metrics: Arc::new(Metrics::default()),
        };
        tracker.spawn(supernode::transport::accept_loop(
            server.clone(),
            8,
            cancel.clone(),
            tracker.clone(),
            {
                let tracker = tracker.clone();
                move |conn| serve_connection(conn, ctx.clone(), tracker.clone())
            },
        ));
        let client_id = ca.issue(&["requester"]).unwrap();
        let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        let client = PeerClient::new(
            endpoint,
            ca.client_config(&client_id, proto::PEER_ALPN).unwrap(),
        );
        Self {
            addr,
            client,
            cancel,
            tracker,
        }
    }

    async fn stop(self) {
        self.cancel.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}

#[tokio::test]
async fn requester_rejects_bytes_that_do_not_match_the_record() {
    let dir = tempfile::tempdir().unwrap();

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

    let pair = Pair::start(dir.path(), store.clone(), Arc::new(Landings::default()));
    let (addr, client) = (pair.addr, &pair.client);

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

    pair.stop().await;
}

#[tokio::test]
async fn a_landing_piece_streams_as_it_lands_and_ends_with_its_record() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("parent"), u64::MAX).unwrap();
    let landings = Arc::new(Landings::default());
    let pair = Pair::start(dir.path(), store, landings.clone());
    let task = TaskId::for_url("http://origin/file", &[], None);
    let _downloading = landings.task(task);
    let body: Vec<u8> = (0..64 * 1024u32).map(|i| (i % 251) as u8).collect();
    let len = body.len() as u32;

    // Asked before the parent registered its origin fetch: the server waits for it.
    let fetch = async {
        let got = pair
            .client
            .fetch_landing(pair.addr, task, PieceIndex(0), len)
            .await;
        (got, Instant::now())
    };
    let feed = async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let landing = landings.begin(task, PieceIndex(0), len);
        for part in body.chunks(10_000) {
            landing.push(Bytes::copy_from_slice(part));
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // A requester that wants a stored piece is not given bytes nobody checked.
        let plain = pair
            .client
            .fetch(pair.addr, task, PieceIndex(0), len, Sha256Digest::of(&body))
            .await;
        assert!(matches!(plain, Err(PeerError::Busy { .. })), "{plain:?}");
        // Every byte is out, but the landing requester must wait for the record.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let at = Instant::now();
        landings.recorded(&task, PieceIndex(0));
        at
    };
    let ((got, finished), recorded) = tokio::join!(fetch, feed);
    let (data, digest) = got.unwrap();
    assert_eq!(&data[..], &body[..]);
    assert_eq!(digest, Sha256Digest::of(&body));
    assert!(finished >= recorded, "finished before the record was made");

    // A fetch that fails at the parent reaches the requester as "not found".
    let landing = landings.begin(task, PieceIndex(1), len);
    landing.push(Bytes::copy_from_slice(&body[..1000]));
    let fetch = pair
        .client
        .fetch_landing(pair.addr, task, PieceIndex(1), len);
    let fail = async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        landings.failed(&task, PieceIndex(1));
    };
    let (got, ()) = tokio::join!(fetch, fail);
    assert!(matches!(got, Err(PeerError::NotFound { .. })), "{got:?}");
    // Failing before a byte landed: the reset may overtake the answer's header, and it
    // still reads as "not found" (a broken stream would count against the parent).
    landings.begin(task, PieceIndex(3), len);
    let fetch = pair
        .client
        .fetch_landing(pair.addr, task, PieceIndex(3), len);
    let fail = async {
        tokio::task::yield_now().await;
        landings.failed(&task, PieceIndex(3));
    };
    let (got, ()) = tokio::join!(fetch, fail);
    assert!(matches!(got, Err(PeerError::NotFound { .. })), "{got:?}");
    // Nothing landing and nothing stored: not found, after the short wait.
    let got = pair
        .client
        .fetch_landing(pair.addr, task, PieceIndex(2), len)
        .await;
    assert!(matches!(got, Err(PeerError::NotFound { .. })), "{got:?}");
    pair.stop().await;
}
