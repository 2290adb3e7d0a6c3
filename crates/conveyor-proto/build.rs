//! Compiles the protobuf definitions with protox, so building needs no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "../../proto/conveyor/v1/conveyor.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], ["../../proto"])?;
    tonic_prost_build::configure()
        .bytes(".conveyor.v1")
        .btree_map(".conveyor.v1")
        .compile_fds(descriptors)?;
    Ok(())
}
