//! The Flotilla coordinator: stored definitions, fleet scheduling, orchestration.
//!
//! Issue 4 fills this crate; today it only hosts the operator CLI binary.
