//! Address and route change notifications (failure-scenarios draft
//! section 2.4; section 2.1 for a default gateway that changes).
//!
//! A `NETLINK_ROUTE` socket subscribed to the IPv4 and IPv6 address and
//! route groups. Messages are not parsed: any of them is a reason to ask
//! the kernel again which source address (and gateway) it uses towards
//! the server, which is the one question that matters and is cheap. When
//! the socket cannot be opened (not Linux, or a sandbox without netlink)
//! the agent falls back to its slow poll, and says so once.

/// Waits for address and route changes of the host.
pub(crate) struct AddressWatch {
    #[cfg(target_os = "linux")]
    sock: Option<netlink_sys::TokioSocket>,
    #[cfg(target_os = "linux")]
    buf: Vec<u8>,
}

impl std::fmt::Debug for AddressWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AddressWatch")
            .field("active", &self.is_active())
            .finish()
    }
}

#[cfg(target_os = "linux")]
impl AddressWatch {
    /// Opens the subscription; on failure, logs once that `fallback` is
    /// the polling interval from now on.
    pub(crate) fn open(fallback: std::time::Duration) -> AddressWatch {
        let sock = match subscribe() {
            Ok(s) => Some(s),
            Err(e) => {
                eprintln!(
                    "portkeep agent: cannot subscribe to netlink address and route changes ({e}); \
                     re-checking the source address only every {} s",
                    fallback.as_secs()
                );
                None
            }
        };
        AddressWatch {
            sock,
            buf: Vec::with_capacity(8192),
        }
    }

    /// Whether notifications arrive (else only the poll notices changes).
    pub(crate) fn is_active(&self) -> bool {
        self.sock.is_some()
    }

    /// Returns when addresses or routes changed, once per burst of
    /// notifications queued together; never returns without the socket.
    /// Cancel-safe: nothing is read before the socket is readable.
    pub(crate) async fn changed(&mut self) {
        use netlink_sys::{AsyncSocket, AsyncSocketExt};
        let Some(sock) = self.sock.as_ref() else {
            return std::future::pending().await;
        };
        self.buf.clear();
        match sock.recv(&mut self.buf).await {
            Ok(()) => {}
            // The kernel dropped notifications because we were slow: a
            // re-check covers whatever they said.
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {}
            Err(e) => {
                eprintln!(
                    "portkeep agent: netlink socket failed ({e}); falling back to polling the source address"
                );
                self.sock = None;
                return std::future::pending().await;
            }
        }
        // Drain what else is queued (an `ip` command often sends several):
        // one re-check answers them all. A datagram longer than the buffer
        // is cut, which is fine since it is not read.
        loop {
            self.buf.clear();
            match sock.socket_ref().recv(&mut self.buf, libc::MSG_DONTWAIT) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {}
                Err(_) => break,
            }
        }
    }
}

/// A non-blocking route socket bound to the address and route groups.
#[cfg(target_os = "linux")]
fn subscribe() -> std::io::Result<netlink_sys::TokioSocket> {
    use netlink_sys::{protocols::NETLINK_ROUTE, AsyncSocket, SocketAddr, TokioSocket};
    let groups = libc::RTMGRP_IPV4_IFADDR
        | libc::RTMGRP_IPV6_IFADDR
        | libc::RTMGRP_IPV4_ROUTE
        | libc::RTMGRP_IPV6_ROUTE;
    let groups = u32::try_from(groups).map_err(std::io::Error::other)?;
    let mut sock = TokioSocket::new(NETLINK_ROUTE)?;
    sock.socket_mut().bind(&SocketAddr::new(0, groups))?;
    Ok(sock)
}

#[cfg(not(target_os = "linux"))]
impl AddressWatch {
    /// No netlink: logs once that `fallback` is the polling interval.
    pub(crate) fn open(fallback: std::time::Duration) -> AddressWatch {
        eprintln!(
            "portkeep agent: no address change notifications on this system; \
             re-checking the source address every {} s",
            fallback.as_secs()
        );
        AddressWatch {}
    }

    pub(crate) fn is_active(&self) -> bool {
        false
    }

    pub(crate) async fn changed(&mut self) {
        std::future::pending().await
    }
}
