//! QUIC endpoints and peers: one message per unidirectional stream, read to its end under a size
//! limit, so a peer can neither send a frame larger than the limit nor hold more streams open
//! than the transport allows.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};

use crate::identity::{Identity, PublicKey};
use crate::tls::{self, AllowList};
use crate::NetError;

/// Limits and settings of a node's QUIC transport; every limit has a unit in its name.
#[derive(Clone, Debug, PartialEq)]
pub struct Limits {
    /// Largest message a peer may send (a stream longer than this is refused and reset).
    pub message_bytes_max: usize,
    /// Unidirectional streams a peer may have open at once.
    pub streams_per_peer_max: u32,
    /// A connection with no traffic (keep-alives included) for this long is closed.
    pub idle_timeout_ms: u64,
    /// Keep-alive interval (a peer that vanishes is noticed after `idle_timeout_ms`).
    pub keep_alive_ms: u64,
    /// BBR instead of Cubic: over a lossy WAN Cubic collapses (facts.md: 100 Mbit/s, 50 ms, 1%
    /// loss: Cubic 6-11 Mbit/s, BBR 88.6).
    pub bbr: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            message_bytes_max: 1 << 30,
            streams_per_peer_max: 8,
            idle_timeout_ms: 30_000,
            keep_alive_ms: 5_000,
            bbr: true,
        }
    }
}

impl Limits {
    fn transport(&self) -> Result<Arc<quinn::TransportConfig>, NetError> {
        let mut transport = quinn::TransportConfig::default();
        transport
            .max_concurrent_uni_streams(self.streams_per_peer_max.into())
            .max_concurrent_bidi_streams(0u32.into())
            .keep_alive_interval(Some(Duration::from_millis(self.keep_alive_ms)))
            .max_idle_timeout(Some(
                Duration::from_millis(self.idle_timeout_ms)
                    .try_into()
                    .map_err(|_| NetError::Config("idle_timeout_ms is too large".into()))?,
            ));
        if self.bbr {
            transport
                .congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()));
        }
        Ok(Arc::new(transport))
    }
}

/// A QUIC endpoint with this node's identity.
pub struct Node {
    endpoint: quinn::Endpoint,
    identity: Arc<Identity>,
    limits: Limits,
}

impl Node {
    /// A node that accepts connections from the keys on `allowed` (a coordinator).
    pub fn listen(
        identity: Arc<Identity>,
        bind: SocketAddr,
        allowed: AllowList,
        limits: Limits,
    ) -> Result<Node, NetError> {
        let crypto = QuicServerConfig::try_from(tls::server_config(&identity, allowed)?)
            .map_err(|e| NetError::Tls(e.to_string()))?;
        let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        config.transport_config(limits.transport()?);
        let endpoint = quinn::Endpoint::server(config, bind).map_err(|e| NetError::Bind {
            address: bind,
            source: e,
        })?;
        Ok(Node {
            endpoint,
            identity,
            limits,
        })
    }

    /// A node that only connects out (a site).
    pub fn client(
        identity: Arc<Identity>,
        bind: SocketAddr,
        limits: Limits,
    ) -> Result<Node, NetError> {
        let endpoint = quinn::Endpoint::client(bind).map_err(|e| NetError::Bind {
            address: bind,
            source: e,
        })?;
        Ok(Node {
            endpoint,
            identity,
            limits,
        })
    }

    pub fn local_addr(&self) -> Result<SocketAddr, NetError> {
        self.endpoint.local_addr().map_err(|e| NetError::Io {
            path: "socket".into(),
            source: e,
        })
    }

    /// Connect to the node at `address`, which must prove it holds `server`'s key.
    pub async fn connect(&self, address: SocketAddr, server: PublicKey) -> Result<Peer, NetError> {
        let crypto = QuicClientConfig::try_from(tls::client_config(&self.identity, server)?)
            .map_err(|e| NetError::Tls(e.to_string()))?;
        let mut config = quinn::ClientConfig::new(Arc::new(crypto));
        config.transport_config(self.limits.transport()?);
        let connecting = self
            .endpoint
            .connect_with(config, address, "lowband")
            .map_err(|e| NetError::Connect(e.to_string()))?;
        let connection = connecting.await.map_err(|e| {
            if is_tls_refusal(&e) {
                NetError::Handshake(e.to_string())
            } else {
                NetError::Connect(e.to_string())
            }
        })?;
        Ok(Peer {
            connection,
            key: server,
            message_bytes_max: self.limits.message_bytes_max,
        })
    }

    /// The next peer that connected and proved an allowed key; None when the node is closed.
    /// A handshake that fails (unknown key, garbage, wrong protocol) is skipped, and returned
    /// as an error so the caller can log it.
    pub async fn accept(&self) -> Option<Result<Peer, NetError>> {
        let incoming = self.endpoint.accept().await?;
        Some(
            async {
                let connection = incoming
                    .await
                    .map_err(|e| NetError::Handshake(e.to_string()))?;
                let key = peer_key(&connection).ok_or_else(|| {
                    NetError::Handshake("the peer presented no ed25519 key".into())
                })?;
                Ok(Peer {
                    connection,
                    key,
                    message_bytes_max: self.limits.message_bytes_max,
                })
            }
            .await,
        )
    }

    /// Close every connection and stop accepting (peers see `NetError::Ended` with code 0).
    pub fn close(&self) {
        self.endpoint.close(0u32.into(), b"bye");
    }

    /// Close every connection saying why (peers see `NetError::Ended { code, reason }`).
    pub fn close_with(&self, code: u32, reason: &str) {
        self.endpoint.close(code.into(), reason.as_bytes());
    }

