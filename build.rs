//! Compiles the public protos with protox (pure Rust: no system `protoc`), generates the tonic
//! server and client, and writes the descriptor sets that server reflection serves: ours, and
//! Envoy's ext_authz API compiled from the `.proto` files the envoy-types crate ships (its Rust
//! types are used as they are; only the descriptors for reflection are built here).
use prost::Message;
use std::path::{Path, PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);

    let fds = protox::compile(["proto/regionguard/v1/regionguard.proto"], ["proto"])?;
    std::fs::write(
        out_dir.join("regionguard_descriptor.bin"),
        fds.encode_to_vec(),
    )?;
    tonic_prost_build::configure()
        // A message that does not decode is the sender's error (INVALID_ARGUMENT), not INTERNAL.
        .codec_path("crate::grpc::codec::WireCodec")
        // Evidence maps hold a handful of entries each: a BTreeMap is one small node, where a
        // HashMap seeds a hasher and hashes every key (measured on the Classify answer path).
        .btree_map(".regionguard.v1.Reason.evidence")
        // serde on messages lets the CLI read and print requests and responses as JSON.
        .message_attribute(
            ".regionguard.v1",
            "#[derive(serde::Serialize, serde::Deserialize)] #[serde(default)]",
        )
        .compile_fds(fds)?;

    let envoy = envoy_proto_dir()?;
    let includes =
        ["data-plane-api", "xds", "googleapis", "protoc-gen-validate"].map(|d| envoy.join(d));
    let envoy_fds = protox::compile(["envoy/service/auth/v3/external_auth.proto"], includes)?;
    std::fs::write(
        out_dir.join("envoy_ext_authz_descriptor.bin"),
        envoy_fds.encode_to_vec(),
    )?;

    println!("cargo:rerun-if-changed=proto");
    println!("cargo:rerun-if-changed=Cargo.lock");
    println!("cargo:rerun-if-env-changed=REGIONGUARD_ENVOY_PROTO_DIR");
    Ok(())
}

/// The `proto/` folder of the envoy-types version in Cargo.lock, in Cargo's registry (or where
/// `REGIONGUARD_ENVOY_PROTO_DIR` says, e.g. for vendored builds).
fn envoy_proto_dir() -> Result<PathBuf, Box<dyn std::error::Error>> {
    if let Some(dir) = std::env::var_os("REGIONGUARD_ENVOY_PROTO_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let lock = std::fs::read_to_string("Cargo.lock")?;
    let version = lock
        .split("[[package]]")
        .find(|p| p.contains("name = \"envoy-types\""))
        .and_then(|p| {
            p.lines()
                .find_map(|l| l.strip_prefix("version = \"")?.strip_suffix('"'))
        })
        .ok_or("Cargo.lock names no envoy-types version")?;
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")))
        .ok_or("neither CARGO_HOME nor HOME is set")?;
    let registry = cargo_home.join("registry").join("src");
    for index in std::fs::read_dir(&registry)? {
        let candidate = index?
            .path()
            .join(format!("envoy-types-{version}"))
            .join("proto");
        if candidate.is_dir() {
            return Ok(candidate);
        }
    }
    Err(format!(
        "envoy-types {version} protos not found under {}; set REGIONGUARD_ENVOY_PROTO_DIR",
        registry.display()
    )
    .into())
}
