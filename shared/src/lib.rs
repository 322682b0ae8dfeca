//! Flotilla's shared core: the libvirt XML models and the wire protocol.
//!
//! Everything here is pure: no files, sockets, processes or clocks. The agent,
//! the coordinator and the CLI all build on it, so a rule decided here (what a
//! definition means, what crosses the wire) is decided once.

pub mod xml;
