//! The HTTP side both binaries share, on hyper: `/metrics`, `/healthz` and
//! `/readyz` for the agent and the operator, and the operator's Alertmanager
//! receiver. hyper parses the requests; this module bounds them (connections
//! in all and per peer address, idle and header timeout, body limit, request
//! timeout), routes the probes, and encodes metrics from a
//! `prometheus-client` registry in the OpenMetrics text format.
//!
//! Each binary serves the kubelet's probes on a listener of their own
//! ([`health`] with [`Limits::probes`]), so clients of the metrics port —
//! however many connections they hold — never delay a probe.
//!
//! Behind the `serve` feature: consumers of the API types need none of it.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::Response;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeCounterValue, EncodeGaugeValue, EncodeLabelSet, EncodeMetric,
};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tracing::debug;

pub use hyper::body::Incoming;
pub use hyper::{Request, StatusCode};
pub use prometheus_client;

/// A complete response.
pub type Reply = Response<Full<Bytes>>;

/// A plain-text reply.
pub fn text(code: StatusCode, body: impl Into<String>) -> Reply {
    let mut r = Response::new(Full::new(Bytes::from(body.into())));
    *r.status_mut() = code;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// Reads a body of at most `limit` bytes: 413 when it is larger (declared
/// or not), 400 when the client went away mid-body.
pub async fn read_body(req: Request<Incoming>, limit: usize) -> Result<Bytes, StatusCode> {
    let declared = req
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(StatusCode::PAYLOAD_TOO_LARGE);
    }
    match Limited::new(req.into_body(), limit).collect().await {
        Ok(b) => Ok(b.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(StatusCode::PAYLOAD_TOO_LARGE),
        Err(_) => Err(StatusCode::BAD_REQUEST),
    }
}

/// How much one client may take from a server.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// From a request's head to its reply, body reading included: a body
    /// trickled in byte by byte gets 408 instead of holding the task.
    pub request_timeout: Duration,
    /// Connections served at once; more wait in the listen backlog.
    pub max_connections: usize,
    /// Connections served at once from one IP address; a peer's connection
    /// over this is closed as soon as it is accepted, so one client cannot
    /// take every slot from the others.
    pub max_per_peer: usize,
    /// A connection waiting for a request's head closes after this: a new
    /// connection that sends nothing, a head trickled in, and a kept-alive
    /// connection idle between requests (hyper's header read timer runs
    /// from the moment the connection waits for a head).
    pub idle_timeout: Duration,
}

impl Default for Limits {
    /// For `/metrics` and the Alertmanager receiver: 256 connections, 32 per
    /// IP address, 30 s per request, idle connections closed after 10 s.
    fn default() -> Self {
        Limits {
            request_timeout: Duration::from_secs(30),
            max_connections: 256,
            max_per_peer: 32,
            idle_timeout: Duration::from_secs(10),
        }
    }
}

impl Limits {
    /// For a listener that serves only `/healthz` and `/readyz` to the
    /// kubelet (two probes at a time, answered at once): 16 connections,
    /// 5 s per request, idle connections closed after 5 s.
    pub fn probes() -> Limits {
        Limits {
            request_timeout: Duration::from_secs(5),
            max_connections: 16,
            max_per_peer: 16,
            idle_timeout: Duration::from_secs(5),
        }
    }
}

