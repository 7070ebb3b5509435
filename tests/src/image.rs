//! Test container images built without Docker: one gzip layer holding Debian's static
//! busybox (`busybox-static`) and a few applet links, an OCI config, one manifest per
//! platform (the same layer for each: the registry never looks inside) and an index over them,
//! pushed to a registry with `shoal-registry`. Each platform's config sets
//! `SHOAL_TEST_PLATFORM=linux/ARCH[/VARIANT]`, so a test can tell which manifest was chosen.

use anyhow::{Context, Result};
use shoal_api::ids::Digest;
use shoal_api::oci::OciRef;
use shoal_registry::Registries;
use std::io::Write;

const BUSYBOX: &str = "/bin/busybox";
const APPLETS: [&str; 8] = ["sh", "echo", "sleep", "cat", "head", "tail", "true", "yes"];

/// The layer: `bin/busybox` and links to it. Returns (gzip bytes, diff id).
pub fn busybox_layer() -> Result<(Vec<u8>, Digest)> {
    let busybox = std::fs::read(BUSYBOX)
        .with_context(|| format!("{BUSYBOX} is missing (apt-get install busybox-static)"))?;
    let mut tar = tar::Builder::new(Vec::new());
    let mut dir = tar::Header::new_gnu();
    dir.set_entry_type(tar::EntryType::Directory);
    dir.set_mode(0o755);
    dir.set_size(0);
    dir.set_mtime(0);
    tar.append_data(&mut dir, "bin/", std::io::empty())?;
    let mut file = tar::Header::new_gnu();
    file.set_mode(0o755);
    file.set_size(busybox.len() as u64);
    file.set_mtime(0);
    tar.append_data(&mut file, "bin/busybox", busybox.as_slice())?;
    for applet in APPLETS {
        let mut link = tar::Header::new_gnu();
        link.set_entry_type(tar::EntryType::Symlink);
        link.set_mode(0o777);
        link.set_size(0);
        link.set_mtime(0);
        tar.append_link(&mut link, format!("bin/{applet}"), "busybox")?;
    }
    let raw = tar.into_inner()?;
    let diff_id = Digest::of(&raw);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&raw)?;
    Ok((gz.finish()?, diff_id))
}

/// Pushes a busybox image for `platforms` (`(architecture, variant)`, e.g. `("arm", Some("v7"))`)
/// as `r` (a tag); returns `r` pinned to its index.
pub async fn push_busybox(
    registries: &Registries,
    r: &OciRef,
    platforms: &[(&str, Option<&str>)],
) -> Result<OciRef> {
    let (layer, diff_id) = busybox_layer()?;
    let layer_size = layer.len();
    let layer_digest = registries.push_blob(r, layer).await?;
    let mut entries = Vec::new();
    for (arch, variant) in platforms {
        let platform_name = match variant {
            Some(v) => format!("linux/{arch}/{v}"),
            None => format!("linux/{arch}"),
        };
        let mut config = serde_json::json!({
            "architecture": arch,
            "os": "linux",
            "config": {
                "Env": ["PATH=/bin", format!("SHOAL_TEST_PLATFORM={platform_name}")],
                "Cmd": ["/bin/sh"],
            },
            "rootfs": { "type": "layers", "diff_ids": [diff_id.as_str()] },
        });
        if let Some(v) = variant {
            config["variant"] = serde_json::json!(v);
        }
        let config = serde_json::to_vec(&config)?;
        let config_size = config.len();
        let config_digest = registries.push_blob(r, config).await?;
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config_digest.as_str(),
                "size": config_size,
            },
            "layers": [{
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": layer_digest.as_str(),
                "size": layer_size,
            }],
        }))?;
        let size = manifest.len();
        let pinned = registries
            .push_manifest(r, "application/vnd.oci.image.manifest.v1+json", manifest)
            .await?;
        let mut platform = serde_json::json!({ "architecture": arch, "os": "linux" });
        if let Some(v) = variant {
            platform["variant"] = serde_json::json!(v);
        }
        entries.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": pinned.digest.map(|d| d.to_string()),
            "size": size,
            "platform": platform,
        }));
    }
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": entries,
    }))?;
    Ok(registries
        .push_manifest(r, "application/vnd.oci.image.index.v1+json", index)
        .await?)
}
