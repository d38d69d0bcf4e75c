//! Batched UDP receive and send with `recvmmsg(2)` / `sendmmsg(2)`.
//!
//! One system call moves up to [`BATCH`] datagrams, which is what lets one
//! core answer hundreds of thousands of small requests a second (DESIGN.md:
//! "UDP I/O is batched"). This is the project's only `unsafe` code: the
//! kernel fills buffers we own, and every pointer handed to it is rebuilt
//! from live borrows right before each call.
#![allow(unsafe_code)]

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;

use socket2::SockAddr;

/// Datagrams per system call.
pub const BATCH: usize = 64;
/// Receive buffer size: one more than the largest PCP message, so an
/// oversized datagram shows up as longer than 1100 rather than truncated
/// to exactly the limit.
pub const BUF: usize = portkeep_proto::MAX_MESSAGE_LEN + 4;

/// Buffers for one received batch.
pub struct RecvBatch {
    bufs: Vec<[u8; BUF]>,
    addrs: Vec<libc::sockaddr_storage>,
    lens: Vec<usize>,
    addr_lens: Vec<libc::socklen_t>,
    count: usize,
}

impl std::fmt::Debug for RecvBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecvBatch")
            .field("count", &self.count)
            .finish()
    }
}

impl Default for RecvBatch {
    fn default() -> Self {
        RecvBatch {
            bufs: vec![[0u8; BUF]; BATCH],
            // SAFETY: sockaddr_storage is plain old data; all-zero is valid.
            addrs: vec![unsafe { zeroed() }; BATCH],
            lens: vec![0; BATCH],
            addr_lens: vec![0; BATCH],
            count: 0,
        }
    }
}

impl RecvBatch {
    /// The datagrams of the last receive, with their sources.
    pub fn iter(&self) -> impl Iterator<Item = (SocketAddr, &[u8])> + '_ {
        (0..self.count).filter_map(move |i| {
            let len = self.addr_lens[i];
            // SAFETY: the kernel wrote a socket address of `len` bytes into
            // this sockaddr_storage, which is large enough for any family.
            let addr = unsafe { SockAddr::new(self.addrs[i], len) };
            Some((addr.as_socket()?, &self.bufs[i][..self.lens[i]]))
        })
    }
}

/// Receives at least one and up to [`BATCH`] datagrams. Returns 0 when the
/// socket's read timeout expires with nothing received.
pub fn recv_batch(sock: &UdpSocket, batch: &mut RecvBatch) -> io::Result<usize> {
    batch.count = 0;
    let mut iovecs: Vec<libc::iovec> = batch
        .bufs
        .iter_mut()
        .map(|b| libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: BUF,
        })
        .collect();
    // SAFETY: mmsghdr is plain old data; all-zero is a valid empty header.
    let mut msgs: Vec<libc::mmsghdr> = vec![unsafe { zeroed() }; BATCH];
    for (i, m) in msgs.iter_mut().enumerate() {
        m.msg_hdr.msg_name = (&mut batch.addrs[i] as *mut libc::sockaddr_storage).cast();
        m.msg_hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        m.msg_hdr.msg_iov = &mut iovecs[i];
        m.msg_hdr.msg_iovlen = 1;
    }
    // SAFETY: every pointer in `msgs` points into buffers borrowed mutably
    // for the duration of this call; lengths match those buffers.
    let n = unsafe {
        libc::recvmmsg(
            sock.as_raw_fd(),
            msgs.as_mut_ptr(),
            BATCH as libc::c_uint,
            libc::MSG_WAITFORONE,
            std::ptr::null_mut(),
        )
    };
    if n < 0 {
        let e = io::Error::last_os_error();
        return match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted => {
                Ok(0)
            }
            _ => Err(e),
        };
    }
    let n = n as usize;
    for (i, m) in msgs.iter().take(n).enumerate() {
        batch.lens[i] = m.msg_len as usize;
        batch.addr_lens[i] = m.msg_hdr.msg_namelen;
    }
    batch.count = n;
    Ok(n)
}

/// Replies queued for one batched send.
#[derive(Debug, Default)]
pub struct SendBatch {
    data: Vec<u8>,
    items: Vec<(SockAddr, usize, usize)>,
}

impl SendBatch {
    /// Queues `bytes` for `dest`.
    pub fn push(&mut self, dest: SocketAddr, bytes: &[u8]) {
        let start = self.data.len();
        self.data.extend_from_slice(bytes);
        self.items.push((SockAddr::from(dest), start, bytes.len()));
    }

    /// A batch with every datagram passed through `f` (same destinations,
    /// same order): for replies whose content changed after they were
    /// built. A datagram for which `f` returns `None` is left out.
    pub fn rewrite(&self, mut f: impl FnMut(&[u8]) -> Option<Vec<u8>>) -> SendBatch {
        let mut out = SendBatch::default();
        for (dest, start, len) in &self.items {
            let Some(bytes) = f(&self.data[*start..*start + *len]) else {
                continue;
            };
            let s = out.data.len();
            out.data.extend_from_slice(&bytes);
            out.items.push((dest.clone(), s, bytes.len()));
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
            let mut iovecs: Vec<libc::iovec> = chunk
                .iter()
                .map(|(_, start, len)| libc::iovec {
                    iov_base: self.data[*start..].as_ptr() as *mut libc::c_void,
                    iov_len: *len,
                })
                .collect();
            // SAFETY: plain old data, all-zero is valid.
            let mut msgs: Vec<libc::mmsghdr> = vec![unsafe { zeroed() }; chunk.len()];
            for (i, m) in msgs.iter_mut().enumerate() {
                m.msg_hdr.msg_name = chunk[i].0.as_ptr() as *mut libc::c_void;
                m.msg_hdr.msg_namelen = chunk[i].0.len();
                m.msg_hdr.msg_iov = &mut iovecs[i];
                m.msg_hdr.msg_iovlen = 1;
            }
            // SAFETY: pointers reference `self.data`, `iovecs` and the
            // SockAddrs in `self.items`, all alive and unmoved during the
            // call; the kernel only reads them.
            let n = unsafe {
                libc::sendmmsg(
                    sock.as_raw_fd(),
                    msgs.as_mut_ptr(),
                    msgs.len() as libc::c_uint,
                    0,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::Interrupted => continue,
                    io::ErrorKind::WouldBlock => {
                        // Socket buffer full: let it drain a moment.
                        std::thread::yield_now();
                        continue;
                    }
                    _ => {
                        tracing::debug!(error = %e, "send failed; skipping one reply");
                        sent += 1;
                        continue;
                    }
                }
            }
            sent += (n as usize).max(1);
        }
        self.items.clear();
        self.data.clear();
        Ok(())
    }
}
