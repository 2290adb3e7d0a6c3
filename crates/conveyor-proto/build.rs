//! Compiles the protobuf definitions with protox, so building needs no system `protoc`.

use protox::prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "../../proto/conveyor/v1/conveyor.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], ["../../proto"])?;
    // The gRPC service stubs only with the `grpc` feature: the broker backends need the message
    // types alone, and without the stubs they link no tonic (and so no axum).
    let grpc = std::env::var_os("CARGO_FEATURE_GRPC").is_some();
    if grpc {
        // The encoded descriptors (with the .proto comments) for server reflection.
        let out_dir = std::path::PathBuf::from(std::env::var_os("OUT_DIR").ok_or("no OUT_DIR")?);
        std::fs::write(
            out_dir.join("conveyor.v1.descriptors.bin"),
            descriptors.encode_to_vec(),
        )?;
    }
    tonic_prost_build::configure()
        .build_client(grpc)
        .build_server(grpc)
        .bytes(".conveyor.v1")
        .btree_map(".conveyor.v1")
        .compile_fds(descriptors)?;
    Ok(())
}
