//! gpumeter agent: reads every GPU of a server, attributes processes to tenants, folds samples
//! into per-card windows and streams them as signed, sequenced records to a collector.
//!
//! Pipeline: [`gpu`] → [`sampler`] → [`attribution`] → [`enforce`] → [`window`] → [`record`]
//! → [`spool`] → [`uplink`]. [`run`] wires it together.

pub mod assignments;
pub mod attribution;
pub mod clock;
pub mod config;
pub mod enforce;
pub mod gpu;
/// The signing key file lives in the proto crate, shared with the collector's head key.
pub use gpumeter_proto::keys;
pub mod kubelet;
pub mod ledger;
pub mod metrics;
pub mod pods;
pub mod probe;
pub mod record;
pub mod run;
pub mod sampler;
pub mod spool;
pub mod uplink;
pub mod window;
