//! Cluster trust: one CA per cluster; every supernode and daemon holds a leaf certificate
//! signed by it, and QUIC connections are mutually authenticated against it (no "accept
//! any certificate" anywhere).
//!
//! Each process mints its own leaf at start from the CA files it is given (in Kubernetes,
//! a Secret mounted on every node). The supernode creates the CA in its data dir on first
//! start when none is configured, so a one-machine setup needs no preparation: point the
//! daemons at `<supernode data dir>/ca.pem` and `ca-key.pem`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::RootCertStore;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::WebPkiClientVerifier;
use thiserror::Error;

/// A connection with no traffic for this long is dead; covers a killed peer whose socket
/// never says goodbye.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Keep-alive well inside [`IDLE_TIMEOUT`] so quiet but healthy connections survive.
pub const KEEP_ALIVE: Duration = Duration::from_secs(3);
/// Largest UDP payload MTU discovery probes for: a full 1500-byte Ethernet frame over IPv4.
pub const MTU_UPPER_BOUND: u16 = 1500 - 20 - 8;

#[derive(Debug, Error)]
pub enum TlsError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("QUIC crypto configuration: {0}")]
    Quic(String),
    #[error("{path} holds no PEM certificate")]
    NoCert { path: PathBuf },
}

/// The cluster CA: verifies everyone, signs our own leaf.
pub struct ClusterCa {
    issuer: Issuer<'static, KeyPair>,
    roots: Arc<RootCertStore>,
}

/// This process's certificate chain and key.
pub struct Identity {
    chain: Vec<CertificateDer<'static>>,
    key: PrivatePkcs8KeyDer<'static>,
}

