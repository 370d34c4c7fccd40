//! gpumeter collector: receives agents' signed record streams, keeps the verifiable ledger,
//! holds grants, pushes card assignments, and answers queries and reports.

pub mod admin;
pub mod admission;
pub mod archive;
pub mod auth;
pub mod client;
pub mod config;
pub mod console;
pub mod convert;
mod csv;
pub mod delivery;
#[cfg(feature = "demo")]
pub mod demo;
pub mod episodes;
pub mod grants;
pub mod heads;
pub mod identity;
pub mod ingest;
pub mod invoices;
pub mod jobs;
pub mod limiter;
pub mod listing;
pub mod metrics;
pub mod parts;
pub mod pdf;
pub mod provenance;
pub mod query;
pub mod reconcile;
pub mod registry;
pub mod render;
pub mod report;
pub mod retention;
pub mod rollup;
pub mod sanity;
pub mod server;
pub mod store;
pub mod top;
pub mod trend;
pub mod verify;
pub mod watch;
