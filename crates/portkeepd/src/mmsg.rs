//! Batched UDP receive and send with `recvmmsg(2)` / `sendmmsg(2)`.
//!
//! One system call moves up to [`BATCH`] datagrams, which is what lets one
//! core answer hundreds of thousands of small requests a second (DESIGN.md:
//! "UDP I/O is batched"). The calls go through crates that own the
//! `unsafe` part, so the daemon has none: `nix` receives (`rustix` has no
//! `recvmmsg`), `rustix` sends (it returns how many datagrams left, which
//! `nix`'s `sendmmsg` reports only through an iterator that reads
//! addresses it never wrote).

use std::io::{self, IoSlice, IoSliceMut};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;

use nix::errno::Errno;
use nix::sys::socket::{
    recvmmsg, setsockopt, sockopt, ControlMessageOwned, MsgFlags, MultiHeaders, SockaddrStorage,
};
use rustix::net::{sendmmsg, MMsgHdr, SendAncillaryBuffer, SendFlags, SocketAddrAny};

/// Datagrams per system call.
pub const BATCH: usize = 64;
/// Receive buffer size: one more than the largest PCP message, so an
/// oversized datagram shows up as longer than 1100 rather than truncated
/// to exactly the limit.
pub const BUF: usize = portkeep_proto::MAX_MESSAGE_LEN + 4;

/// Buffers for one received batch.
///
/// The headers are allocated once and reused: `nix` sets each header's
/// address length when it allocates them and the kernel overwrites it with
/// the received address's length, so a socket must receive one address
/// family only (every PCP socket does: IPv6 ones are `IPV6_V6ONLY`).
pub struct RecvBatch {
    bufs: Vec<[u8; BUF]>,
    headers: MultiHeaders<SockaddrStorage>,
    /// Source, length, and the interface it arrived on when asked for.
    received: Vec<(SocketAddr, usize, Option<u32>)>,
    /// Whether the headers have room for a packet-info message.
    pktinfo: bool,
}

impl std::fmt::Debug for RecvBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecvBatch")
            .field("count", &self.received.len())
            .finish()
    }
}

impl Default for RecvBatch {
    fn default() -> Self {
        RecvBatch {
            bufs: vec![[0u8; BUF]; BATCH],
            headers: MultiHeaders::preallocate(BATCH, None),
            received: Vec::with_capacity(BATCH),
            pktinfo: false,
        }
    }
}

impl RecvBatch {
    /// A batch that also reads the interface each datagram arrived on, from
    /// a socket with [`enable_pktinfo`].
    pub fn with_pktinfo() -> RecvBatch {
        RecvBatch {
            headers: MultiHeaders::preallocate(
                BATCH,
                Some(nix::cmsg_space!(nix::libc::in6_pktinfo)),
            ),
            pktinfo: true,
            ..RecvBatch::default()
        }
    }

    /// The datagrams of the last receive, with their sources.
    pub fn iter(&self) -> impl Iterator<Item = (SocketAddr, &[u8])> + '_ {
        self.iter_on().map(|(from, _, data)| (from, data))
    }

    /// The datagrams of the last receive, with their sources and the
    /// interface each arrived on (`None` unless [`RecvBatch::with_pktinfo`]).
    pub fn iter_on(&self) -> impl Iterator<Item = (SocketAddr, Option<u32>, &[u8])> + '_ {
        self.received
            .iter()
            .zip(&self.bufs)
            .map(|(&(from, len, on), buf)| (from, on, &buf[..len.min(BUF)]))
    }
}

/// Asks the kernel to tell, with each datagram `sock` receives, the
/// interface it arrived on (`IP_PKTINFO`, `IPV6_RECVPKTINFO`).
pub fn enable_pktinfo(sock: &UdpSocket) -> io::Result<()> {
    if sock.local_addr()?.is_ipv6() {
        setsockopt(sock, sockopt::Ipv6RecvPacketInfo, &true)?;
    } else {
        setsockopt(sock, sockopt::Ipv4PacketInfo, &true)?;
    }
    Ok(())
}

