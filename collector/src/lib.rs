//! gpumeter collector: receives agents' signed record streams, keeps the verifiable ledger,
//! holds grants, pushes card assignments, and answers queries and reports.

pub mod admin;
pub mod auth;
pub mod config;
pub mod convert;
mod csv;
pub mod demo;
pub mod grants;
pub mod ingest;
pub mod invoices;
pub mod pdf;
pub mod query;
pub mod reconcile;
pub mod render;
pub mod report;
pub mod server;
pub mod store;
pub mod trend;
pub mod verify;
