//! The Flotilla coordinator: stored definitions, fleet scheduling, orchestration.
//!
//! Pure decisions live in [`scheduler`], [`reconcile`], [`migration`] and
//! [`usage`]; durable state in [`store`]; the [`fleet`] actor owns the live
//! view of hosts and answers operators; [`server`] is the QUIC shell that
//! authenticates peers and feeds the actor; [`web`] serves the browser
//! console ([`rfb`], tickets in [`web_auth`]) and the fleet page. With
//! several coordinators, [`etcd_store`] keeps the state in etcd,
//! [`leadership`] elects the one that acts, and [`follower`] is what the
//! others answer.

pub mod etcd_store;
pub mod events;
pub mod fencing;
pub mod fleet;
pub mod fleet_core;
pub mod follower;
pub mod host_index;
pub mod leadership;
pub mod lifecycle;
pub mod migration;
pub mod reconcile;
pub mod rfb;
pub mod scheduler;
pub mod server;
pub mod store;
pub mod usage;
pub mod web;
pub mod web_auth;
