//! With the `cluster` feature, compiles `proto/**/*.proto` into Rust with protox (a protobuf
//! compiler written in Rust, so no `protoc` is needed) and tonic's prost code generator.

const PROTOS: &[&str] = &["proto/knsq/cluster/v1/cluster.proto"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    #[cfg(feature = "cluster")]
    tonic_prost_build::configure()
        .build_transport(false)
        // Handed-off message bodies are shared, not copied, on both sides.
        .bytes(".knsq.cluster.v1.HandedMessage")
        .compile_fds(protox::compile(PROTOS, ["proto"])?)?;
    Ok(())
}