/// Open connections per peer address, bounded.
#[derive(Debug)]
struct Peers {
    limit: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// One connection counted against its peer; uncounted on drop.
#[derive(Debug)]
struct PeerSlot {
    peers: Arc<Peers>,
    ip: IpAddr,
}

impl Peers {
    /// Counts a connection from `ip`, or `None` when it already has `limit`.
    fn take(self: &Arc<Self>, ip: IpAddr) -> Option<PeerSlot> {
        let ip = ip.to_canonical();
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(ip).or_insert(0);
        if *n >= self.limit {
            return None;
        }
        *n += 1;
        Some(PeerSlot {
            peers: self.clone(),
            ip,
        })
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut open = self.peers.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// Serves `handler` on `listener` forever with the default [`Limits`].
pub async fn serve<F, Fut>(listener: TcpListener, handler: F)
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Reply> + Send + 'static,
{
    serve_with(listener, handler, Limits::default()).await
}

/// Serves `handler` on `listener` forever, HTTP/1.1, one task per connection,
/// within `limits`.
///
/// # Guarantees
/// - At most `max_connections` connections are served at once (more wait
///   in the listen backlog) and at most `max_per_peer` from one address
///   (more are closed on accept).
/// - A connection waiting for a head longer than `idle_timeout` is closed;
///   a request gets 408 after `request_timeout`.
pub async fn serve_with<F, Fut>(listener: TcpListener, handler: F, limits: Limits)
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Reply> + Send + 'static,
{
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let peers = Arc::new(Peers {
        limit: limits.max_per_peer.max(1),
        open: Mutex::default(),
    });
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let Ok((sock, peer)) = listener.accept().await else {
            // Out of descriptors and the like: do not spin.
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let Some(peer_slot) = peers.take(peer.ip()) else {
            debug!(%peer, limit = limits.max_per_peer, "connection refused: this address has its limit of connections open");
            drop(sock);
            continue;
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let _slots = (slot, peer_slot);
            let svc = hyper::service::service_fn(move |req| {
                let handler = handler.clone();
                async move {
                    let reply = tokio::time::timeout(limits.request_timeout, handler(req))
                        .await
                        .unwrap_or_else(|_| {
                            text(StatusCode::REQUEST_TIMEOUT, "request timed out\n")
                        });
                    Ok::<_, Infallible>(reply)
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                // A client that never finishes its headers, or keeps an idle
                // connection open, is dropped.
                .header_read_timeout(limits.idle_timeout)
                // A head over 16 KiB gets 431 (probes and Alertmanager send < 1 KiB).
                .max_header_size(16 * 1024)
                .max_buf_size(64 * 1024)
                .serve_connection(TokioIo::new(sock), svc);
            if let Err(e) = conn.await {
                debug!(%peer, error = %e, "http connection ended with an error");
            }
        });
    }
}

/// The OpenMetrics content type Prometheus negotiates for.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Answers `/metrics`, `/healthz` and `/readyz` (`ready`: `Err` says why
/// not, with a 503); `None` for any other path, left to the caller.
pub fn probes(
    req: &Request<Incoming>,
    registry: &Registry,
    ready: Result<(), String>,
) -> Option<Reply> {
    let path = req.uri().path();
    if !matches!(path, "/metrics" | "/healthz" | "/readyz") {
        return None;
    }
    if req.method() != hyper::Method::GET && req.method() != hyper::Method::HEAD {
        return Some(text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n"));
    }
    Some(match (path, ready) {
        ("/metrics", _) => metrics(registry),
        ("/readyz", Err(why)) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
        _ => text(StatusCode::OK, "ok\n"),
    })
}

/// Answers `/healthz` (`live`: `Err` says why not, with a 503) and
/// `/readyz` (`ready`, likewise), 404 for anything else: the handler of a
/// probe-only listener, which serves no metrics so that a scrape never
/// competes with the kubelet's probes.
pub fn health(
    req: &Request<Incoming>,
    live: Result<(), String>,
    ready: Result<(), String>,
) -> Reply {
    let path = req.uri().path();
    if !matches!(path, "/healthz" | "/readyz") {
        return text(StatusCode::NOT_FOUND, "not found\n");
    }
    if req.method() != hyper::Method::GET && req.method() != hyper::Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n");
    }
    match (path, live, ready) {
        ("/healthz", Err(why), _) | ("/readyz", _, Err(why)) => {
            text(StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n"))
        }
        _ => text(StatusCode::OK, "ok\n"),
    }
}

/// The registry's metrics in the OpenMetrics text format.
pub fn metrics(registry: &Registry) -> Reply {
    let mut body = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut body, registry) {
        return text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot encode metrics: {e}\n"),
        );
    }
    let mut r = text(StatusCode::OK, body);
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(OPENMETRICS),
    );
    r
}

/// Values a loop keeps behind a mutex and every scrape reads: counters the
/// kernel or the loop already keeps, written as they are (no second copy in
/// registered metric objects).
pub trait Scrape: std::fmt::Debug + Send + 'static {
    /// Writes the current values with [`counter`], [`gauge`], [`counters`]
    /// and [`gauges`].
    fn scrape(&self, e: &mut DescriptorEncoder) -> std::fmt::Result;
}

/// Registers `shared` so that every scrape reads it.
pub fn register<T: Scrape>(registry: &mut Registry, shared: Arc<Mutex<T>>) {
    registry.register_collector(Box::new(Scraped(shared)));
}

#[derive(Debug)]
struct Scraped<T>(Arc<Mutex<T>>);

impl<T: Scrape> Collector for Scraped<T> {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        // A panicked writer leaves plain counters behind: still worth reading.
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .scrape(&mut e)
    }
}

/// Writes one counter family read at scrape time (the body of a
/// [`prometheus_client::collector::Collector`]); `name` without `_total`,
/// which the encoder adds.
pub fn counters<L: EncodeLabelSet, N: EncodeCounterValue>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (L, N)>,
) -> std::fmt::Result {
    let mut m = e.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, v) in rows {
        ConstCounter::new(v).encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

/// Writes one gauge family read at scrape time.
pub fn gauges<L: EncodeLabelSet, N: EncodeGaugeValue>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (L, N)>,
) -> std::fmt::Result {
    let mut m = e.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, v) in rows {
        ConstGauge::new(v).encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

/// Writes one counter without labels, read at scrape time.
pub fn counter<N: EncodeCounterValue>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    v: N,
) -> std::fmt::Result {
    ConstCounter::new(v).encode(e.encode_descriptor(name, help, None, MetricType::Counter)?)
}

