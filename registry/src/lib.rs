//! Shoal's OCI registry client, the only code that names `oci-client`.
//!
//! - [`Registries::resolve`] pins a tag to its manifest digest (what `shoal apply` does before
//!   it sends a manifest, so that every device runs the same bytes).
//! - [`Registries::pull_wasm`] fetches a pinned WASM artifact: the manifest by digest, then
//!   its one wasm layer, each verified against its digest and a size cap, written atomically.
//! - [`Registries::push_wasm`] publishes a module or component in the layout of the CNCF
//!   "Wasm OCI Artifact" spec (what `wkg oci push` writes): an OCI image manifest with config
//!   `application/vnd.wasm.config.v0+json` and one `application/wasm` layer.
//!
//! Transport policy: HTTPS always, except for registries on loopback addresses and those
//! named as insecure (`--insecure-registry HOST:PORT`), which may use plain HTTP, as Docker
//! allows. One `oci-client` client per registry, so each gets its own credentials and
//! protocol (the crate stores credentials per registry and keeps the first it is given).

use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::manifest::{OciImageManifest, OCI_IMAGE_INDEX_MEDIA_TYPE, OCI_IMAGE_MEDIA_TYPE};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use shoal_api::model::ids::Digest;
use shoal_api::model::oci::{OciRef, Platform};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Mutex;
use tokio::io::AsyncWriteExt;

/// Layer media types taken as a wasm module or component on pull: the CNCF one first, then
/// those of wasm-to-oci and of older wasmCloud releases.
pub const WASM_LAYER_TYPES: [&str; 3] = [
    "application/wasm",
    "application/vnd.wasm.content.layer.v1+wasm",
    "application/vnd.module.wasm.content.layer.v1+wasm",
];
/// The config media type of the CNCF layout.
pub const WASM_CONFIG_TYPE: &str = "application/vnd.wasm.config.v0+json";
/// Largest module pulled unless configured otherwise.
pub const DEFAULT_MAX_MODULE_BYTES: u64 = 256 << 20;

/// Manifest media types asked for (docker-registry answers 404 to a GET that does not accept
/// the OCI ones).
const MANIFEST_TYPES: [&str; 4] = [
    OCI_IMAGE_MEDIA_TYPE,
    OCI_IMAGE_INDEX_MEDIA_TYPE,
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("{reference} is not pinned: pulls need an @sha256: manifest digest")]
    Unpinned { reference: String },
    #[error("{reference}: {reason}")]
    Registry { reference: String, reason: String },
    #[error("{reference} is not a wasm artifact: {reason}")]
    NotWasm { reference: String, reason: String },
    #[error("{reference}: {what} {expected} failed verification: its content hashes to {actual}")]
    Digest {
        reference: String,
        what: &'static str,
        expected: String,
        actual: String,
    },
    #[error("{reference}: {what} is larger than {limit} bytes")]
    TooLarge {
        reference: String,
        what: &'static str,
        limit: u64,
    },
    #[error("{path:?}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

/// Credentials for one registry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

/// How to reach registries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegistryConfig {
    /// `host:port` of registries that may be reached over plain HTTP (loopback ones always may).
    pub insecure: Vec<String>,
    /// Per `host[:port]`.
    pub credentials: BTreeMap<String, Credentials>,
    /// For registries without their own entry (a command line given one user).
    pub default_credentials: Option<Credentials>,
    /// Largest module [`Registries::pull_wasm`] accepts; 0 means the default.
    pub max_module_bytes: u64,
}

/// What a push published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pushed {
    /// The reference pinned to the manifest digest.
    pub reference: OciRef,
    /// The wasm layer's digest (the module's own sha256).
    pub layer: Digest,
}

/// A container image pulled for one platform: every blob verified and written under a
/// directory, ready to be handed to a container runtime.
#[derive(Debug, Clone)]
pub struct PulledImage {
    /// The pinned reference it was pulled as.
    pub reference: OciRef,
    /// The index the reference pins, when it pins one: (media type, bytes).
    pub index: Option<(String, Vec<u8>)>,
    /// The platform manifest: (media type, bytes, digest).
    pub manifest: (String, Vec<u8>, Digest),
    /// The image config: (media type, bytes, digest).
    pub config: (String, Vec<u8>, Digest),
    /// Layers in order: media type, digest, size, and the file holding it.
    pub layers: Vec<PulledLayer>,
}

