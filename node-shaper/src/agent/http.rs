//! The agent's `/metrics`, `/healthz` and `/readyz`, on the HTTP server the
//! operator uses too ([`egressguard_crds::serve`]).

use std::sync::{Arc, Mutex};

use egressguard_crds::serve::prometheus_client::encoding::DescriptorEncoder;
use egressguard_crds::serve::prometheus_client::registry::Registry;
use egressguard_crds::serve::{self, Scrape, StatusCode};
use tokio::net::TcpListener;

use super::Shared;

impl Scrape for Shared {
    fn scrape(&self, e: &mut DescriptorEncoder) -> std::fmt::Result {
        self.metrics.scrape(e)
    }
}

/// Serves until the process exits.
pub async fn serve(listener: TcpListener, shared: Arc<Mutex<Shared>>) {
    let mut registry = Registry::default();
    serve::register(&mut registry, shared.clone());
    let registry = Arc::new(registry);
    serve::serve(listener, move |req| {
        // Read (and unlock) before `probes`: its collector locks the same mutex.
        let synced = shared.lock().unwrap_or_else(|p| p.into_inner()).synced;
        let ready = match synced {
            true => Ok(()),
            false => Err("waiting for the first NodeShaping list".to_string()),
        };
        let reply = serve::probes(&req, &registry, ready)
            .unwrap_or_else(|| serve::text(StatusCode::NOT_FOUND, "not found\n"));
        async move { reply }
    })
    .await
}