/// Writes one gauge without labels, read at scrape time.
pub fn gauge<N: EncodeGaugeValue>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    v: N,
) -> std::fmt::Result {
    ConstGauge::new(v).encode(e.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Fixed;

    impl Scrape for Fixed {
        fn scrape(&self, e: &mut DescriptorEncoder) -> std::fmt::Result {
            counter(e, "eg_sent", "Sent.", 3u64)?;
            let rows = [([("iface", "eth\"0")], 1.5f64)];
            gauges(e, "eg_rate", "Rate.", rows)
        }
    }

    /// Sends raw bytes to a server on loopback; returns what came back.
    async fn exchange(addr: std::net::SocketAddr, request: Vec<u8>) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut sock = tokio::net::TcpStream::connect(addr).await.expect("connect");
        // The server may close before reading everything (a refused head).
        let _ = sock.write_all(&request).await;
        let mut out = vec![];
        let _ = sock.read_to_end(&mut out).await;
        String::from_utf8_lossy(&out).into_owned()
    }

    #[tokio::test]
    async fn probes_metrics_and_limits_over_real_connections() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut r = Registry::default();
        register(&mut r, Arc::new(Mutex::new(Fixed)));
        let r = Arc::new(r);
        tokio::spawn(serve(listener, move |req: Request<Incoming>| {
            let probe = probes(&req, &r, Err("caches not synced".into()));
            async move {
                match probe {
                    Some(reply) => reply,
                    None => match read_body(req, 16).await {
                        Ok(b) => text(StatusCode::OK, format!("{} bytes", b.len())),
                        Err(code) => text(code, "refused"),
                    },
                }
            }
        }));
        let get = |path: &str| {
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").into_bytes()
        };
        let metrics = exchange(addr, get("/metrics")).await;
        assert!(metrics.starts_with("HTTP/1.1 200 OK"), "{metrics}");
        assert!(
            metrics.contains("content-type: application/openmetrics-text"),
            "{metrics}"
        );
        assert!(metrics.ends_with("eg_sent_total 3\n# HELP eg_rate Rate.\n# TYPE eg_rate gauge\neg_rate{iface=\"eth\\\"0\"} 1.5\n# EOF\n"), "{metrics}");
        let ready = exchange(addr, get("/readyz")).await;
        assert!(ready.starts_with("HTTP/1.1 503"), "{ready}");
        assert!(ready.ends_with("caches not synced\n"), "{ready}");
        assert!(exchange(addr, get("/healthz"))
            .await
            .ends_with("\r\n\r\nok\n"));
        let post =
            b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                .to_vec();
        assert!(exchange(addr, post).await.starts_with("HTTP/1.1 405"));
        // Bodies are bounded, declared or not.
        let small =
            b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"
                .to_vec();
        assert!(exchange(addr, small).await.ends_with("5 bytes"));
        let declared =
            b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 17\r\nConnection: close\r\n\r\n"
                .to_vec();
        assert!(exchange(addr, declared).await.starts_with("HTTP/1.1 413"));
        let mut chunked = b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n".to_vec();
        chunked.extend_from_slice(b"20\r\n0123456789abcdef0123456789abcdef\r\n0\r\n\r\n");
        assert!(exchange(addr, chunked).await.starts_with("HTTP/1.1 413"));
        // A head over the buffer limit is refused without a handler call.
        let mut huge = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Fill: ".to_vec();
        huge.extend(std::iter::repeat_n(b'a', 100 * 1024));
        huge.extend_from_slice(b"\r\n\r\n");
        let refused = exchange(addr, huge).await;
        assert!(
            refused.is_empty() || refused.starts_with("HTTP/1.1 431"),
            "{refused}"
        );
    }

    #[tokio::test]
    async fn a_trickled_body_times_out_and_connections_are_capped() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let limits = Limits {
            request_timeout: Duration::from_millis(300),
            max_connections: 1,
            ..Limits::default()
        };
        tokio::spawn(serve_with(
            listener,
            |req: Request<Incoming>| async move {
                match read_body(req, 1024).await {
                    Ok(b) => text(StatusCode::OK, format!("{} bytes", b.len())),
                    Err(code) => text(code, "refused"),
                }
            },
            limits,
        ));
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        // Declares 10 bytes, sends 1, then waits: 408, not a held task.
        let mut slow = tokio::net::TcpStream::connect(addr).await.expect("connect");
        slow.write_all(b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\na")
            .await
            .expect("write");
        // The one slot is taken: a second client is not answered until the first ends.
        let second = tokio::spawn(exchange(
            addr,
            b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
                .to_vec(),
        ));
        let mut got = vec![0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(5), slow.read(&mut got))
            .await
            .expect("answered within the timeout")
            .expect("read");
        assert!(String::from_utf8_lossy(&got[..n]).starts_with("HTTP/1.1 408"));
        assert!(!second.is_finished(), "served beyond the connection cap");
        drop(slow);
        let reply = tokio::time::timeout(Duration::from_secs(5), second)
            .await
            .expect("served once the slot is free")
            .expect("task");
        assert!(reply.ends_with("2 bytes"), "{reply}");
    }

    /// A connection from `from` (any 127.0.0.0/8 address is this host's
    /// loopback, so each is a peer of its own) to `to`.
    async fn connect_from(from: [u8; 4], to: std::net::SocketAddr) -> tokio::net::TcpStream {
        let s = tokio::net::TcpSocket::new_v4().expect("socket");
        s.bind((std::net::Ipv4Addr::from(from), 0).into())
            .expect("bind source");
        s.connect(to).await.expect("connect")
    }

    const KEEP_ALIVE_GET: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";

    /// Sends a keep-alive `GET /healthz` and reads its reply; `None` when
    /// the server closed the connection instead (or did not answer in 2 s).
    async fn keep_alive_probe(sock: &mut tokio::net::TcpStream) -> Option<String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        sock.write_all(KEEP_ALIVE_GET).await.ok()?;
        let mut got = Vec::new();
        let mut buf = [0u8; 512];
        while !got.ends_with(b"\r\n\r\nok\n") {
            let n = tokio::time::timeout(Duration::from_secs(2), sock.read(&mut buf))
                .await
                .ok()?
                .ok()?;
            if n == 0 {
                return None;
            }
            got.extend_from_slice(&buf[..n]);
        }
        Some(String::from_utf8_lossy(&got).into_owned())
    }

    /// What the agent and the operator run: a metrics listener and a probe
    /// listener, on loopback ports of their own.
    async fn metrics_and_probes() -> (std::net::SocketAddr, std::net::SocketAddr) {
        let metrics = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let probe = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addrs = (
            metrics.local_addr().expect("addr"),
            probe.local_addr().expect("addr"),
        );
        let registry = Arc::new(Registry::default());
        tokio::spawn(serve(metrics, move |req: Request<Incoming>| {
            let reply = probes(&req, &registry, Ok(()))
                .unwrap_or_else(|| text(StatusCode::NOT_FOUND, "not found\n"));
            async move { reply }
        }));
        tokio::spawn(serve_with(
            probe,
            |req: Request<Incoming>| {
                let reply = health(&req, Ok(()), Ok(()));
                async move { reply }
            },
            Limits::probes(),
        ));
        addrs
    }

    /// 300 keep-alive connections held on the metrics listener, from ten
    /// addresses (30 each: under the per-peer limit, so together they take
    /// every one of the 256 slots and queue the rest): the metrics
    /// listener is starved, and 20 probes in a row on the probe listener
    /// each answer 200 within 100 ms.
    #[tokio::test]
    async fn held_metrics_connections_never_delay_a_probe() {
        let (metrics, probe) = metrics_and_probes().await;
        let mut held = Vec::new();
        for i in 0..300usize {
            let peer = 10 + (i / 30) as u8;
            let mut sock = connect_from([127, 0, 1, peer], metrics).await;
            if i < Limits::default().max_connections {
                let reply = keep_alive_probe(&mut sock).await;
                assert!(
                    reply.is_some_and(|r| r.starts_with("HTTP/1.1 200")),
                    "connection {i} not served"
                );
            }
            held.push(sock);
        }
        // The metrics listener is full: one more client is not answered.
        let mut late = connect_from([127, 0, 1, 99], metrics).await;
        assert!(
            keep_alive_probe(&mut late).await.is_none(),
            "the metrics listener served a 301st connection: the test holds too few"
        );
        let mut worst = Duration::ZERO;
        for n in 0..20 {
            let start = std::time::Instant::now();
            let reply = tokio::time::timeout(
                Duration::from_secs(2),
                exchange(
                    probe,
                    b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec(),
                ),
            )
            .await
            .unwrap_or_default();
            let took = start.elapsed();
            worst = worst.max(took);
            assert!(
                reply.starts_with("HTTP/1.1 200"),
                "probe {n}: {reply:?} after {took:?}"
            );
            assert!(took < Duration::from_millis(100), "probe {n} took {took:?}");
        }
        eprintln!("20 probes with 300 connections held on the metrics listener: slowest {worst:?}");
        // The probe listener serves probes only: no metrics, nothing else.
        let m = exchange(
            probe,
            b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec(),
        )
        .await;
        assert!(m.starts_with("HTTP/1.1 404"), "{m}");
        drop(held);
    }

    /// A peer at its limit gets its next connection closed unanswered while
    /// another peer is served; once it closes one, it is served again.
    #[tokio::test]
    async fn a_peer_over_its_limit_is_refused_while_another_is_served() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let limits = Limits {
            max_per_peer: 2,
            ..Limits::default()
        };
        tokio::spawn(serve_with(
            listener,
            |req: Request<Incoming>| {
                let reply = health(&req, Ok(()), Ok(()));
                async move { reply }
            },
            limits,
        ));
        let greedy = [127, 0, 2, 1];
        let mut first = connect_from(greedy, addr).await;
        let mut second = connect_from(greedy, addr).await;
        assert!(keep_alive_probe(&mut first).await.is_some());
        assert!(keep_alive_probe(&mut second).await.is_some());
        let mut third = connect_from(greedy, addr).await;
        assert_eq!(
            keep_alive_probe(&mut third).await,
            None,
            "served over its limit"
        );
        let mut other = connect_from([127, 0, 2, 2], addr).await;
        let reply = keep_alive_probe(&mut other)
            .await
            .expect("another peer is served");
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
        // The held connections still work: the limit closes only new ones.
        assert!(keep_alive_probe(&mut first).await.is_some());
        drop(second);
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        loop {
            let mut again = connect_from(greedy, addr).await;
            if keep_alive_probe(&mut again).await.is_some() {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the freed slot never came back"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A kept-alive connection idle after its request, and one that never
    /// sends anything, are closed once the idle timeout passes, not before.
    #[tokio::test]
    async fn an_idle_connection_is_closed_after_the_idle_timeout() {
        use tokio::io::AsyncReadExt;
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let idle = Duration::from_millis(400);
        tokio::spawn(serve_with(
            listener,
            |req: Request<Incoming>| {
                let reply = health(&req, Ok(()), Ok(()));
                async move { reply }
            },
            Limits {
                idle_timeout: idle,
                ..Limits::default()
            },
        ));
        let mut used = connect_from([127, 0, 3, 1], addr).await;
        assert!(keep_alive_probe(&mut used).await.is_some());
        let used_since = std::time::Instant::now();
        let silent = connect_from([127, 0, 3, 1], addr).await;
        let silent_since = std::time::Instant::now();
        for (what, mut sock, start) in [
            ("kept alive", used, used_since),
            ("silent", silent, silent_since),
        ] {
            let mut buf = [0u8; 64];
            let n = tokio::time::timeout(Duration::from_secs(5), sock.read(&mut buf))
                .await
                .unwrap_or_else(|_| panic!("{what} connection still open after 5 s"))
                .unwrap_or(0);
            let took = start.elapsed();
            assert_eq!(n, 0, "{what}: {:?}", String::from_utf8_lossy(&buf[..n]));
            assert!(
                took >= idle - Duration::from_millis(50),
                "{what} closed after {took:?}"
            );
            eprintln!("{what} connection closed after {took:?} (idle timeout {idle:?})");
        }
    }

    #[test]
    fn collectors_encode_as_openmetrics() {
        let mut r = Registry::default();
        register(&mut r, Arc::new(Mutex::new(Fixed)));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &r).expect("encode");
        assert_eq!(
            out,
            "# HELP eg_sent Sent.\n# TYPE eg_sent counter\neg_sent_total 3\n\
             # HELP eg_rate Rate.\n# TYPE eg_rate gauge\neg_rate{iface=\"eth\\\"0\"} 1.5\n# EOF\n"
        );
    }
}