#[derive(Debug, Clone)]
pub struct PulledLayer {
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    pub path: std::path::PathBuf,
}

/// A set of registries, with one client each (created on first use).
pub struct Registries {
    config: RegistryConfig,
    clients: Mutex<HashMap<String, Client>>,
}

impl std::fmt::Debug for Registries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registries")
            .field("insecure", &self.config.insecure)
            .field("credentials", &self.config.credentials.keys())
            .finish()
    }
}

/// Installs the process-wide rustls crypto provider (ring), which every reqwest client of the
/// process needs once this crate is linked: cargo unifies reqwest's features, so even a
/// plain-HTTP client panics without one. ring cross-compiles to ARM with just gcc. Calling it
/// again is harmless.
pub fn install_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

impl Registries {
    pub fn new(config: RegistryConfig) -> Self {
        install_crypto();
        Self {
            config,
            clients: Mutex::new(HashMap::new()),
        }
    }

    /// Whether plain HTTP is allowed to `r`'s registry.
    pub fn allows_http(&self, r: &OciRef) -> bool {
        r.is_loopback() || self.config.insecure.contains(&r.registry)
    }

    fn client(&self, r: &OciRef) -> Result<Client, RegistryError> {
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = clients.get(&r.registry) {
            return Ok(c.clone());
        }
        let protocol = if self.allows_http(r) {
            ClientProtocol::HttpsExcept(vec![r.registry.clone()])
        } else {
            ClientProtocol::Https
        };
        let config = ClientConfig {
            protocol,
            connect_timeout: Some(std::time::Duration::from_secs(10)),
            read_timeout: Some(std::time::Duration::from_secs(60)),
            ..Default::default()
        };
        let client = Client::try_from(config).map_err(|e| RegistryError::Registry {
            reference: r.to_string(),
            reason: format!("cannot build a client: {e}"),
        })?;
        clients.insert(r.registry.clone(), client.clone());
        Ok(client)
    }

    fn auth(&self, r: &OciRef) -> RegistryAuth {
        match self
            .config
            .credentials
            .get(&r.registry)
            .or(self.config.default_credentials.as_ref())
        {
            Some(c) => RegistryAuth::Basic(c.username.clone(), c.password.clone()),
            None => RegistryAuth::Anonymous,
        }
    }

    fn reference(r: &OciRef) -> Result<Reference, RegistryError> {
        r.without_scheme()
            .parse::<Reference>()
            .map_err(|e| RegistryError::Registry {
                reference: r.to_string(),
                reason: format!("unusable reference: {e}"),
            })
    }

    fn failed(r: &OciRef, what: &str, e: impl std::error::Error) -> RegistryError {
        // The whole cause chain: "error sending request" alone says nothing.
        let mut reason = format!("{what}: {e}");
        let mut source = e.source();
        while let Some(s) = source {
            reason.push_str(&format!(": {s}"));
            source = s.source();
        }
        RegistryError::Registry {
            reference: r.to_string(),
            reason,
        }
    }

    /// The manifest digest `r` points at now (a tag's current target).
    pub async fn resolve(&self, r: &OciRef) -> Result<Digest, RegistryError> {
        let client = self.client(r)?;
        let reference = Self::reference(r)?;
        let (_, digest) = client
            .pull_manifest_raw(&reference, &self.auth(r), &MANIFEST_TYPES)
            .await
            .map_err(|e| Self::failed(r, "cannot fetch the manifest", e))?;
        digest
            .parse::<Digest>()
            .map_err(|e| Self::failed(r, "the registry gave a bad digest", e))
    }

