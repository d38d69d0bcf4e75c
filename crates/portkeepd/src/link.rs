//! The replication link's I/O: one thread runs a small tokio runtime that
//! connects to the peer while this node is active and accepts the active's
//! connection while it is the backup, and moves bytes between the TLS
//! stream and the node's sans-IO state machine ([`portkeep_ha::Node`]).
//! It decides nothing: what to send, when a reply may leave and what a
//! higher term means are the node's; their effects are carried out by
//! [`crate::node::act`].
//!
//! Both ends authenticate each other with TLS certificates from the pair's
//! own CA, unless the configuration asks for plaintext (a dedicated cable).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use portkeep_ha::Role;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::ha_config::LinkSettings;
use crate::node::{act, Shared};
use crate::pair::Reply;

/// Runs `f` on the locked node, then carries out what it asked for once
/// the lock is released.
fn drive<T>(shared: &Arc<Shared>, f: impl FnOnce(&mut portkeep_ha::Node<Reply>) -> T) -> T {
    let (r, effects) = {
        let mut node = shared.pair.node();
        let r = f(&mut node);
        (r, node.effects())
    };
    act(shared, effects);
    r
}

/// The link thread.
pub(crate) fn run(shared: Arc<Shared>, link: LinkSettings, listener: std::net::TcpListener) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("replication link cannot start: {e}");
            return;
        }
    };
    rt.block_on(async move {
        let listener = match TcpListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!("replication link cannot listen: {e}");
                return;
            }
        };
        let stop = {
            let shared = shared.clone();
            async move {
                while !shared.stop.load(Ordering::Relaxed) {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        };
        tokio::select! {
            _ = accept_loop(shared.clone(), link.clone(), listener) => {}
            _ = active_loop(shared.clone(), link.clone()) => {}
            _ = node_timer(shared.clone()) => {}
            _ = stop => {}
        }
    });
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// How long an incoming link connection has to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Incoming link connections that may be in their TLS handshake at once;
/// more are closed at once. Anyone who can reach the link port can open
/// connections, and each unfinished handshake holds memory and a task
/// until it times out: the cap bounds that, and the pair's own peer, which
/// handshakes in milliseconds, still finds a slot.
const MAX_HANDSHAKES: usize = 16;