    /// Wait (at most `limit`) until every connection has finished closing, so that the peers
    /// have been told before the process exits.
    pub async fn wait_closed(&self, limit: std::time::Duration) {
        let _ = tokio::time::timeout(limit, self.endpoint.wait_idle()).await;
    }
}

/// Whether a connection ended in the TLS handshake (a QUIC CRYPTO_ERROR, 0x100-0x1ff, sent by
/// the peer or raised here): a key that is not on the other side's list, or a peer that is not
/// the node expected. Retrying cannot help.
fn is_tls_refusal(e: &quinn::ConnectionError) -> bool {
    let code = match e {
        quinn::ConnectionError::ConnectionClosed(close) => u64::from(close.error_code),
        quinn::ConnectionError::TransportError(error) => u64::from(error.code),
        _ => return false,
    };
    (0x100..=0x1ff).contains(&code)
}

/// A lost connection as our error: a deliberate close by the peer keeps its code and reason; a
/// refusal in the TLS handshake is `Handshake`.
fn lost(e: quinn::ConnectionError) -> NetError {
    if is_tls_refusal(&e) {
        return NetError::Handshake(format!(
            "the peer refused this node's key in the TLS handshake ({e})"
        ));
    }
    match e {
        quinn::ConnectionError::ApplicationClosed(close) => NetError::Ended {
            code: close.error_code.into_inner(),
            reason: String::from_utf8_lossy(&close.reason).into_owned(),
        },
        other => NetError::Closed(other.to_string()),
    }
}

/// The key a connected peer proved.
fn peer_key(connection: &quinn::Connection) -> Option<PublicKey> {
    let certificates = connection
        .peer_identity()?
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .ok()?;
    tls::certificate_key(certificates.first()?)
}

/// A connection to an authenticated peer.
#[derive(Clone)]
pub struct Peer {
    connection: quinn::Connection,
    key: PublicKey,
    message_bytes_max: usize,
}

impl Peer {
    /// Who the peer is (its key, proved in the handshake).
    pub fn key(&self) -> PublicKey {
        self.key
    }

    pub fn remote_address(&self) -> SocketAddr {
        self.connection.remote_address()
    }

    /// Send one message (one stream, finished).
    pub async fn send(&self, message: &[u8]) -> Result<(), NetError> {
        self.send_bytes(bytes::Bytes::copy_from_slice(message))
            .await
    }

    /// Send one message without copying it: a message sent to many peers (a broadcast) stays one
    /// buffer, which QUIC keeps until every peer has acknowledged it.
    pub async fn send_bytes(&self, message: bytes::Bytes) -> Result<(), NetError> {
        if message.len() > self.message_bytes_max {
            return Err(NetError::TooLarge {
                bytes: message.len(),
                limit: self.message_bytes_max,
            });
        }
        let mut stream = self.connection.open_uni().await.map_err(lost)?;
        stream.write_chunk(message).await.map_err(|e| match e {
            quinn::WriteError::Stopped(code) => NetError::Refused(code.into_inner()),
            quinn::WriteError::ConnectionLost(e) => lost(e),
            other => NetError::Closed(other.to_string()),
        })?;
        stream
            .finish()
            .map_err(|e| NetError::Closed(e.to_string()))?;
        // Wait until the peer has read it all, or refused it (stopped the stream).
        match stream.stopped().await {
            Ok(None) => Ok(()),
            Ok(Some(code)) => Err(NetError::Refused(code.into_inner())),
            Err(quinn::StoppedError::ConnectionLost(e)) => Err(lost(e)),
            Err(e) => Err(NetError::Closed(e.to_string())),
        }
    }

    /// The next message. A message over the size limit is refused (its stream is stopped) and
    /// reported as `TooLarge`; the connection stays up.
    pub async fn recv(&self) -> Result<Vec<u8>, NetError> {
        self.recv_timed().await.map(|(bytes, _)| bytes)
    }

    /// `recv`, and how long the message took to arrive from its first byte to its last (its
    /// transfer time, without the latency before it).
    pub async fn recv_timed(&self) -> Result<(Vec<u8>, std::time::Duration), NetError> {
        let mut stream = self.connection.accept_uni().await.map_err(lost)?;
        let first_byte = std::time::Instant::now();
        match stream.read_to_end(self.message_bytes_max).await {
            Ok(bytes) => Ok((bytes, first_byte.elapsed())),
            Err(quinn::ReadToEndError::TooLong) => {
                let _ = stream.stop(1u32.into());
                Err(NetError::TooLarge {
                    bytes: self.message_bytes_max + 1,
                    limit: self.message_bytes_max,
                })
            }
            Err(quinn::ReadToEndError::Read(quinn::ReadError::ConnectionLost(e))) => Err(lost(e)),
            Err(e) => Err(NetError::Closed(e.to_string())),
        }
    }

    pub fn close(&self) {
        self.connection.close(0u32.into(), b"bye");
    }

    /// Close on purpose: the peer's next receive or send gets `NetError::Ended { code, reason }`.
    pub fn close_with(&self, code: u32, reason: &str) {
        self.connection.close(code.into(), reason.as_bytes());
    }

    /// UDP datagrams received on this connection so far (ACKs of our keep-alives included): a
    /// count that grows only while the peer is alive.
    pub fn datagrams_received(&self) -> u64 {
        self.connection.stats().udp_rx.datagrams
    }

    /// Wait until the connection has closed (either side, or its idle timeout).
    pub async fn closed(&self) {
        self.connection.closed().await;
    }

    /// Whether the connection has closed (and why), without waiting.
    pub fn close_reason(&self) -> Option<NetError> {
        self.connection.close_reason().map(lost)
    }

    /// The QUIC connection itself, for tests that must misbehave (hold streams open, ...).
    #[doc(hidden)]
    pub fn connection(&self) -> &quinn::Connection {
        &self.connection
    }
}
