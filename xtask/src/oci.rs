//! The agent as an OCI image, built without Docker: one image per board architecture and an
//! image index over them, written as an OCI image layout in a tar. `ctr images import`
//! loads it into containerd (`--all-platforms` for every architecture), and `ctr images
//! push` (or skopeo, crane, oras) pushes the index and its images to a registry.
//!
//! Each image has one layer: the stripped agent at `/usr/bin/shoal-agent`, the packaged
//! `/etc/shoal/agent.toml`, and the C runtime the binary links (its program interpreter,
//! `libc.so.6`, `libm.so.6`, `libgcc_s.so.1`) taken from the target's Debian sysroot: the
//! distroless shape, with nothing else in the image. Layer tars are reproducible (owner 0,
//! time 0, sorted), so the same binaries give the same digests.

use anyhow::{Context, Result};
use oci_spec::image::{
    Arch, ConfigBuilder, Descriptor, DescriptorBuilder, ImageConfigurationBuilder,
    ImageIndexBuilder, ImageManifestBuilder, MediaType, Os, PlatformBuilder, RootFsBuilder,
};
use sha2::{Digest as _, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

/// One architecture's image.
pub struct Image {
    pub arch: Arch,
    pub variant: Option<&'static str>,
    /// Files of the layer: path in the image → (source on this machine, mode).
    pub files: BTreeMap<String, (PathBuf, u32)>,
}

/// Content-addressed blobs of the layout.
#[derive(Default)]
struct Blobs(BTreeMap<String, Vec<u8>>);

impl Blobs {
    fn add(&mut self, media_type: MediaType, bytes: Vec<u8>) -> Result<Descriptor> {
        let hex = hex::encode(Sha256::digest(&bytes));
        let d = DescriptorBuilder::default()
            .media_type(media_type)
            .size(bytes.len() as u64)
            .digest(format!("sha256:{hex}").parse::<oci_spec::image::Digest>()?)
            .build()?;
        self.0.insert(hex, bytes);
        Ok(d)
    }
}

/// A reproducible tar of `files`, with their parent directories, plus empty directories the
/// agent needs (`/tmp`, its data directory, `/run/shoal`).
fn layer_tar(files: &BTreeMap<String, (PathBuf, u32)>) -> Result<Vec<u8>> {
    let mut dirs: BTreeMap<String, u32> = BTreeMap::new();
    for path in files.keys() {
        let mut p = Path::new(path).parent();
        while let Some(d) = p.filter(|d| !d.as_os_str().is_empty()) {
            dirs.entry(d.display().to_string()).or_insert(0o755);
            p = d.parent();
        }
    }
    for (d, mode) in [
        ("tmp", 0o1777),
        ("var", 0o755),
        ("var/lib", 0o755),
        ("var/lib/shoal-agent", 0o700),
        ("run", 0o755),
        ("run/shoal", 0o700),
    ] {
        dirs.insert(d.to_string(), mode);
    }
    let mut tar = tar::Builder::new(Vec::new());
    let header = |kind: tar::EntryType, size: u64, mode: u32| {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h
    };
    for (d, mode) in &dirs {
        let mut h = header(tar::EntryType::Directory, 0, *mode);
        tar.append_data(&mut h, format!("{d}/"), std::io::empty())?;
    }
    for (path, (src, mode)) in files {
        let bytes = std::fs::read(src).with_context(|| format!("cannot read {}", src.display()))?;
        let mut h = header(tar::EntryType::Regular, bytes.len() as u64, *mode);
        tar.append_data(&mut h, path, bytes.as_slice())?;
    }
    Ok(tar.into_inner()?)
}

/// Writes `images` and their index as an OCI image layout tar at `out`, named `name:tag`.
pub fn write_layout(out: &Path, name: &str, tag: &str, images: &[Image]) -> Result<()> {
    let mut blobs = Blobs::default();
    let mut manifests = Vec::new();
    for img in images {
        let tar = layer_tar(&img.files)?;
        let diff_id = format!("sha256:{}", hex::encode(Sha256::digest(&tar)));
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        gz.write_all(&tar)?;
        let layer = blobs.add(MediaType::ImageLayerGzip, gz.finish()?)?;
        let labels: HashMap<String, String> = [
            ("org.opencontainers.image.title", "shoal-agent"),
            ("org.opencontainers.image.version", tag),
            (
                "org.opencontainers.image.description",
                "Shoal edge agent: runs the WASM modules and containers a Shoal hub schedules",
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let config = ConfigBuilder::default()
            .entrypoint(vec!["/usr/bin/shoal-agent".to_string()])
            .cmd(vec![
                "run".to_string(),
                "--config".to_string(),
                "/etc/shoal/agent.toml".to_string(),
            ])
            .env(vec!["PATH=/usr/bin".to_string()])
            .volumes(vec!["/var/lib/shoal-agent".to_string()])
            .labels(labels)
            .build()?;
        let mut cfg = ImageConfigurationBuilder::default()
            .architecture(img.arch.clone())
            .os(Os::Linux)
            .config(config)
            .rootfs(
                RootFsBuilder::default()
                    .typ("layers")
                    .diff_ids(vec![diff_id])
                    .build()?,
            );
        if let Some(v) = img.variant {
            cfg = cfg.variant(v);
        }
        let cfg = blobs.add(MediaType::ImageConfig, serde_json::to_vec(&cfg.build()?)?)?;
        let manifest = ImageManifestBuilder::default()
            .schema_version(2u32)
            .media_type(MediaType::ImageManifest)
            .config(cfg)
            .layers(vec![layer])
            .build()?;
        let mut d = blobs.add(MediaType::ImageManifest, serde_json::to_vec(&manifest)?)?;
        let mut platform = PlatformBuilder::default()
            .architecture(img.arch.clone())
            .os(Os::Linux);
        if let Some(v) = img.variant {
            platform = platform.variant(v);
        }
        d.set_platform(Some(platform.build()?));
        manifests.push(d);
    }
    let index = ImageIndexBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageIndex)
        .manifests(manifests)
        .build()?;
    let mut top = blobs.add(MediaType::ImageIndex, serde_json::to_vec(&index)?)?;
    top.set_annotations(Some(
        [
            ("org.opencontainers.image.ref.name", tag.to_string()),
            ("io.containerd.image.name", format!("{name}:{tag}")),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect(),
    ));
    let layout_index = ImageIndexBuilder::default()
        .schema_version(2u32)
        .manifests(vec![top])
        .build()?;

    let file =
        std::fs::File::create(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut tar = tar::Builder::new(file);
    let mut put = |path: &str, bytes: &[u8]| -> Result<()> {
        let mut h = tar::Header::new_ustar();
        h.set_size(bytes.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(0);
        tar.append_data(&mut h, path, bytes)?;
        Ok(())
    };
    put("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    put("index.json", &serde_json::to_vec(&layout_index)?)?;
    for (hex, bytes) in &blobs.0 {
        put(&format!("blobs/sha256/{hex}"), bytes)?;
    }
    tar.into_inner()?.flush()?;
    Ok(())
}
