fn main() -> Result<(), Box<dyn std::error::Error>> {
    tonic_prost_build::configure().compile_protos(&["herd/v1/controller.proto", "herd/v1/worker.proto"], &["."])?;
    Ok(())
}
