//! `/metrics`, `/healthz`, `/readyz` over minimal HTTP/1.1.

use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Serves forever; `render` produces the metrics text, `ready` the readiness.
pub async fn serve<S: Send + 'static>(
    listener: TcpListener,
    state: Arc<Mutex<S>>,
    render: fn(&S) -> String,
    ready: fn(&S) -> bool,
) {
    loop {
        let Ok((mut sock, _)) = listener.accept().await else {
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 2048];
            let mut n = 0;
            while n < buf.len() {
                match sock.read(&mut buf[n..]).await {
                    Ok(0) | Err(_) => break,
                    Ok(k) => n += k,
                }
                if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
            let head = String::from_utf8_lossy(&buf[..n]);
            let path = head.split_whitespace().nth(1).unwrap_or("/");
            let (code, body) = {
                let s = state.lock().unwrap_or_else(|p| p.into_inner());
                match path {
                    "/metrics" => ("200 OK", render(&s)),
                    "/healthz" => ("200 OK", "ok\n".to_string()),
                    "/readyz" if ready(&s) => ("200 OK", "ok\n".to_string()),
                    "/readyz" => ("503 Service Unavailable", "not ready\n".to_string()),
                    _ => ("404 Not Found", "not found\n".to_string()),
                }
            };
            let resp = format!(
                "HTTP/1.1 {code}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(resp.as_bytes()).await;
        });
    }
}
