//! Usage history: per-account and cross-account aggregates, bounded in memory.
//! (Filled in by the aggregator below.)
pub mod window;
