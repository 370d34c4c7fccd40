//! Compiles proto/gpumeter/v1/*.proto (and the kubelet's pod-resources API the agent reads,
//! proto/kubelet/podresources/v1/api.proto) with protox (pure Rust), so no system protoc is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/gpumeter/v1/records.proto",
        "proto/gpumeter/v1/ingest.proto",
        "proto/gpumeter/v1/query.proto",
        "proto/gpumeter/v1/admin.proto",
        "proto/kubelet/podresources/v1/api.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