fn read(path: &Path) -> Result<String, TlsError> {
    std::fs::read_to_string(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// aws-lc's suites with AES-128-GCM first (the default order puts AES-256 first). Both
/// ends use this order, so it is what they agree on: 10 AES rounds per block instead of
/// 14, where encryption is a tenth of a relaying daemon's CPU (swarm bench profile).
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    let mut p = rustls::crypto::aws_lc_rs::default_provider();
    p.cipher_suites
        .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(p)
}

impl ClusterCa {
    pub fn load(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let cert_pem = read(cert)?;
        let key_pem = read(key)?;
        let signing_key = KeyPair::from_pem(&key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, signing_key)?;
        let der = rustls_pemfile::certs(&mut cert_pem.as_bytes())
            .next()
            .and_then(Result::ok)
            .ok_or_else(|| TlsError::NoCert {
                path: cert.to_path_buf(),
            })?;
        let mut roots = RootCertStore::empty();
        roots.add(der)?;
        Ok(Self {
            issuer,
            roots: Arc::new(roots),
        })
    }

    /// Loads the CA, creating it first if neither file exists.
    pub fn load_or_create(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        Self::load_or_create_named(cert, key, "dfp2p cluster CA")
    }

    /// [`Self::load_or_create`] with the common name a new CA gets (the daemon's HTTPS
    /// proxy has a CA of its own, which clients are asked to trust).
    pub fn load_or_create_named(cert: &Path, key: &Path, name: &str) -> Result<Self, TlsError> {
        if !cert.exists() && !key.exists() {
            let key_pair = KeyPair::generate()?;
            let mut params = CertificateParams::new(Vec::<String>::new())?;
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.distinguished_name.push(DnType::CommonName, name);
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            params.not_after = rcgen::date_time_ymd(2100, 1, 1);
            let ca = params.self_signed(&key_pair)?;
            write_private(key, key_pair.serialize_pem().as_bytes())?;
            std::fs::write(cert, ca.pem()).map_err(|source| TlsError::Write {
                path: cert.to_path_buf(),
                source,
            })?;
        }
        Self::load(cert, key)
    }

    /// Mints a leaf for this process valid for `names` (TLS server names) and usable as
    /// client and server certificate.
    pub fn issue(&self, names: &[&str]) -> Result<Identity, TlsError> {
        let key_pair = KeyPair::generate()?;
        let mut params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())?;
        params.distinguished_name.push(
            DnType::CommonName,
            names.first().copied().unwrap_or("dfp2p"),
        );
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params.signed_by(&key_pair, &self.issuer)?;
        Ok(Identity {
            chain: vec![cert.der().clone()],
            key: PrivatePkcs8KeyDer::from(key_pair.serialize_der()),
        })
    }

    fn transport(&self) -> Arc<quinn::TransportConfig> {
        let mut t = quinn::TransportConfig::default();
        t.max_idle_timeout(Some(quinn::IdleTimeout::from(quinn::VarInt::from_u32(
            IDLE_TIMEOUT.as_millis() as u32,
        ))));
        t.keep_alive_interval(Some(KEEP_ALIVE));
        // Piece transfers are a few MiB each and several run on one connection: give
        // the windows room for a full bandwidth-delay product on a fast LAN.
        t.stream_receive_window(quinn::VarInt::from_u32(16 << 20));
        t.receive_window(quinn::VarInt::from_u32(64 << 20));
        t.send_window(64 << 20);
        t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(256));
        // quinn searches up to 1452 bytes of UDP payload by default (what fits IPv6 on
        // Ethernet); over IPv4 Ethernet carries 1472. Probing above the path MTU is
        // harmless (the probe is lost and the search settles lower). Measured in the
        // 16-host bench: 1.6% fewer bytes and 3% fewer packets on the hosts' uplinks.
        let mut mtu = quinn::MtuDiscoveryConfig::default();
        mtu.upper_bound(MTU_UPPER_BOUND);
        t.mtu_discovery_config(Some(mtu));
        Arc::new(t)
    }

    /// A QUIC server config that only accepts clients holding a leaf from this CA.
    pub fn server_config(
        &self,
        id: &Identity,
        alpn: &[u8],
    ) -> Result<quinn::ServerConfig, TlsError> {
        let quic = QuicServerConfig::try_from(self.rustls_server(id, alpn)?)
            .map_err(|e| TlsError::Quic(e.to_string()))?;
        let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(quic));
        cfg.transport_config(self.transport());
        Ok(cfg)
    }

    /// A QUIC client config that presents our leaf and verifies servers against the CA.
    pub fn client_config(
        &self,
        id: &Identity,
        alpn: &[u8],
    ) -> Result<quinn::ClientConfig, TlsError> {
        let quic = QuicClientConfig::try_from(self.rustls_client(id, alpn)?)
            .map_err(|e| TlsError::Quic(e.to_string()))?;
        let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
        cfg.transport_config(self.transport());
        Ok(cfg)
    }

    fn rustls_server(&self, id: &Identity, alpn: &[u8]) -> Result<rustls::ServerConfig, TlsError> {
        let verifier =
            WebPkiClientVerifier::builder_with_provider(self.roots.clone(), provider()).build()?;
        let mut tls = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(id.chain.clone(), PrivateKeyDer::Pkcs8(id.key.clone_key()))?;
        tls.alpn_protocols = vec![alpn.to_vec()];
        Ok(tls)
    }

    fn rustls_client(&self, id: &Identity, alpn: &[u8]) -> Result<rustls::ClientConfig, TlsError> {
        let mut tls = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(self.roots.clone())
            .with_client_auth_cert(id.chain.clone(), PrivateKeyDer::Pkcs8(id.key.clone_key()))?;
        tls.alpn_protocols = vec![alpn.to_vec()];
        Ok(tls)
    }
}

impl Identity {
    /// A TLS-over-TCP server config presenting this identity, asking for no client
    /// certificate (the HTTPS proxy's intercepted sessions).
    pub fn tls_server_config(&self, alpn: &[&[u8]]) -> Result<rustls::ServerConfig, TlsError> {
        let mut tls = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(
                self.chain.clone(),
                PrivateKeyDer::Pkcs8(self.key.clone_key()),
            )?;
        tls.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
        Ok(tls)
    }
}

