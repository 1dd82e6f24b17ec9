//! Listeners and connection lifetime.
//!
//! One tokio task per connection runs the handshake; the transmission loop
//! then runs on a thread of the connection's own (`transmission.rs`).
//! After STARTTLS the task runs the TLS handshake (tokio-rustls) and goes
//! on haggling over TLS; the transmission thread then gets the socket with
//! its rustls session (`Socket::with_tls`).
//! Shutdown is a watch channel for the tasks and a `Stop` for the threads:
//! listeners stop accepting, connections stop reading, finish what is in
//! flight and close; the server then flushes every export once.

use std::io;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{mpsc, watch};

use crate::buffers::InBuf;
use crate::export::Exports;
use crate::handshake::{Haggled, HandshakeError, Session, greet, haggle};
use crate::limits::{ConnectionCount, ConnectionSlot, Limits};
use crate::socket::{Socket, Stop};
use crate::tls::TlsPolicy;
use crate::transmission::transmit;

/// A running server: share it between listeners with `Arc`.
#[derive(Debug)]
pub struct Server {
    exports: Exports,
    tls: TlsPolicy,
    limits: Limits,
    connections: ConnectionCount,
    shutdown_tx: watch::Sender<bool>,
    /// The same signal for connection threads.
    stop: Arc<Stop>,
    /// Each connection holds a clone; `wait_idle` waits for all to drop.
    alive_tx: std::sync::Mutex<Option<mpsc::Sender<()>>>,
    alive_rx: tokio::sync::Mutex<mpsc::Receiver<()>>,
}

impl Server {
    /// A server without TLS (STARTTLS is refused).
    pub fn new(exports: Exports) -> io::Result<Arc<Server>> {
        Server::with_tls(exports, TlsPolicy::off())
    }

    pub fn with_tls(exports: Exports, tls: TlsPolicy) -> io::Result<Arc<Server>> {
        Server::with_limits(exports, tls, Limits::default())
    }

    pub fn with_limits(
        exports: Exports,
        tls: TlsPolicy,
        limits: Limits,
    ) -> io::Result<Arc<Server>> {
        let (shutdown_tx, _) = watch::channel(false);
        let (alive_tx, alive_rx) = mpsc::channel(1);
        Ok(Arc::new(Server {
            exports,
            tls,
            limits,
            connections: ConnectionCount::default(),
            shutdown_tx,
            stop: Arc::new(Stop::new()?),
            alive_tx: std::sync::Mutex::new(Some(alive_tx)),
            alive_rx: tokio::sync::Mutex::new(alive_rx),
        }))
    }

    pub fn exports(&self) -> &Exports {
        &self.exports
    }

    /// Connections open now (in the handshake or transmitting).
    pub fn connections(&self) -> usize {
        self.connections.open()
    }

