//! regionguard decides, in the request path, whether an account may use a product from where it is.
//!
//! The major components are:
//! - [`region`]: ISO 3166 country and subdivision codes, parsed once at the edges.
//! - [`classify`]: the pure core, `classify(&Facts, &Policy) -> Decision`; no IO, no clock.
//! - [`policy`]: the policy file's model, validation and compiled lookup tables.
//! - [`geo`]: MaxMind-format database readers, the prefix cache and hot reload.
//! - [`engine`]: joins geo lookups, the current policy and the clock into decisions.
//! - [`grpc`]: tonic services; translates proto <-> domain and maps errors to `Status`.
//! - [`server`]: the listener, health, reflection and graceful shutdown.
//! - [`config`]: the one typed configuration, from file, environment and flags.

pub mod app;
pub mod audit;
pub mod auth;
pub mod classify;
pub mod config;
pub mod engine;
pub mod gateway;
pub mod geo;
pub mod grpc;
pub mod metrics;
pub mod overrides;
pub mod policy;
pub mod region;
pub mod reload;
pub mod replay;
pub mod server;
pub mod store;
pub mod usage;