async fn accept_loop(shared: Arc<Shared>, link: LinkSettings, listener: TcpListener) {
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    loop {
        let (tcp, from) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!("replication link: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let shared = shared.clone();
        let link = link.clone();
        let permit = match link.tls {
            None => None,
            Some(_) => match handshakes.clone().try_acquire_owned() {
                Ok(p) => Some(p),
                Err(_) => {
                    shared.pair.refused(
                        from,
                        &format!("{MAX_HANDSHAKES} TLS handshakes already in progress"),
                    );
                    continue;
                }
            },
        };
        tokio::spawn(async move {
            let stream: Box<dyn Stream> = match &link.tls {
                None => Box::new(tcp),
                Some(tls) => {
                    let acceptor = tokio_rustls::TlsAcceptor::from(tls.server.clone());
                    let done = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await;
                    drop(permit);
                    match done {
                        // The chain alone is not enough: any certificate of the
                        // pair's CA would pass; the active's name must match too.
                        Ok(Ok(s)) => match tls.check_peer(s.get_ref().1) {
                            Ok(()) => Box::new(s),
                            Err(why) => return shared.pair.refused(from, &why),
                        },
                        Ok(Err(e)) => return shared.pair.refused(from, &e.to_string()),
                        Err(_) => return shared.pair.refused(from, "TLS handshake timed out"),
                    }
                }
            };
            let role = shared.pair.role();
            match role {
                Role::Backup => {
                    if let Err(e) = serve_backup(&shared, &link, stream).await {
                        tracing::info!(%from, "replication link from the active ended: {e}");
                    }
                }
                _ => {
                    // A node that believes it is active connected to us
                    // while we are active: tell it our term so the older
                    // one stands down (fencing), and take nothing from it.
                    tell_term(&shared, stream).await;
                }
            }
        });
    }
}

async fn tell_term(shared: &Shared, mut stream: Box<dyn Stream>) {
    let mut out = Vec::new();
    let term = shared.pair.node().term();
    portkeep_ha::Message::Hello {
        term,
        active: true,
        applied: 0,
        now: shared.clock.now(),
        version: portkeep_ha::wire::LINK_VERSION,
        holds: portkeep_ha::Position::default(),
    }
    .encode(&mut out);
    let _ = stream.write_all(&out).await;
    let _ = stream.flush().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _ = stream.shutdown().await;
}

async fn serve_backup(
    shared: &Arc<Shared>,
    link: &LinkSettings,
    mut stream: Box<dyn Stream>,
) -> anyhow::Result<()> {
    let gen = shared.pair.conn_gen.fetch_add(1, Ordering::SeqCst) + 1;
    let current = |shared: &Shared| {
        shared.pair.conn_gen.load(Ordering::SeqCst) == gen && shared.pair.role() == Role::Backup
    };
    shared.pair.node().link_connected(shared.clock.now());
    tracing::info!("replication link from the active is up");
    let mut buf = vec![0u8; 64 * 1024];
    let result: anyhow::Result<()> = async {
        let mut silent_at = crate::clock::Deadline::after(link.timing.dead_after);
        loop {
            if !current(shared) {
                anyhow::bail!("superseded");
            }
            let out = shared.pair.node().poll_transmit();
            if let Some(bytes) = out {
                stream.write_all(&bytes).await?;
                stream.flush().await?;
            }
            // Acknowledgements are made by the replica's writer thread
            // once its writes are durable: it wakes this loop to send them
            // at once, not when the active next speaks. (`read` is
            // cancel-safe: nothing is lost when the wake wins.)
            let n = tokio::select! {
                r = tokio::time::timeout(silent_at.left(), stream.read(&mut buf)) => match r {
                    Ok(r) => r?,
                    Err(_) => anyhow::bail!("the active went silent"),
                },
                () = shared.pair.wake.notified() => continue,
            };
            silent_at = crate::clock::Deadline::after(link.timing.dead_after);
            if n == 0 {
                anyhow::bail!("closed by the active");
            }
            if !current(shared) {
                anyhow::bail!("superseded");
            }
            let now = shared.clock.now();
            let r = drive(shared, |node| node.handle_link_input(now, &buf[..n]));
            r?;
        }
    }
    .await;
    if shared.pair.conn_gen.load(Ordering::SeqCst) == gen {
        let now = shared.clock.now();
        drive(shared, |node| node.link_lost(now));
    }
    result
}

/// How long to sleep before the node's next timer: at most 50 ms, so a
/// timer armed meanwhile (by another thread's input) waits no longer.
fn until_next_timer(shared: &Shared) -> Duration {
    let next = shared.pair.node().poll_timeout();
    let now = shared.clock.now();
    next.map_or(Duration::from_millis(50), |t| {
        if t > now {
            (t - now).min(Duration::from_millis(50))
        } else {
            Duration::ZERO
        }
    })
}

/// The node's timers, connected or not: a lease that ends while no
/// connection is up still releases what waited for it.
async fn node_timer(shared: Arc<Shared>) {
    loop {
        let wait = until_next_timer(&shared);
        // Never spin: a deadline already passed is handled below, and the
        // next one is at least a millisecond away.
        tokio::time::sleep(wait.max(Duration::from_millis(1))).await;
        let now = shared.clock.now();
        drive(&shared, |node| node.handle_timeout(now));
        shared.pair.wake.notify_one();
    }
}

async fn active_loop(shared: Arc<Shared>, link: LinkSettings) {
    loop {
        if shared.pair.role() != Role::Active {
            let seen = shared.pair.role_gen();
            while shared.pair.role() != Role::Active && shared.pair.role_gen() == seen {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            continue;
        }
        let gen = shared.pair.role_gen();
        let r = connect_and_stream(&shared, &link, gen).await;
        if shared.pair.role_gen() == gen {
            let now = shared.clock.now();
            drive(&shared, |node| node.link_lost(now));
        }
        if let Err(e) = r {
            tracing::debug!("replication link to the backup: {e}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Writes whatever the node has to send, sleeping until woken when it has
/// nothing; returns only on a write error.
async fn write_loop(
    shared: &Shared,
    wr: &mut tokio::io::WriteHalf<Box<dyn Stream>>,
) -> anyhow::Result<()> {
    loop {
        let out = shared.pair.node().poll_transmit();
        match out {
            Some(bytes) => {
                wr.write_all(&bytes).await?;
                wr.flush().await?;
            }
            None => shared.pair.wake.notified().await,
        }
    }
}

async fn connect_and_stream(
    shared: &Arc<Shared>,
    link: &LinkSettings,
    gen: u64,
) -> anyhow::Result<()> {
    let tcp = tokio::time::timeout(link.timing.dead_after, TcpStream::connect(link.peer))
        .await
        .context("connect timed out")??;
    tcp.set_nodelay(true)?;
    let stream: Box<dyn Stream> = match &link.tls {
        None => Box::new(tcp),
        Some(tls) => {
            let connector = tokio_rustls::TlsConnector::from(tls.client.clone());
            let s = tokio::time::timeout(
                Duration::from_secs(5),
                connector.connect(tls.peer_name.clone(), tcp),
            )
            .await
            .context("TLS handshake timed out")?
            .inspect_err(|e| shared.pair.refused(link.peer, &e.to_string()))?;
            Box::new(s)
        }
    };
    shared.pair.node().link_connected(shared.clock.now());
    tracing::info!(peer = %link.peer, "replication link to the backup is up");
    let (mut rd, mut wr) = tokio::io::split(stream);
    let writer = write_loop(shared, &mut wr);
    let reader = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = rd.read(&mut buf).await?;
            if n == 0 {
                anyhow::bail!("closed by the backup");
            }
            let now = shared.clock.now();
            let r = drive(shared, |node| node.handle_link_input(now, &buf[..n]));
            r?;
            shared.pair.wake.notify_one();
            if shared.pair.role_gen() != gen {
                // A handover is written before the connection closes: the
                // writer runs alongside while this waits (briefly: the
                // backup that does not get it stays a backup, and nobody
                // serves the older state either way).
                if shared.pair.node().parting() {
                    for _ in 0..40 {
                        shared.pair.wake.notify_one();
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        if !shared.pair.node().parting() {
                            break;
                        }
                    }
                    // Taken by the writer: let its write finish.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                anyhow::bail!("role changed");
            }
        }
    };
    let timer = async {
        loop {
            let wait = until_next_timer(shared);
            tokio::time::sleep(wait).await;
            let now = shared.clock.now();
            let dead = drive(shared, |node| {
                node.handle_timeout(now);
                node.link_down()
            });
            shared.pair.wake.notify_one();
            if dead {
                anyhow::bail!("the backup went silent");
            }
            if shared.pair.role_gen() != gen {
                anyhow::bail!("role changed");
            }
        }
    };
    tokio::select! {
        r = writer => r,
        r = reader => r,
        r = timer => r,
    }
}