    /// Pins a container image: its manifest (or index) digest and the platforms it offers,
    /// from the index entries or, for a single-platform image, from its config.
    pub async fn resolve_image(
        &self,
        r: &OciRef,
    ) -> Result<(Digest, Vec<shoal_api::model::oci::Platform>), RegistryError> {
        let client = self.client(r)?;
        let reference = Self::reference(r)?;
        let auth = self.auth(r);
        let (bytes, digest) = client
            .pull_manifest_raw(&reference, &auth, &MANIFEST_TYPES)
            .await
            .map_err(|e| Self::failed(r, "cannot fetch the manifest", e))?;
        let digest = digest
            .parse::<Digest>()
            .map_err(|e| Self::failed(r, "the registry gave a bad digest", e))?;
        let value: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| Self::failed(r, "the manifest is not JSON", e))?;
        let mut platforms = Vec::new();
        let mut add =
            |os: &serde_json::Value, arch: &serde_json::Value, variant: &serde_json::Value| {
                let text = match variant.as_str() {
                    Some(v) => format!(
                        "{}/{}/{v}",
                        os.as_str().unwrap_or(""),
                        arch.as_str().unwrap_or("")
                    ),
                    None => format!(
                        "{}/{}",
                        os.as_str().unwrap_or(""),
                        arch.as_str().unwrap_or("")
                    ),
                };
                // Attestation entries say unknown/unknown; anything unparsable is skipped too.
                if let Ok(p) = text.parse::<shoal_api::model::oci::Platform>() {
                    if p.os != "unknown" && !platforms.contains(&p) {
                        platforms.push(p);
                    }
                }
            };
        if let Some(entries) = value["manifests"].as_array() {
            for e in entries {
                let p = &e["platform"];
                add(&p["os"], &p["architecture"], &p["variant"]);
            }
        } else {
            let config = value["config"]["digest"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            let mut out = Vec::new();
            client
                .pull_blob(&reference, config.as_str(), &mut out)
                .await
                .map_err(|e| Self::failed(r, "cannot fetch the image config", e))?;
            let c: serde_json::Value = serde_json::from_slice(&out)
                .map_err(|e| Self::failed(r, "the image config is not JSON", e))?;
            add(&c["os"], &c["architecture"], &c["variant"]);
        }
        Ok((digest, platforms))
    }

