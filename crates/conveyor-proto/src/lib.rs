//! Generated protobuf and gRPC types, and their conversion to and from the core model.
//!
//! Wire types stop here: the rest of conveyor works with `conveyor_core` types.

#![allow(clippy::all)]

pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/conveyor.v1.rs"));

    /// `conveyor/v1/conveyor.proto` as an encoded `FileDescriptorSet` (with its comments), for
    /// gRPC server reflection.
    #[cfg(feature = "grpc")]
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/conveyor.v1.descriptors.bin"));
}

mod convert;

pub use convert::{draft_from_request, error_detail, event_from_wire, event_to_wire};
