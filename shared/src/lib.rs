//! Flotilla's shared core: the libvirt XML models, the wire protocol, and the
//! transport the binaries share.
//!
//! `xml` and `proto` are pure: no files, sockets, processes or clocks, so a
//! rule decided there (what a definition means, what crosses the wire) is
//! decided once and tested without I/O. `net` (feature `net`) is the shared
//! transport shell: certificates, mutual TLS and framed QUIC streams;
//! `config_file` (feature `cli`) reads a daemon's TOML config as its flags.

#[cfg(feature = "cli")]
pub mod config_file;
pub mod hardware;
#[cfg(feature = "net")]
pub mod net;
pub mod proto;
pub mod report_delta;
pub mod xml;