    /// Pulls the pinned image `r` for Linux on `arch` (Rust's `std::env::consts::ARCH`) and
    /// `variant` (see `shoal_api::model::oci::choose_platform`): the index (if `r` pins one) and the
    /// matching platform manifest, checked against their digests; the config and layers streamed into `dir` and checked against theirs. Layers
    /// already in `dir` (verified earlier) are not fetched again.
    pub async fn pull_image(
        &self,
        r: &OciRef,
        arch: &str,
        variant: Option<&str>,
        dir: &Path,
    ) -> Result<PulledImage, RegistryError> {
        let Some(pin) = &r.digest else {
            return Err(RegistryError::Unpinned {
                reference: r.to_string(),
            });
        };
        let client = self.client(r)?;
        let auth = self.auth(r);
        let reference = Self::reference(r)?;
        let (bytes, _) = client
            .pull_manifest_raw(&reference, &auth, &MANIFEST_TYPES)
            .await
            .map_err(|e| Self::failed(r, "cannot fetch the manifest", e))?;
        check_digest(r, "manifest", pin, &bytes)?;
        let value: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| Self::failed(r, "the manifest is not JSON", e))?;
        let media = |v: &serde_json::Value| v["mediaType"].as_str().unwrap_or_default().to_string();
        let (index, manifest) = if let Some(entries) = value["manifests"].as_array() {
            // Entries without a readable platform (attestations, say) never match.
            let platforms: Vec<Platform> = entries
                .iter()
                .map(|e| {
                    let p = &e["platform"];
                    Platform {
                        os: p["os"].as_str().unwrap_or("unknown").to_string(),
                        architecture: p["architecture"].as_str().unwrap_or("unknown").to_string(),
                        variant: p["variant"].as_str().map(str::to_string),
                    }
                })
                .collect();
            let entry = shoal_api::model::oci::choose_platform(&platforms, arch, variant)
                .and_then(|i| entries.get(i))
                .ok_or_else(|| RegistryError::Registry {
                    reference: r.to_string(),
                    reason: format!(
                        "the image index has no manifest for linux/{}{} (it has: {})",
                        shoal_api::model::oci::oci_arch(arch),
                        variant.map(|v| format!("/{v}")).unwrap_or_default(),
                        platforms
                            .iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                })?;
            let digest: Digest = entry["digest"]
                .as_str()
                .unwrap_or_default()
                .parse()
                .map_err(|e| Self::failed(r, "the index names a bad digest", e))?;
            let child = r.pinned(digest.clone());
            let (child_bytes, _) = client
                .pull_manifest_raw(&Self::reference(&child)?, &auth, &MANIFEST_TYPES)
                .await
                .map_err(|e| Self::failed(r, "cannot fetch the platform manifest", e))?;
            check_digest(r, "platform manifest", &digest, &child_bytes)?;
            let child_value: serde_json::Value = serde_json::from_slice(&child_bytes)
                .map_err(|e| Self::failed(r, "the platform manifest is not JSON", e))?;
            (
                Some((media(&value), bytes.to_vec())),
                (
                    media(&child_value),
                    child_bytes.to_vec(),
                    digest,
                    child_value,
                ),
            )
        } else {
            (None, (media(&value), bytes.to_vec(), pin.clone(), value))
        };
        let (manifest_type, manifest_bytes, manifest_digest, manifest_value) = manifest;
        let descriptor = |v: &serde_json::Value| -> Result<(String, Digest, u64), RegistryError> {
            let digest = v["digest"]
                .as_str()
                .unwrap_or_default()
                .parse::<Digest>()
                .map_err(|e| Self::failed(r, "the manifest names a bad digest", e))?;
            Ok((media(v), digest, v["size"].as_u64().unwrap_or(0)))
        };
        tokio::fs::create_dir_all(dir)
            .await
            .map_err(|source| RegistryError::Io {
                path: dir.display().to_string(),
                source,
            })?;
        let (config_type, config_digest, _) = descriptor(&manifest_value["config"])?;
        let config_path = self
            .pull_blob_to(&client, &reference, r, &config_digest, 1 << 20, dir)
            .await?;
        let config_bytes =
            tokio::fs::read(&config_path)
                .await
                .map_err(|source| RegistryError::Io {
                    path: config_path.display().to_string(),
                    source,
                })?;
        let mut layers = Vec::new();
        for l in manifest_value["layers"].as_array().into_iter().flatten() {
            let (media_type, digest, size) = descriptor(l)?;
            let path = self
                .pull_blob_to(&client, &reference, r, &digest, u64::MAX, dir)
                .await?;
            layers.push(PulledLayer {
                media_type,
                digest,
                size,
                path,
            });
        }
        Ok(PulledImage {
            reference: r.clone(),
            index,
            manifest: (manifest_type, manifest_bytes, manifest_digest),
            config: (config_type, config_bytes, config_digest),
            layers,
        })
    }

    /// Streams blob `digest` into `dir/<hex>` unless it is there already, verifying it.
    async fn pull_blob_to(
        &self,
        client: &Client,
        reference: &Reference,
        r: &OciRef,
        digest: &Digest,
        limit: u64,
        dir: &Path,
    ) -> Result<std::path::PathBuf, RegistryError> {
        let dest = dir.join(digest.hex());
        if tokio::fs::try_exists(&dest).await.unwrap_or(false) {
            return Ok(dest);
        }
        let stream = client
            .pull_blob_stream(reference, digest.as_str())
            .await
            .map_err(|e| Self::failed(r, "cannot fetch a blob", e))?;
        write_verified(r, stream, digest, limit, &dest).await?;
        Ok(dest)
    }

    /// A client for `r`'s registry, authenticated for pushing to its repository.
    async fn pusher(&self, r: &OciRef) -> Result<(Client, Reference), RegistryError> {
        let client = self.client(r)?;
        let reference = Self::reference(r)?;
        client
            .auth(
                &reference,
                &self.auth(r),
                oci_client::RegistryOperation::Push,
            )
            .await
            .map_err(|e| Self::failed(r, "authentication failed", e))?;
        Ok((client, reference))
    }

