//! The peer endpoint's UDP socket, with a receive buffer sized for a busy host.
//!
//! A daemon takes pieces from several parents at once, so datagrams arrive in bursts of a
//! few hundred Mbit/s. When its thread is not scheduled for a few milliseconds (other
//! daemons, containers or the kernel want the CPU) they wait in the socket, and the
//! kernel's default buffer (208 KiB, 4 ms at 400 Mbit/s) overflows. Each dropped datagram
//! is a loss to QUIC: the parent sends it again and its congestion window shrinks, so the
//! busier the host, the more work it gets. In the 16-host bench with the harness held to
//! 1.5 CPUs, the hosts dropped 4,300-6,900 datagrams a run and finished at 1.08-1.12 x the
//! bound; with a 4 MiB buffer they dropped none, sent 14% fewer packets and finished at
//! 1.06-1.07 x (BENCHMARKS.md, stop 11).
//!
//! Only the receive side grows. The send buffer also caps how much of this socket's data
//! may wait in the host's queueing disciplines; growing it too (tried in stop 9) let those
//! queues hold megabytes, and control messages waited behind piece data.

use std::io;
use std::net::{SocketAddr, UdpSocket};

use rustix::net::sockopt;

/// Receive buffer asked for on the peer socket.
pub const DEFAULT_RECEIVE_BUFFER: u64 = 4 << 20;
/// The kernel takes the size as a C int (and doubles it); this keeps well inside that.
pub const MAX_RECEIVE_BUFFER: u64 = 1 << 30;

/// A bound socket and the receive buffer the kernel granted it.
pub struct PeerSocket {
    pub socket: UdpSocket,
    /// Bytes of receive buffer, as the kernel reports it (which counts its own overhead).
    pub receive_buffer: usize,
}

/// Binds `addr` and asks for a `want`-byte receive buffer (0 keeps the kernel's
/// default). Past `net.core.rmem_max` this needs CAP_NET_ADMIN; without it the buffer
/// stops at that limit, and a warning says which sysctl to raise.
pub fn bind_peer_socket(addr: SocketAddr, want: u64) -> io::Result<PeerSocket> {
    let socket = UdpSocket::bind(addr)?;
    // Linux books twice the value set (half for its own bookkeeping) and reports that.
    let ask = usize::try_from(want / 2).unwrap_or(usize::MAX / 2);
    if ask > 0 && sockopt::set_socket_recv_buffer_size_force(&socket, ask).is_err() {
        sockopt::set_socket_recv_buffer_size(&socket, ask)?;
    }
    let receive_buffer = sockopt::socket_recv_buffer_size(&socket)?;
    if receive_buffer < ask * 2 {
        tracing::warn!(
            got = receive_buffer,
            want = ask * 2,
            "peer socket receive buffer is smaller than configured: piece transfers may drop \
             packets when the host is busy; raise net.core.rmem_max to at least {} or run \
             with CAP_NET_ADMIN",
            ask
        );
    }
    Ok(PeerSocket {
        socket,
        receive_buffer,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loopback() -> SocketAddr {
        ([127, 0, 0, 1], 0).into()
    }

    #[test]
    fn receive_buffer_is_raised_as_far_as_the_system_allows() {
        let default = bind_peer_socket(loopback(), 0).unwrap().receive_buffer;
        let want = 4 * default as u64;
        let got = bind_peer_socket(loopback(), want).unwrap().receive_buffer;
        if rustix::process::geteuid().is_root() {
            // Root may pass rmem_max (the CI runs as root, so this is what it checks).
            assert!(got >= want as usize, "asked {want}, got {got}");
        } else {
            assert!(got >= default, "asked {want}, got {got}, default {default}");
        }
    }
}
