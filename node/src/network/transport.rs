//! The transport stack (TCP + Noise + Yamux, QUIC, relay circuits, DNS) with byte accounting.
//!
//! Every connection's muxer is wrapped in [`CountingMuxer`], which counts the bytes read from and
//! written to its substreams into the global `loom_bytes_total{direction}` counters and into a
//! per-peer table ([`PeerBytes`]) that `loom-peer status` reports.

use std::{
    collections::HashMap,
    io,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use futures::{AsyncRead, AsyncWrite, ready};
use libp2p::core::muxing::StreamMuxer;
use libp2p::{
    PeerId, Transport, core::muxing::StreamMuxerBox, core::muxing::StreamMuxerEvent,
    core::muxing::SubstreamBox, core::transport::Boxed, core::upgrade::Version, dns,
    identity::Keypair, noise, quic, relay, tcp, yamux,
};

/// Bytes read and written on one peer's connections.
#[derive(Debug, Default)]
pub struct ByteCounters {
    /// Bytes received.
    pub inbound: AtomicU64,
    /// Bytes sent.
    pub outbound: AtomicU64,
}

/// Per-peer byte counters, shared between the transport and the network task.
#[derive(Debug, Clone, Default)]
pub struct PeerBytes {
    inner: Arc<Mutex<HashMap<PeerId, Arc<ByteCounters>>>>,
    departed: Arc<ByteCounters>,
}

impl PeerBytes {
    fn counters(&self, peer: PeerId) -> Arc<ByteCounters> {
        let mut map = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(peer).or_default().clone()
    }

    /// (received, sent) bytes for `peer` since it first connected.
    pub fn get(&self, peer: &PeerId) -> (u64, u64) {
        let map = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        map.get(peer)
            .map(|c| {
                (
                    c.inbound.load(Ordering::Relaxed),
                    c.outbound.load(Ordering::Relaxed),
                )
            })
            .unwrap_or_default()
    }

    /// Forgets peers that are no longer connected (the map is bounded by the connection limit);
    /// their bytes stay in the totals.
    pub fn retain(&self, connected: impl Fn(&PeerId) -> bool) {
        let mut map = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|p, c| {
            let keep = connected(p);
            if !keep {
                self.departed
                    .inbound
                    .fetch_add(c.inbound.load(Ordering::Relaxed), Ordering::Relaxed);
                self.departed
                    .outbound
                    .fetch_add(c.outbound.load(Ordering::Relaxed), Ordering::Relaxed);
            }
            keep
        });
    }

    /// (received, sent) bytes over every connection this process has had.
    pub fn totals(&self) -> (u64, u64) {
        let map = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        map.values().fold(
            (
                self.departed.inbound.load(Ordering::Relaxed),
                self.departed.outbound.load(Ordering::Relaxed),
            ),
            |(i, o), c| {
                (
                    i + c.inbound.load(Ordering::Relaxed),
                    o + c.outbound.load(Ordering::Relaxed),
                )
            },
        )
    }
}

/// Why the transport could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// Noise key setup failed.
    #[error("noise: {0}")]
    Noise(#[from] noise::Error),
}

/// Builds the full transport; `relay_transport` comes from `relay::client::new`.
pub fn build(
    keypair: &Keypair,
    relay_transport: relay::client::Transport,
    peer_bytes: PeerBytes,
) -> Result<Boxed<(PeerId, StreamMuxerBox)>, TransportError> {
    let direct = match dns::tokio::Transport::system(direct_transport(keypair)?) {
        Ok(with_dns) => with_dns.boxed(),
        Err(e) => {
            tracing::warn!(error = %e, "no system DNS configuration: /dns addresses will not resolve");
            direct_transport(keypair)?
        }
    };
    let relayed = relay_transport
        .upgrade(Version::V1Lazy)
        .authenticate(noise::Config::new(keypair)?)
        .multiplex(yamux::Config::default())
        .timeout(Duration::from_secs(20))
        .map(|(peer, muxer), _| (peer, StreamMuxerBox::new(muxer)));
    Ok(relayed
        .or_transport(direct)
        .map(move |either, _| {
            let (peer, muxer) = match either {
                futures::future::Either::Left(x) | futures::future::Either::Right(x) => x,
            };
            let counters = peer_bytes.counters(peer);
            (
                peer,
                StreamMuxerBox::new(CountingMuxer {
                    inner: muxer,
                    counters,
                }),
            )
        })
        .boxed())
}

/// QUIC or TCP + Noise + Yamux, both yielding a boxed muxer.
fn direct_transport(keypair: &Keypair) -> Result<Boxed<(PeerId, StreamMuxerBox)>, TransportError> {
    let tcp = tcp::tokio::Transport::new(tcp::Config::new().nodelay(true))
        .upgrade(Version::V1Lazy)
        .authenticate(noise::Config::new(keypair)?)
        .multiplex(yamux::Config::default())
        .timeout(Duration::from_secs(20));
    Ok(quic::tokio::Transport::new(quic::Config::new(keypair))
        .or_transport(tcp)
        .map(|either, _| match either {
            futures::future::Either::Left((peer, conn)) => (peer, StreamMuxerBox::new(conn)),
            futures::future::Either::Right((peer, muxer)) => (peer, StreamMuxerBox::new(muxer)),
        })
        .boxed())
}

/// A muxer whose substreams count the bytes they carry.
struct CountingMuxer {
    inner: StreamMuxerBox,
    counters: Arc<ByteCounters>,
}

impl StreamMuxer for CountingMuxer {
    type Substream = CountingStream;
    type Error = io::Error;

    fn poll_inbound(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::Substream, Self::Error>> {
        let inner = ready!(Pin::new(&mut self.inner).poll_inbound(cx))?;
        Poll::Ready(Ok(CountingStream {
            inner,
            counters: self.counters.clone(),
        }))
    }

    fn poll_outbound(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::Substream, Self::Error>> {
        let inner = ready!(Pin::new(&mut self.inner).poll_outbound(cx))?;
        Poll::Ready(Ok(CountingStream {
            inner,
            counters: self.counters.clone(),
        }))
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Pin::new(&mut self.inner).poll_close(cx)
    }

    fn poll(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<StreamMuxerEvent, Self::Error>> {
        Pin::new(&mut self.inner).poll(cx)
    }
}

/// A substream that counts its bytes.
struct CountingStream {
    inner: SubstreamBox,
    counters: Arc<ByteCounters>,
}

impl AsyncRead for CountingStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let n = ready!(Pin::new(&mut self.inner).poll_read(cx, buf))?;
        self.counters.inbound.fetch_add(n as u64, Ordering::Relaxed);
        metrics::counter!("loom_bytes_total", "direction" => "in").increment(n as u64);
        Poll::Ready(Ok(n))
    }
}

impl AsyncWrite for CountingStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let n = ready!(Pin::new(&mut self.inner).poll_write(cx, buf))?;
        self.counters
            .outbound
            .fetch_add(n as u64, Ordering::Relaxed);
        metrics::counter!("loom_bytes_total", "direction" => "out").increment(n as u64);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_close(cx)
    }
}