    /// Uploads one blob to `r`'s repository (for publishing images built elsewhere).
    pub async fn push_blob(&self, r: &OciRef, bytes: Vec<u8>) -> Result<Digest, RegistryError> {
        let (client, reference) = self.pusher(r).await?;
        let digest = Digest::of(&bytes);
        client
            .push_blob(&reference, bytes, digest.as_str())
            .await
            .map_err(|e| Self::failed(r, "cannot upload a blob", e))?;
        Ok(digest)
    }

    /// Uploads a manifest or index given as bytes (its blobs pushed already) and tags it
    /// as `r`; returns `r` pinned to its digest.
    pub async fn push_manifest(
        &self,
        r: &OciRef,
        media_type: &str,
        bytes: Vec<u8>,
    ) -> Result<OciRef, RegistryError> {
        let (client, reference) = self.pusher(r).await?;
        let digest = Digest::of(&bytes);
        let content_type = http::HeaderValue::from_str(media_type)
            .map_err(|e| Self::failed(r, "bad media type", e))?;
        client
            .push_manifest_raw(&reference, bytes, content_type)
            .await
            .map_err(|e| Self::failed(r, "cannot upload the manifest", e))?;
        Ok(r.pinned(digest))
    }

    /// Pulls the pinned wasm artifact `r` into `dest` (written atomically, only once
    /// verified). Returns the wasm layer's digest.
    pub async fn pull_wasm(&self, r: &OciRef, dest: &Path) -> Result<Digest, RegistryError> {
        let Some(pin) = &r.digest else {
            return Err(RegistryError::Unpinned {
                reference: r.to_string(),
            });
        };
        let client = self.client(r)?;
        let reference = Self::reference(r)?;
        let auth = self.auth(r);
        let (bytes, _) = client
            .pull_manifest_raw(&reference, &auth, &MANIFEST_TYPES)
            .await
            .map_err(|e| Self::failed(r, "cannot fetch the manifest", e))?;
        check_digest(r, "manifest", pin, &bytes)?;
        let layer = wasm_layer(r, &bytes)?;
        let limit = match self.config.max_module_bytes {
            0 => DEFAULT_MAX_MODULE_BYTES,
            n => n,
        };
        if u64::try_from(layer.size).unwrap_or(u64::MAX) > limit {
            return Err(RegistryError::TooLarge {
                reference: r.to_string(),
                what: "the wasm layer",
                limit,
            });
        }
        let expected: Digest = layer
            .digest
            .parse()
            .map_err(|e| Self::failed(r, "the manifest names a bad layer digest", e))?;
        let stream = client
            .pull_blob_stream(&reference, &layer)
            .await
            .map_err(|e| Self::failed(r, "cannot fetch the wasm layer", e))?;
        write_verified(r, stream, &expected, limit, dest).await?;
        Ok(expected)
    }

    /// Publishes `wasm` (a module or component) at `r` (a tag). Returns `r` pinned.
    pub async fn push_wasm(&self, r: &OciRef, wasm: Vec<u8>) -> Result<Pushed, RegistryError> {
        let kind = shoal_api::model::wasm::kind(&wasm).map_err(|e| RegistryError::NotWasm {
            reference: r.to_string(),
            reason: e.to_string(),
        })?;
        let layer_size = wasm.len();
        let layer = self.push_blob(r, wasm).await?;
        let config = wasm_config(&layer, kind, std::time::SystemTime::now());
        let config_size = config.len();
        let config_digest = self.push_blob(r, config).await?;
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_IMAGE_MEDIA_TYPE,
            "config": {
                "mediaType": WASM_CONFIG_TYPE,
                "digest": config_digest.as_str(),
                "size": config_size,
            },
            "layers": [{
                "mediaType": WASM_LAYER_TYPES[0],
                "digest": layer.as_str(),
                "size": layer_size,
            }],
        });
        // Serialized here, so the digest is of exactly the bytes the registry stores.
        let body = serde_json::to_vec(&manifest).map_err(|e| Self::failed(r, "manifest", e))?;
        let reference = self.push_manifest(r, OCI_IMAGE_MEDIA_TYPE, body).await?;
        Ok(Pushed { reference, layer })
    }
}

