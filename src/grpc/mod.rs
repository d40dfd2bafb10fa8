//! The gRPC edge: generated types, proto <-> domain translation, and the tonic services.
//!
//! Proto types stop here: the domain never imports `pb`. Handlers are convert, call, convert
//! back; every error becomes a `Status` in one place ([`ApiError`]), messages that do not
//! decode included (`codec.rs`); `max_request_bytes` is held to the bytes as received
//! ([`MessageLimit`]).

mod classifier;
mod codec;
pub mod convert;
pub mod deadline;
mod limit;
mod records;
mod review;
pub mod route;
mod status;
mod usage;

pub use classifier::ClassifierService;
pub use limit::MessageLimit;
pub use records::{encode_answer, replay_store, report_pb};
pub use review::ReviewService;
pub use route::Routed;
pub use status::{ApiError, MAX_MESSAGE_BYTES, bounded, excerpt};
pub use usage::{UsageService, usage_event};

/// Code generated from `proto/regionguard/v1/regionguard.proto`.
pub mod pb {
    tonic::include_proto!("regionguard.v1");

    /// The encoded descriptor set that server reflection serves.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/regionguard_descriptor.bin"));
}
