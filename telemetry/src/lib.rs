//! gpumeter's operational edges, shared by the agent and the collector so that neither links
//! the other: logging setup, the HTTP endpoint operators scrape and probe (`/metrics`,
//! `/healthz`, `/readyz`), and the man pages and shell completions generated from each
//! binary's clap definition. Depends on no other gpumeter crate.

pub mod docs;
pub mod http;
pub mod logging;
pub mod series;

pub use prometheus_client;
