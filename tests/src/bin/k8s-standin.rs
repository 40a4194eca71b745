//! Runs the Kubernetes-API stand-in (see `egressguard_e2e::standin`). For
//! tests only: it is not Kubernetes.
//!
//! `k8s-standin [--listen 127.0.0.1:0] [--crds DIR] [--kubeconfig PATH]`
//! prints `listening on ADDR` once ready.

use std::path::PathBuf;

fn main() {
    let mut listen = "127.0.0.1:0".to_string();
    let mut crds: Option<PathBuf> = None;
    let mut kubeconfig: Option<PathBuf> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--listen" => listen = args.next().unwrap_or(listen),
            "--crds" => crds = args.next().map(PathBuf::from),
            "--kubeconfig" => kubeconfig = args.next().map(PathBuf::from),
            other => {
                eprintln!("k8s-standin: unknown argument {other:?}");
                std::process::exit(2);
            }
        }
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("k8s-standin: {e}");
            std::process::exit(1);
        }
    };
    // Load the CRD schemas before announcing readiness.
    let server = egressguard_e2e::standin::Server::new(crds.as_deref());
    rt.block_on(async move {
        let listener = match tokio::net::TcpListener::bind(&listen).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("k8s-standin: cannot listen on {listen}: {e}");
                std::process::exit(1);
            }
        };
        let addr = match listener.local_addr() {
            Ok(a) => a,
            Err(e) => {
                eprintln!("k8s-standin: {e}");
                std::process::exit(1);
            }
        };
        if let Some(path) = &kubeconfig {
            if let Err(e) = egressguard_e2e::standin::write_kubeconfig(path, addr) {
                eprintln!("k8s-standin: cannot write {}: {e}", path.display());
                std::process::exit(1);
            }
        }
        println!("listening on {addr}");
        egressguard_e2e::standin::serve(listener, server).await;
    });
}