fn check_digest(
    r: &OciRef,
    what: &'static str,
    expected: &Digest,
    bytes: &[u8],
) -> Result<(), RegistryError> {
    let actual = Digest::of(bytes);
    if actual == *expected {
        Ok(())
    } else {
        Err(RegistryError::Digest {
            reference: r.to_string(),
            what,
            expected: expected.to_string(),
            actual: actual.to_string(),
        })
    }
}

/// Streams a blob into a temporary file next to `dest`, hashing it on the way, and renames
/// it only once the digest matches: a cut or tampered download never becomes the blob.
async fn write_verified(
    r: &OciRef,
    mut stream: oci_client::client::SizedStream,
    expected: &Digest,
    limit: u64,
    dest: &Path,
) -> Result<(), RegistryError> {
    use futures_util::StreamExt;
    let tmp = dest.with_extension(format!("part-{}", rand::random::<u32>()));
    let io = |p: &Path| {
        let path = p.display().to_string();
        move |source| RegistryError::Io { path, source }
    };
    let result = async {
        let mut file = tokio::fs::File::create(&tmp).await.map_err(io(&tmp))?;
        let mut hash = Sha256::new();
        let mut total = 0u64;
        while let Some(chunk) = stream.next().await {
            // oci-client checks the digest too and reports a mismatch as a stream error.
            let chunk = chunk.map_err(|e| RegistryError::Registry {
                reference: r.to_string(),
                reason: format!("blob {expected} failed verification or its download broke: {e}"),
            })?;
            total += chunk.len() as u64;
            if total > limit {
                return Err(RegistryError::TooLarge {
                    reference: r.to_string(),
                    what: "a blob",
                    limit,
                });
            }
            hash.update(&chunk);
            file.write_all(&chunk).await.map_err(io(&tmp))?;
        }
        let actual = format!("sha256:{}", hex::encode(hash.finalize()));
        if actual != expected.as_str() {
            return Err(RegistryError::Digest {
                reference: r.to_string(),
                what: "blob",
                expected: expected.to_string(),
                actual,
            });
        }
        file.sync_all().await.map_err(io(&tmp))?;
        tokio::fs::rename(&tmp, dest).await.map_err(io(dest))?;
        Ok(())
    }
    .await;
    if result.is_err() {
        let _ = tokio::fs::remove_file(&tmp).await;
    }
    result
}

/// The one wasm layer of the manifest `bytes`.
fn wasm_layer(
    r: &OciRef,
    bytes: &[u8],
) -> Result<oci_client::manifest::OciDescriptor, RegistryError> {
    let not_wasm = |reason: String| RegistryError::NotWasm {
        reference: r.to_string(),
        reason,
    };
    let value: serde_json::Value = serde_json::from_slice(bytes)
        .map_err(|e| not_wasm(format!("the manifest is not JSON: {e}")))?;
    let media = value["mediaType"].as_str().unwrap_or_default();
    if media == OCI_IMAGE_INDEX_MEDIA_TYPE || value.get("manifests").is_some() {
        return Err(not_wasm(
            "it is an image index (a multi-platform container image?), not a single artifact"
                .into(),
        ));
    }
    let manifest: OciImageManifest = serde_json::from_value(value)
        .map_err(|e| not_wasm(format!("the manifest is not an OCI image manifest: {e}")))?;
    let mut wasm = manifest
        .layers
        .iter()
        .filter(|l| WASM_LAYER_TYPES.contains(&l.media_type.as_str()));
    match (wasm.next(), wasm.next()) {
        (Some(l), None) => Ok(l.clone()),
        (None, _) => {
            let types: Vec<&str> = manifest
                .layers
                .iter()
                .map(|l| l.media_type.as_str())
                .collect();
            Err(not_wasm(format!(
                "no layer has a wasm media type ({}); its layers are {types:?}",
                WASM_LAYER_TYPES.join(", ")
            )))
        }
        (Some(_), Some(_)) => Err(not_wasm(
            "it has several wasm layers (a Spin application?); expected exactly one".into(),
        )),
    }
}

