//! The Mailroom binary's library half: configuration, start-up and shutdown, and the
//! admin API client the CLI uses. Kept as a library so integration tests can start a
//! whole server in-process on ephemeral ports.

pub mod client;
pub mod config;
pub mod server;
pub mod stress;

pub use config::Config;
pub use server::{RunningServer, ServerOptions, ShutdownReport, start};
