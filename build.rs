//! Generates the protobuf messages and gRPC stubs for istiod (xDS, CA) from `proto/`, with a
//! protobuf compiler written in Rust: building needs no `protoc`. Also records what
//! `config_dump`'s `version` reports: the git revision and whether the tree was clean, the Rust
//! compiler and the build profile (each `unknown` where it cannot be found, as in an image build
//! without `.git`).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/workload.proto",
        "proto/authorization.proto",
        "proto/discovery.proto",
        "proto/ca.proto",
        "proto/zds.proto",
    ];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    build_info();
    let fds = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure().build_client(true).build_server(true).compile_fds(fds)?;
    Ok(())
}

fn build_info() {
    let run = |cmd: &str, args: &[&str]| -> Option<String> {
        let out = std::process::Command::new(cmd).args(args).output().ok()?;
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    let revision = run("git", &["rev-parse", "HEAD"]).unwrap_or_else(|| "unknown".into());
    let status = match run("git", &["status", "--porcelain", "--untracked-files=no"]) {
        Some(s) if s.is_empty() => "Clean",
        Some(_) => "Modified",
        None => "unknown",
    };
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let rust_version = run(&rustc, &["--version"])
        .and_then(|v| v.split_whitespace().nth(1).map(str::to_string))
        .unwrap_or_else(|| "unknown".into());
    let profile = std::env::var("PROFILE").unwrap_or_else(|_| "unknown".into());
    println!("cargo:rustc-env=ZTUNNEL_GIT_REVISION={revision}");
    println!("cargo:rustc-env=ZTUNNEL_BUILD_STATUS={status}");
    println!("cargo:rustc-env=ZTUNNEL_RUSTC_VERSION={rust_version}");
    println!("cargo:rustc-env=ZTUNNEL_BUILD_PROFILE={profile}");
    // A commit moves HEAD's log; a checkout moves HEAD.
    for f in [".git/HEAD", ".git/logs/HEAD"] {
        if std::path::Path::new(f).exists() {
            println!("cargo:rerun-if-changed={f}");
        }
    }
}
