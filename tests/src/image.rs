//! Test container images built without Docker: one gzip layer holding Debian's static
//! busybox (`busybox-static`) and a few applet links, an OCI config, one manifest per
//! platform (the same layer for each: the registry never looks inside) and an index over them,
//! pushed to a registry with `shoal-registry`. Each platform's config sets
//! `SHOAL_TEST_PLATFORM=linux/ARCH[/VARIANT]`, so a test can tell which manifest was chosen.
//! [`push_busybox_with`] adds a second layer of files (an `/etc/passwd`, say) and a `USER`.

use anyhow::{Context, Result};
use shoal_api::model::ids::Digest;
use shoal_api::model::oci::OciRef;
use shoal_registry::Registries;
use std::io::Write;

const BUSYBOX: &str = "/bin/busybox";
const APPLETS: [&str; 9] = [
    "sh", "echo", "sleep", "cat", "head", "tail", "true", "yes", "id",
];

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

/// A layer of regular files (`(path, content)`, e.g. `("etc/passwd", "…")`), their parent
/// directories first. Returns (gzip bytes, diff id).
pub fn files_layer(files: &[(&str, &str)]) -> Result<(Vec<u8>, Digest)> {
    let mut tar = tar::Builder::new(Vec::new());
    let mut dirs: Vec<&str> = Vec::new();
    for (path, _) in files {
        let mut parent = std::path::Path::new(path);
        while let Some(p) = parent.parent().filter(|p| !p.as_os_str().is_empty()) {
            let p = p.to_str().context("a non-UTF-8 path")?;
            if !dirs.contains(&p) {
                dirs.push(p);
            }
            parent = std::path::Path::new(p);
        }
    }
    dirs.sort_by_key(|d| d.len());
    for d in dirs {
        let mut dir = tar::Header::new_gnu();
        dir.set_entry_type(tar::EntryType::Directory);
        dir.set_mode(0o755);
        dir.set_size(0);
        dir.set_mtime(0);
        tar.append_data(&mut dir, format!("{d}/"), std::io::empty())?;
    }
    for (path, content) in files {
        let mut file = tar::Header::new_gnu();
        file.set_mode(0o644);
        file.set_size(content.len() as u64);
        file.set_mtime(0);
        tar.append_data(&mut file, path, content.as_bytes())?;
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
    push_busybox_with(registries, r, platforms, &[], None).await
}

/// [`push_busybox`] with a second layer holding `files` (none: no second layer) and the
/// config's `User` set to `user`.
pub async fn push_busybox_with(
    registries: &Registries,
    r: &OciRef,
    platforms: &[(&str, Option<&str>)],
    files: &[(&str, &str)],
    user: Option<&str>,
) -> Result<OciRef> {
    let mut layers = vec![busybox_layer()?];
    if !files.is_empty() {
        layers.push(files_layer(files)?);
    }
    let mut pushed = Vec::new();
    for (bytes, diff_id) in layers {
        let size = bytes.len();
        let digest = registries.push_blob(r, bytes).await?;
        pushed.push((digest, size, diff_id));
    }
    let diff_ids: Vec<&str> = pushed.iter().map(|(_, _, d)| d.as_str()).collect();
    let layer_descriptors: Vec<serde_json::Value> = pushed
        .iter()
        .map(|(digest, size, _)| {
            serde_json::json!({
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": digest.as_str(),
                "size": size,
            })
        })
        .collect();
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
            "rootfs": { "type": "layers", "diff_ids": diff_ids },
        });
        if let Some(v) = variant {
            config["variant"] = serde_json::json!(v);
        }
        if let Some(u) = user {
            config["config"]["User"] = serde_json::json!(u);
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
            "layers": layer_descriptors,
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
