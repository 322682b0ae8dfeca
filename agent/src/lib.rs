//! The Flotilla host agent.
//!
//! Pure decisions ([`resolver`], [`console`], [`argv`], [`ports`]) are kept
//! apart from the shells that do I/O ([`interfaces::InterfaceTable::read_host`],
//! [`qmp`], [`qemu_process`], [`qemu_hypervisor`] and the actor [`host_actor`]),
//! so the decisions are testable without QEMU, sockets or clocks. The agent's
//! own decisions (requests, lifecycles, re-attach) are [`host_core::HostCore`],
//! a synchronous state machine that a simulation drives over
//! [`fake_qemu::FakeQemu`].

pub mod argv;
pub mod cgroup;
pub mod console;
pub mod console_relay;
pub mod control;
pub mod coordinator_link;
pub mod dac;
pub mod fake_qemu;
pub mod fence_keeper;
pub mod guest_agent;
pub mod host_actor;
pub mod host_core;
pub mod host_networks;
pub mod hypervisor;
pub mod interfaces;
pub mod lease;
pub mod machine_types;
pub mod nic_plan;
pub mod nic_plumbing;
pub mod ports;
pub mod qemu_hypervisor;
pub mod qemu_process;
pub mod qmp;
pub mod resolver;
pub mod serial_relay;
pub mod storage_copy;
pub mod storage_proof;
pub mod vm_record;
pub mod vm_state;
pub mod watchdog;
