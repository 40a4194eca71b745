//! A minimal HTTP/1.1 endpoint for `/metrics`, `/healthz` and `/readyz`:
//! three GET routes do not justify a web framework in a 20 MiB agent.

use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::Shared;

/// Serves until the process exits.
pub async fn serve(listener: TcpListener, shared: Arc<Mutex<Shared>>) {
    loop {
        let Ok((mut sock, _)) = listener.accept().await else {
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 2048];
            let mut n = 0;
            // Read the request head (bounded); the body, if any, is ignored.
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
                let s = shared.lock().unwrap_or_else(|p| p.into_inner());
                match path {
                    "/metrics" => ("200 OK", s.metrics.render()),
                    "/healthz" => ("200 OK", "ok\n".to_string()),
                    "/readyz" if s.synced => ("200 OK", "ok\n".to_string()),
                    "/readyz" => (
                        "503 Service Unavailable",
                        "waiting for the first NodeShaping list\n".to_string(),
                    ),
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
