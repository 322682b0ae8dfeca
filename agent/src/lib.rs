//! The Flotilla host agent.
//!
//! Pure decisions ([`resolver`], [`console`], [`argv`], [`ports`]) are kept
//! apart from the shells that do I/O ([`interfaces::InterfaceTable::read_host`],
//! [`qmp`], [`qemu_process`], and the actors [`host_actor`] and [`vm_actor`]),
//! so the decisions are testable without QEMU, sockets or clocks.

pub mod argv;
pub mod console;
pub mod control;
pub mod coordinator_link;
pub mod host_actor;
pub mod host_networks;
pub mod interfaces;
pub mod ports;
pub mod qemu_process;
pub mod qmp;
pub mod resolver;
pub mod vm_actor;
pub mod vm_record;
