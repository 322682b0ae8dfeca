//! Prometheus metrics endpoint shared by the coordinator and the agent.
//!
//! Code records with the `metrics` macros wherever an event happens; this
//! module only installs the exporter, with latency buckets suited to VM
//! starts and scheduling decisions (milliseconds to tens of seconds).

use std::net::SocketAddr;

/// Latency buckets in seconds.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// The exporter could not be installed.
#[derive(Debug, thiserror::Error)]
#[error("cannot serve metrics on {addr}: {reason}")]
pub struct MetricsError {
    /// The listen address.
    pub addr: SocketAddr,
    /// Why.
    pub reason: String,
}

/// Serves `/metrics` in Prometheus text format on `addr` (inside a tokio runtime).
pub fn serve(addr: SocketAddr) -> Result<(), MetricsError> {
    let err = |e: &dyn std::fmt::Display| MetricsError {
        addr,
        reason: e.to_string(),
    };
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets(LATENCY_BUCKETS)
        .map_err(|e| err(&e))?
        .install()
        .map_err(|e| err(&e))
}