fn write_private(path: &Path, data: &[u8]) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let err = |source| TlsError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(err)?;
    f.write_all(data).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_then_load_same_ca() {
        let dir = tempfile::tempdir().unwrap();
        let (c, k) = (dir.path().join("ca.pem"), dir.path().join("ca-key.pem"));
        let ca = ClusterCa::load_or_create(&c, &k).unwrap();
        let id = ca.issue(&[proto::PEER_SERVER_NAME]).unwrap();
        let again = ClusterCa::load_or_create(&c, &k).unwrap();
        assert!(again.server_config(&id, proto::PEER_ALPN).is_ok());
        let mode =
            std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&k).unwrap().permissions());
        assert_eq!(mode & 0o077, 0, "CA key not readable by others");
    }

    /// A fresh CA in a temporary directory (kept alive by the caller) and a peer identity.
    fn test_ca() -> (tempfile::TempDir, ClusterCa, Identity) {
        let dir = tempfile::tempdir().unwrap();
        let ca = ClusterCa::load_or_create(&dir.path().join("c.pem"), &dir.path().join("k.pem"))
            .unwrap();
        let id = ca.issue(&[proto::PEER_SERVER_NAME]).unwrap();
        (dir, ca, id)
    }

    /// Two of our endpoints settle on AES-128-GCM (the cheaper cipher), with the same
    /// rustls configs the QUIC configs are built from, in a handshake over memory.
    #[test]
    fn peers_agree_on_aes_128_gcm() {
        let (_dir, ca, id) = test_ca();
        let name = rustls::pki_types::ServerName::try_from(proto::PEER_SERVER_NAME).unwrap();
        let client_cfg = Arc::new(ca.rustls_client(&id, proto::PEER_ALPN).unwrap());
        let mut client = rustls::ClientConnection::new(client_cfg, name).unwrap();
        let server_cfg = Arc::new(ca.rustls_server(&id, proto::PEER_ALPN).unwrap());
        let mut server = rustls::ServerConnection::new(server_cfg).unwrap();
        for _ in 0..10 {
            if !client.is_handshaking() && !server.is_handshaking() {
                break;
            }
            let mut wire = Vec::new();
            client.write_tls(&mut wire).unwrap();
            server.read_tls(&mut wire.as_slice()).unwrap();
            server.process_new_packets().unwrap();
            wire.clear();
            server.write_tls(&mut wire).unwrap();
            client.read_tls(&mut wire.as_slice()).unwrap();
            client.process_new_packets().unwrap();
        }
        assert!(!client.is_handshaking(), "handshake did not finish");
        for suite in [
            client.negotiated_cipher_suite(),
            server.negotiated_cipher_suite(),
        ] {
            assert_eq!(
                suite.map(|s| s.suite()),
                Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256)
            );
        }
    }

    /// Our transport settings reach the wire: over loopback (MTU 65536) MTU discovery
    /// climbs past quinn's default bound of 1452 to ours.
    #[tokio::test]
    async fn mtu_discovery_reaches_the_ipv4_ethernet_bound() {
        let (_dir, ca, id) = test_ca();
        let server = quinn::Endpoint::server(
            ca.server_config(&id, proto::PEER_ALPN).unwrap(),
            "127.0.0.1:0".parse().unwrap(),
        )
        .unwrap();
        let mut client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        client.set_default_client_config(ca.client_config(&id, proto::PEER_ALPN).unwrap());
        let addr = server.local_addr().unwrap();
        let accept = tokio::spawn(async move { server.accept().await.unwrap().await.unwrap() });
        let conn = client
            .connect(addr, proto::PEER_SERVER_NAME)
            .unwrap()
            .await
            .unwrap();
        let _server_conn = accept.await.unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while conn.stats().path.current_mtu < MTU_UPPER_BOUND {
            assert!(
                std::time::Instant::now() < deadline,
                "MTU stuck at {}",
                conn.stats().path.current_mtu
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(conn.stats().path.current_mtu, MTU_UPPER_BOUND);
    }
}
