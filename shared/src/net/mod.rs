//! The transport the three binaries share: certificates, mutual TLS and
//! framed messages over QUIC. This is the one part of `shared` that does I/O
//! (reading key files, sockets); it sits behind the `net` feature so the pure
//! modules stay usable without it.

pub mod metrics;
pub mod pki;
pub mod quic;
pub mod tls;
