//! `cargo xtask image`: the image the Dockerfile describes, built here
//! without a container engine: the same cargo command, then Debian's umoci
//! assembles an OCI image from scratch with the Dockerfile's final stage
//! (labels, entrypoint) and writes it as an OCI archive, which containerd
//! (`ctr images import`), kind (`kind load image-archive`) and skopeo take.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, ensure, Context, Result};

use crate::{cargo, run, workspace_root};

pub const TARGET: &str = "x86_64-unknown-linux-musl";
/// An image above this is a regression: one static binary should stay well under.
pub const MAX_BYTES: u64 = 30 * 1024 * 1024;

/// What the Dockerfile's final stage says about the image.
#[derive(Debug, PartialEq)]
pub struct FinalStage {
    pub labels: Vec<(String, String)>,
    pub entrypoint: Vec<String>,
    /// Where the binary goes in the image.
    pub binary: String,
}

/// Read the final stage (`FROM scratch` on) of the Dockerfile.
pub fn final_stage(dockerfile: &str, version: &str) -> Result<FinalStage> {
    let start = dockerfile.rfind("\nFROM scratch").context("the Dockerfile's final stage is FROM scratch")?;
    let mut stage = FinalStage { labels: Vec::new(), entrypoint: Vec::new(), binary: String::new() };
    for line in dockerfile[start..].lines().map(str::trim) {
        if let Some(label) = line.strip_prefix("LABEL ") {
            let (key, value) = label.split_once('=').with_context(|| format!("LABEL without '=': {line}"))?;
            let value = value.trim_matches('"').replace("${VERSION}", version);
            stage.labels.push((key.to_string(), value));
        } else if let Some(list) = line.strip_prefix("ENTRYPOINT ") {
            stage.entrypoint =
                serde_json::from_str(list).with_context(|| format!("ENTRYPOINT is not a JSON list: {line}"))?;
        } else if let Some(copy) = line.strip_prefix("COPY --from=build ") {
            stage.binary = copy.split_whitespace().last().context("COPY without a destination")?.to_string();
        }
    }
    ensure!(!stage.entrypoint.is_empty() && !stage.binary.is_empty(), "the final stage needs COPY and ENTRYPOINT");
    Ok(stage)
}

/// Build the image; the archive's path.
pub fn build() -> Result<PathBuf> {
    let root = workspace_root();
    let version = env!("CARGO_PKG_VERSION");
    let stage = final_stage(&std::fs::read_to_string(root.join("Dockerfile"))?, version)?;
    cargo(&["build", "--locked", "--profile", "dist", "--target", TARGET, "-p", "bulkhead"])?;
    let binary = root.join("target").join(TARGET).join("dist/bulkhead");

    let out = root.join("target/image");
    let layout = out.join("layout");
    let bundle = out.join("bundle");
    for stale in [&layout, &bundle] {
        if stale.exists() {
            std::fs::remove_dir_all(stale).with_context(|| format!("removing {}", stale.display()))?;
        }
    }
    std::fs::create_dir_all(&out)?;
    let image = format!("{}:{version}", layout.display());
    let umoci = |args: &[&str]| run(Command::new("umoci").args(args));
    umoci(&["init", "--layout", &layout.display().to_string()])?;
    umoci(&["new", "--image", &image])?;
    umoci(&["unpack", "--image", &image, &bundle.display().to_string()])?;
    let inside = bundle.join("rootfs").join(stage.binary.trim_start_matches('/'));
    std::fs::copy(&binary, &inside).with_context(|| format!("copying {} into the image", binary.display()))?;
    umoci(&["repack", "--image", &image, &bundle.display().to_string()])?;
    let mut config: Vec<String> =
        ["config", "--image", &image, "--os", "linux", "--architecture", "amd64"].map(String::from).to_vec();
    config.push(format!("--config.entrypoint={}", stage.entrypoint.join(",")));
    config.push("--config.cmd=".into());
    for (key, value) in &stage.labels {
        config.push(format!("--config.label={key}={value}"));
        config.push(format!("--manifest.annotation={key}={value}"));
    }
    umoci(&config.iter().map(String::as_str).collect::<Vec<_>>())?;
    umoci(&["gc", "--layout", &layout.display().to_string()])?;
    std::fs::remove_dir_all(&bundle)?;
    verify(&layout, &image, &stage, &bundle)?;

    let archive = out.join(format!("bulkhead-{version}.oci.tar"));
    run(Command::new("tar").arg("-C").arg(&layout).arg("-cf").arg(&archive).arg("."))?;
    let size = std::fs::metadata(&archive)?.len();
    println!(
        "wrote {} ({:.1} MB; the binary {:.1} MB)",
        archive.display(),
        mb(size),
        mb(std::fs::metadata(&binary)?.len())
    );
    if size > MAX_BYTES {
        bail!("the image is {:.1} MB, over the {:.0} MB it must stay under", mb(size), mb(MAX_BYTES));
    }
    Ok(archive)
}

