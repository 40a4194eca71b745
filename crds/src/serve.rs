//! The HTTP side both binaries share, on hyper: `/metrics`, `/healthz` and
//! `/readyz` for the agent and the operator, and the operator's Alertmanager
//! receiver. hyper parses the requests; this module bounds them (header
//! timeout, body limit), routes the probes, and encodes metrics from a
//! `prometheus-client` registry in the OpenMetrics text format.
//!
//! Behind the `serve` feature: consumers of the API types need none of it.

use std::convert::Infallible;
use std::future::Future;
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
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            request_timeout: Duration::from_secs(30),
            max_connections: 256,
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

/// Serves `handler` on `listener` forever, HTTP/1.1, one task per connection.
pub async fn serve_with<F, Fut>(listener: TcpListener, handler: F, limits: Limits)
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Reply> + Send + 'static,
{
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let Ok((sock, peer)) = listener.accept().await else {
            // Out of descriptors and the like: do not spin.
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let _slot = slot;
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
                // A client that never finishes its headers is dropped.
                .header_read_timeout(Duration::from_secs(10))
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