/// The config blob of the CNCF layout. `exports`/`imports` are left empty: filling them
/// needs a WIT decoder, and no puller we know of relies on them.
fn wasm_config(
    layer: &Digest,
    kind: shoal_api::model::wasm::Kind,
    now: std::time::SystemTime,
) -> Vec<u8> {
    let component = matches!(kind, shoal_api::model::wasm::Kind::Component);
    let config = serde_json::json!({
        "created": humantime::format_rfc3339_seconds(now).to_string(),
        "author": null,
        "architecture": "wasm",
        "os": if component { "wasip2" } else { "wasip1" },
        "layerDigests": [layer.as_str()],
        "component": if component {
            serde_json::json!({ "exports": [], "imports": [], "target": null })
        } else {
            serde_json::Value::Null
        },
    });
    serde_json::to_vec(&config).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(s: &str) -> OciRef {
        s.parse().unwrap()
    }

    #[test]
    fn plain_http_only_for_loopback_and_named_registries() {
        let regs = Registries::new(RegistryConfig {
            insecure: vec!["lab.example:5000".into()],
            ..Default::default()
        });
        assert!(regs.allows_http(&r("oci://localhost:5000/a:1")));
        assert!(regs.allows_http(&r("oci://127.0.0.1:5000/a:1")));
        assert!(regs.allows_http(&r("oci://lab.example:5000/a:1")));
        assert!(!regs.allows_http(&r("oci://lab.example:5001/a:1")));
        assert!(!regs.allows_http(&r("oci://registry.example.com/a:1")));
    }

    #[test]
    fn picks_the_one_wasm_layer_and_says_why_otherwise() {
        let reference = r("oci://localhost:5000/a:1");
        let layer = |t: &str| serde_json::json!({"mediaType": t, "digest": format!("sha256:{}", "a".repeat(64)), "size": 3});
        let manifest = |layers: Vec<serde_json::Value>| {
            serde_json::to_vec(&serde_json::json!({
                "schemaVersion": 2,
                "mediaType": OCI_IMAGE_MEDIA_TYPE,
                "config": {"mediaType": WASM_CONFIG_TYPE, "digest": format!("sha256:{}", "b".repeat(64)), "size": 2},
                "layers": layers,
            }))
            .unwrap()
        };
        for t in WASM_LAYER_TYPES {
            let got = wasm_layer(&reference, &manifest(vec![layer(t)])).unwrap();
            assert_eq!(got.media_type, t);
        }
        let e = wasm_layer(
            &reference,
            &manifest(vec![layer("application/vnd.oci.image.layer.v1.tar+gzip")]),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("no layer has a wasm media type"), "{e}");
        assert!(e.contains("oci://localhost:5000/a:1"), "{e}");
        let e = wasm_layer(
            &reference,
            &manifest(vec![layer("application/wasm"), layer("application/wasm")]),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("several wasm layers"), "{e}");
        let index = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2, "mediaType": OCI_IMAGE_INDEX_MEDIA_TYPE, "manifests": []
        }))
        .unwrap();
        let e = wasm_layer(&reference, &index).unwrap_err().to_string();
        assert!(e.contains("image index"), "{e}");
    }

    #[test]
    fn config_follows_the_cncf_layout() {
        let d = Digest::of(b"x");
        let c: serde_json::Value = serde_json::from_slice(&wasm_config(
            &d,
            shoal_api::model::wasm::Kind::Component,
            std::time::UNIX_EPOCH,
        ))
        .unwrap();
        assert_eq!(c["created"], "1970-01-01T00:00:00Z");
        assert_eq!(c["os"], "wasip2");
        assert_eq!(c["layerDigests"][0], d.as_str());
        assert_eq!(c["component"]["exports"], serde_json::json!([]));
        let c: serde_json::Value = serde_json::from_slice(&wasm_config(
            &d,
            shoal_api::model::wasm::Kind::Module,
            std::time::UNIX_EPOCH,
        ))
        .unwrap();
        assert_eq!(c["os"], "wasip1");
        assert!(c["component"].is_null());
    }
}