fn to_std(a: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = a.as_sockaddr_in() {
        return Some(SocketAddr::V4((*v4).into()));
    }
    a.as_sockaddr_in6().map(|v6| SocketAddr::V6((*v6).into()))
}

/// Receives at least one and up to [`BATCH`] datagrams. Returns 0 when the
/// socket's read timeout expires with nothing received.
pub fn recv_batch(sock: &UdpSocket, batch: &mut RecvBatch) -> io::Result<usize> {
    let RecvBatch {
        bufs,
        headers,
        received,
        pktinfo,
    } = batch;
    received.clear();
    let mut slices: Vec<[IoSliceMut<'_>; 1]> = bufs
        .iter_mut()
        .map(|b| [IoSliceMut::new(&mut b[..])])
        .collect();
    let results = match recvmmsg(
        sock.as_raw_fd(),
        headers,
        slices.iter_mut(),
        MsgFlags::MSG_WAITFORONE,
        None,
    ) {
        Ok(r) => r,
        Err(Errno::EAGAIN | Errno::EINTR | Errno::ETIMEDOUT) => return Ok(0),
        Err(e) => return Err(e.into()),
    };
    for m in results {
        // A datagram from an address of no IP family cannot come from a
        // PCP client: it keeps its slot (so buffers stay in step) but is
        // given an unspecified source, which the core drops.
        let from = m
            .address
            .as_ref()
            .and_then(to_std)
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
        let on = if *pktinfo {
            m.cmsgs().ok().and_then(|mut c| {
                c.find_map(|c| match c {
                    ControlMessageOwned::Ipv4PacketInfo(i) => u32::try_from(i.ipi_ifindex).ok(),
                    ControlMessageOwned::Ipv6PacketInfo(i) => Some(i.ipi6_ifindex),
                    _ => None,
                })
            })
        } else {
            None
        };
        received.push((from, m.bytes, on));
    }
    Ok(received.len())
}

/// Replies queued for one batched send.
#[derive(Debug, Default)]
pub struct SendBatch {
    data: Vec<u8>,
    items: Vec<(SocketAddr, usize, usize)>,
}

impl SendBatch {
    /// Queues `bytes` for `dest`.
    pub fn push(&mut self, dest: SocketAddr, bytes: &[u8]) {
        let start = self.data.len();
        self.data.extend_from_slice(bytes);
        self.items.push((dest, start, bytes.len()));
    }

    /// A batch with every datagram passed through `f` (same destinations,
    /// same order): for replies whose content changed after they were
    /// built; `f` is given each destination and datagram. A datagram for
    /// which `f` returns `None` is left out.
    pub fn rewrite(&self, mut f: impl FnMut(SocketAddr, &[u8]) -> Option<Vec<u8>>) -> SendBatch {
        let mut out = SendBatch::default();
        for (dest, start, len) in &self.items {
            let Some(bytes) = f(*dest, &self.data[*start..*start + *len]) else {
                continue;
            };
            let s = out.data.len();
            out.data.extend_from_slice(&bytes);
            out.items.push((*dest, s, bytes.len()));
        }
        out
    }

    /// Number queued.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Sends everything queued, in as few calls as the kernel allows, and
    /// empties the batch. A datagram the kernel refuses (say, an
    /// unreachable destination) is skipped rather than retried: PCP clients
    /// retransmit (RFC 6887 section 8.1.1).
    pub fn flush(&mut self, sock: &UdpSocket) -> io::Result<()> {
        let mut sent = 0;
        while sent < self.items.len() {
            let chunk = &self.items[sent..self.items.len().min(sent + BATCH)];
            let addrs: Vec<SocketAddrAny> = chunk.iter().map(|(a, _, _)| (*a).into()).collect();
            let slices: Vec<[IoSlice<'_>; 1]> = chunk
                .iter()
                .map(|(_, start, len)| [IoSlice::new(&self.data[*start..*start + *len])])
                .collect();
            let mut controls: Vec<SendAncillaryBuffer<'_, '_, '_>> = chunk
                .iter()
                .map(|_| SendAncillaryBuffer::default())
                .collect();
            let mut msgs: Vec<MMsgHdr<'_>> = addrs
                .iter()
                .zip(&slices)
                .zip(controls.iter_mut())
                .map(|((a, iov), c)| MMsgHdr::new_with_addr(a, iov, c))
                .collect();
            match sendmmsg(sock, &mut msgs, SendFlags::empty()) {
                Ok(n) => sent += n.max(1),
                Err(rustix::io::Errno::INTR) => continue,
                // Socket buffer full: let it drain a moment.
                Err(rustix::io::Errno::AGAIN) => std::thread::yield_now(),
                Err(e) => {
                    tracing::debug!(error = %e, "send failed; skipping one reply");
                    sent += 1;
                }
            }
        }
        self.items.clear();
        self.data.clear();
        Ok(())
    }
}

/// Sends `bytes` to the multicast `group`:`port` out of the interface
/// numbered `ifindex`, from `sock` (its address and port: RFC 6887 section
/// 14.1.3 wants an unsolicited ANNOUNCE sent from the address and port
/// requests are received on, or clients do not accept it). IPv4 picks the
/// interface per datagram (`IP_PKTINFO`), IPv6 by the group's scope.
pub fn send_multicast(
    sock: &UdpSocket,
    bytes: &[u8],
    ifindex: u32,
    group: std::net::IpAddr,
    port: u16,
) -> io::Result<()> {
    match group {
        std::net::IpAddr::V4(g) => {
            let info = nix::libc::in_pktinfo {
                ipi_ifindex: i32::try_from(ifindex)
                    .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?,
                ipi_spec_dst: nix::libc::in_addr { s_addr: 0 },
                ipi_addr: nix::libc::in_addr { s_addr: 0 },
            };
            let dest = nix::sys::socket::SockaddrIn::from(std::net::SocketAddrV4::new(g, port));
            nix::sys::socket::sendmsg(
                sock.as_raw_fd(),
                &[IoSlice::new(bytes)],
                &[nix::sys::socket::ControlMessage::Ipv4PacketInfo(&info)],
                MsgFlags::empty(),
                Some(&dest),
            )?;
        }
        std::net::IpAddr::V6(g) => {
            sock.send_to(bytes, std::net::SocketAddrV6::new(g, port, 0, ifindex))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]

    use std::time::Duration;

    use super::*;

    fn round_trip(local: &str) {
        let a = UdpSocket::bind(local).unwrap();
        let b = UdpSocket::bind(local).unwrap();
        b.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut out = SendBatch::default();
        // More than one system call's worth, of varying sizes.
        for i in 0..(BATCH + 5) {
            out.push(b.local_addr().unwrap(), &vec![i as u8; 1 + i % 40]);
        }
        out.flush(&a).unwrap();
        assert!(out.is_empty());
        let mut rb = RecvBatch::default();
        let mut got = Vec::new();
        while got.len() < BATCH + 5 {
            let n = recv_batch(&b, &mut rb).unwrap();
            assert!(n > 0, "timed out after {} datagrams", got.len());
            for (from, data) in rb.iter() {
                assert_eq!(from, a.local_addr().unwrap());
                got.push(data.to_vec());
            }
        }
        for (i, d) in got.iter().enumerate() {
            assert_eq!(d, &vec![i as u8; 1 + i % 40]);
        }
    }

    #[test]
    fn batches_round_trip_over_ipv4() {
        round_trip("127.0.0.1:0");
    }

    #[test]
    fn batches_round_trip_over_ipv6() {
        if UdpSocket::bind("[::1]:0").is_err() {
            portkeep_test_support::skip::skip("batched UDP over IPv6", "no [::1] here");
            return;
        }
        round_trip("[::1]:0");
    }

    #[test]
    fn an_oversized_datagram_is_seen_longer_than_the_limit() {
        let a = UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = UdpSocket::bind("127.0.0.1:0").unwrap();
        b.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        a.send_to(&[7u8; 2000], b.local_addr().unwrap()).unwrap();
        let mut rb = RecvBatch::default();
        assert_eq!(recv_batch(&b, &mut rb).unwrap(), 1);
        let (_, data) = rb.iter().next().unwrap();
        assert!(data.len() > portkeep_proto::MAX_MESSAGE_LEN);
    }
}