/// The image as a runtime would see it: its config runs the binary, which
/// runs (it is static: the empty base has no libc) and is this version.
fn verify(layout: &Path, image: &str, stage: &FinalStage, bundle: &Path) -> Result<()> {
    let config = config_of(layout)?;
    let entrypoint: Vec<String> = serde_json::from_value(config["config"]["Entrypoint"].clone())?;
    ensure!(entrypoint == stage.entrypoint, "the image's entrypoint is {entrypoint:?}, not {:?}", stage.entrypoint);
    for (key, value) in &stage.labels {
        ensure!(config["config"]["Labels"][key] == value.as_str(), "the image lacks the label {key}={value}");
    }
    run(Command::new("umoci").args(["unpack", "--image", image]).arg(bundle))?;
    let binary = bundle.join("rootfs").join(entrypoint[0].trim_start_matches('/'));
    let out =
        Command::new(&binary).arg("--version").output().with_context(|| format!("running {}", binary.display()))?;
    std::fs::remove_dir_all(bundle)?;
    let said = String::from_utf8_lossy(&out.stdout);
    ensure!(out.status.success() && said.contains(env!("CARGO_PKG_VERSION")), "the image's binary said {said:?}");
    println!("image: entrypoint {entrypoint:?} runs: {}", said.trim());
    Ok(())
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1024.0 / 1024.0
}

/// The image's config, read back from its layout.
fn config_of(layout: &Path) -> Result<serde_json::Value> {
    let blob = |digest: &str| -> Result<serde_json::Value> {
        let path = layout.join("blobs/sha256").join(digest.trim_start_matches("sha256:"));
        Ok(serde_json::from_slice(&std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?)?)
    };
    let index: serde_json::Value = serde_json::from_slice(&std::fs::read(layout.join("index.json"))?)?;
    let manifest = blob(index["manifests"][0]["digest"].as_str().context("index.json names a manifest")?)?;
    blob(manifest["config"]["digest"].as_str().context("the manifest names a config")?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_final_stage_is_read_from_the_dockerfile() {
        let dockerfile = std::fs::read_to_string(workspace_root().join("Dockerfile")).unwrap();
        let stage = final_stage(&dockerfile, "9.9.9").unwrap();
        assert_eq!(stage.entrypoint, ["/bulkhead"]);
        assert_eq!(stage.binary, "/bulkhead");
        let label = |key: &str| stage.labels.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str());
        assert_eq!(label("org.opencontainers.image.version"), Some("9.9.9"));
        assert_eq!(label("org.opencontainers.image.licenses"), Some("Apache-2.0"));
        assert!(label("org.opencontainers.image.source").is_some_and(|s| s.starts_with("https://")));
        assert!(
            dockerfile.contains(&format!("--profile dist --target {TARGET} -p bulkhead")),
            "the Dockerfile builds what xtask builds"
        );
    }
}
