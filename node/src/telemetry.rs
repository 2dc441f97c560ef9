//! Logging (`tracing`, filtered by `RUST_LOG`) and the Prometheus metrics endpoint.

use std::net::SocketAddr;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};

/// Initialises logging to stderr; `RUST_LOG` filters (default `info`).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Initialises logging to stderr for commands that print their own progress: `RUST_LOG`
/// filters (default `warn`).
pub fn init_logging_quiet() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Why metrics could not be exported.
#[derive(Debug, thiserror::Error)]
#[error("cannot serve metrics on {addr}: {message}")]
pub struct MetricsError {
    addr: SocketAddr,
    message: String,
}

/// Serves Prometheus metrics on `addr` (must be called inside the tokio runtime).
pub fn serve_metrics(addr: SocketAddr) -> Result<(), MetricsError> {
    let error = |e: &dyn std::fmt::Display| MetricsError {
        addr,
        message: e.to_string(),
    };
    // Bind first so that a port in use is one clear error rather than a background failure.
    let probe = std::net::TcpListener::bind(addr).map_err(|e| error(&e))?;
    drop(probe);
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(
            Matcher::Suffix("_seconds".into()),
            &[
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ],
        )
        .map_err(|e| error(&e))?
        .install()
        .map_err(|e| error(&e))?;
    tracing::info!(%addr, "metrics endpoint listening");
    Ok(())
}