    /// Accepts unix-socket connections until shutdown.
    pub async fn serve_unix(self: Arc<Self>, listener: UnixListener) {
        let mut shutdown = self.shutdown_tx.subscribe();
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        enlarge_send_buffer(&stream);
                        self.spawn_connection(stream, "unix".to_string());
                    }
                    Err(e) => accept_error(e).await,
                },
            }
        }
    }

    /// Accepts TCP connections until shutdown.
    pub async fn serve_tcp(self: Arc<Self>, listener: TcpListener) {
        let mut shutdown = self.shutdown_tx.subscribe();
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        // Replies are written in batches already; Nagle would only delay them.
                        let _ = stream.set_nodelay(true);
                        enlarge_send_buffer(&stream);
                        self.spawn_connection(stream, peer.to_string());
                    }
                    Err(e) => accept_error(e).await,
                },
            }
        }
    }

    fn spawn_connection<S: Stream>(self: &Arc<Self>, stream: S, peer: String) {
        let Some(alive) = self.alive_tx.lock().expect("alive lock").clone() else {
            return; // shutting down
        };
        let Some(slot) = self.connections.take(self.limits.connections_max) else {
            // Closed at once: the client sees the end of the stream before
            // any greeting. A handshake to tell it why would itself be
            // something a flood of connections could hold.
            let (refused, log) = self.connections.refused();
            if log {
                tracing::warn!(
                    peer,
                    limit = self.limits.connections_max,
                    refused,
                    "connection refused: too many connections (--max-connections)"
                );
            }
            return;
        };
        let server = Arc::clone(self);
        tokio::spawn(async move { server.connection(stream, peer, (alive, slot)).await });
    }

    /// `alive` (with the connection's slot) is held until the connection
    /// ends: by this task through the handshake, then by its thread.
    async fn connection<S: Stream>(
        &self,
        stream: S,
        peer: String,
        alive: (mpsc::Sender<()>, ConnectionSlot),
    ) {
        let mut shutdown = self.shutdown_tx.subscribe();
        if *shutdown.borrow() {
            return;
        }
        let negotiated = tokio::select! {
            _ = shutdown.changed() => return,
            result = self.negotiate(stream) => result,
            _ = tokio::time::sleep(self.limits.handshake_timeout) => {
                tracing::info!(peer, "handshake timed out (--handshake-timeout)");
                return;
            }
        };
        let (socket, input, session) = match negotiated {
            Ok(Some(negotiated)) => negotiated,
            Ok(None) => return,
            Err(e) => {
                tracing::info!(peer, error = %e, "handshake ended");
                return;
            }
        };
        tracing::debug!(peer, export = %session.export.name, mode = ?session.mode, "transmission");
        let stop = Arc::clone(&self.stop);
        let runtime = tokio::runtime::Handle::current();
        let limits = self.limits.clone();
        let spawned = std::thread::Builder::new()
            .name("nbd-conn".to_string())
            .spawn(move || {
                let _alive = alive;
                if let Err(e) = transmit(socket, input, session, &limits, stop, runtime) {
                    tracing::info!(peer, error = %e, "connection ended");
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start a connection thread");
        }
    }

    /// The handshake over `stream`, and after STARTTLS over TLS. Returns
    /// the socket the transmission phase serves on, with the bytes already
    /// read from it.
    async fn negotiate<S: Stream>(
        &self,
        mut stream: S,
    ) -> Result<Option<(Socket, InBuf, Session)>, HandshakeError> {
        let mut input = InBuf::default();
        let mode = self.tls.mode();
        let (mut reader, mut writer) = tokio::io::split(&mut stream);
        let Some(mut state) = greet(&mut reader, &mut writer, &mut input).await? else {
            return Ok(None);
        };
        let haggled = haggle(
            &mut reader,
            &mut writer,
            &mut input,
            &self.exports,
            mode,
            &mut state,
        );
        match haggled.await? {
            Haggled::Left => Ok(None),
            Haggled::Transmit(session) => {
                let socket = Socket::new(stream.into_fd()?)?;
                Ok(Some((socket, input, session)))
            }
            Haggled::StartTls => {
                // A client must wait for the ACK before its TLS hello, so
                // anything already read came from someone else: treating it
                // as encrypted input would let an attacker inject options.
                if !input.is_empty() {
                    return Err(HandshakeError::BytesBeforeTls {
                        length_bytes: input.len(),
                    });
                }
                let config = self
                    .tls
                    .config()
                    .expect("STARTTLS is acknowledged only with a TLS configuration");
                let acceptor = tokio_rustls::TlsAcceptor::from(Arc::clone(config));
                let mut tls = acceptor.accept(stream).await.map_err(HandshakeError::Tls)?;
                let (mut reader, mut writer) = tokio::io::split(&mut tls);
                let haggled = haggle(
                    &mut reader,
                    &mut writer,
                    &mut input,
                    &self.exports,
                    mode,
                    &mut state,
                );
                match haggled.await? {
                    Haggled::Left => Ok(None),
                    Haggled::Transmit(session) => {
                        let (stream, connection) = tls.into_inner();
                        let socket = Socket::with_tls(stream.into_fd()?, connection)?;
                        Ok(Some((socket, input, session)))
                    }
                    Haggled::StartTls => unreachable!("a second STARTTLS is refused"),
                }
            }
        }
    }

    /// Stops accepting and asks every connection to finish.
    pub fn shutdown(&self) {
        self.shutdown_tx.send_replace(true);
        self.stop.set();
        self.alive_tx.lock().expect("alive lock").take();
    }

    /// After `shutdown`: waits until every connection has finished, then
    /// flushes every writable export.
    pub async fn wait_idle(&self) -> io::Result<()> {
        let mut alive = self.alive_rx.lock().await;
        while alive.recv().await.is_some() {}
        for export in self.exports.list().iter() {
            if !export.backend.is_read_only() {
                let backend = Arc::clone(&export.backend);
                tokio::task::spawn_blocking(move || backend.flush())
                    .await
                    .map_err(io::Error::other)??;
            }
        }
        Ok(())
    }
}

/// A tokio stream whose socket the transmission thread takes over.
trait Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    fn into_fd(self) -> io::Result<OwnedFd>;
}

impl Stream for UnixStream {
    fn into_fd(self) -> io::Result<OwnedFd> {
        Ok(self.into_std()?.into())
    }
}

impl Stream for TcpStream {
    fn into_fd(self) -> io::Result<OwnedFd> {
        Ok(self.into_std()?.into())
    }
}

/// Socket send buffer asked for (the kernel caps it at net.core.wmem_max).
/// The default (about 200 KiB) makes a 1 MiB READ reply take several
/// wake-ups of the writer; a few MiB lets whole replies go in one write.
const SEND_BUFFER_BYTES: libc::c_int = 4 * 1024 * 1024;

fn enlarge_send_buffer(socket: &impl std::os::fd::AsRawFd) {
    // SAFETY: setsockopt on a socket we own, with a pointer to a live c_int
    // and its exact size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&SEND_BUFFER_BYTES as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        tracing::debug!(error = %io::Error::last_os_error(), "cannot enlarge the socket send buffer");
    }
}

async fn accept_error(error: io::Error) {
    // EMFILE and friends: back off rather than spin.
    tracing::warn!(%error, "accept failed");
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
}
