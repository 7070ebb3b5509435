//! Module fetching: `GET {artifact_base}/v1/blobs/{digest}` from the hub, verified against the
//! digest and cached on disk as `DATA_DIR/cache/modules/<hex>.wasm`; or, for a module given as
//! a pinned `oci://` reference, pulled from its registry (manifest and layer verified by
//! [`shoal_registry`]) and cached as `DATA_DIR/cache/modules/oci-<manifest hex>.wasm`.
//!
//! A runtime-only agent (built without the `compiler` feature) cannot compile wasm: it fetches
//! `GET {artifact_base}/v1/blobs/{digest}/precompiled?target=T&engine=E` instead, the module
//! compiled by the hub for its engine and target, cached as `<hex>.<target>.cwasm`. That is
//! native code, so it is only taken from a hub authenticated over TLS.
//!
//! A cached module is used without asking the hub, which is what lets a device restart its
//! workloads while the hub is unreachable.

use shoal_api::ids::Digest;
use shoal_api::oci::OciRef;
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("cannot fetch module {digest} from {url:?}: {reason}")]
    Http {
        digest: String,
        url: String,
        reason: String,
    },
    #[error("module {digest} from {url:?} failed verification: its content hashes to {actual}")]
    Digest {
        digest: String,
        url: String,
        actual: String,
    },
    #[error("module {module} comes from a registry, and this runtime-only agent cannot compile it: the hub precompiles only the modules it stores")]
    NeedsCompiler { module: String },
    #[error("module {digest}: a runtime-only agent loads native code from the hub, so it needs a hub it authenticates over TLS (not --insecure)")]
    PrecompiledNeedsTls { digest: String },
    #[error("cannot pull module: {0}")]
    Registry(#[from] shoal_registry::RegistryError),
    #[error("module cache i/o error at {path:?}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

#[derive(Clone)]
pub struct Fetcher {
    dir: PathBuf,
    http: reqwest::Client,
    registries: std::sync::Arc<shoal_registry::Registries>,
    /// Whether the hub is authenticated over TLS.
    tls: bool,
    /// Runtime-only: the engine target to ask the hub to precompile modules for.
    precompiled: Option<String>,
}

impl Fetcher {
    /// `tls`: the device's TLS configuration for the hub (fleet CA, device certificate);
    /// `None` for an `--insecure` agent.
    pub fn new(
        data_dir: &Path,
        registries: std::sync::Arc<shoal_registry::Registries>,
        tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    ) -> Result<Self, FetchError> {
        let dir = data_dir.join("cache").join("modules");
        std::fs::create_dir_all(&dir).map_err(|source| FetchError::Io {
            path: dir.display().to_string(),
            source,
        })?;
        let authenticated = tls.is_some();
        let mut builder = reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(5))
            .timeout(std::time::Duration::from_secs(120));
        if let Some(tls) = tls {
            builder = builder.use_preconfigured_tls((*tls).clone());
        }
        let http = crate::http_client(builder).map_err(|e| FetchError::Http {
            digest: String::new(),
            url: String::new(),
            reason: e.to_string(),
        })?;
        Ok(Self {
            dir,
            http,
            registries,
            tls: authenticated,
            precompiled: None,
        })
    }

    /// Makes this a runtime-only agent's fetcher: modules from the hub come precompiled for
    /// `target` (see [`shoal_engine::native_target`]).
    pub fn precompiled_for(mut self, target: String) -> Self {
        self.precompiled = Some(target);
        self
    }

    pub fn cached_path(&self, d: &Digest) -> PathBuf {
        self.dir.join(format!("{}.wasm", d.hex()))
    }

    /// Returns the path of the verified module, downloading it if it is not cached: from
    /// `oci`'s registry when given (`d` is then its manifest digest), else from the hub.
    pub async fn fetch(
        &self,
        artifact_base: &str,
        d: &Digest,
        oci: Option<&OciRef>,
    ) -> Result<PathBuf, FetchError> {
        if let Some(r) = oci {
            if self.precompiled.is_some() {
                return Err(FetchError::NeedsCompiler {
                    module: r.pinned(d.clone()).to_string(),
                });
            }
            let path = self.dir.join(format!("oci-{}.wasm", d.hex()));
            if !tokio::fs::try_exists(&path).await.unwrap_or(false) {
                let pinned = r.pinned(d.clone());
                let layer = self.registries.pull_wasm(&pinned, &path).await?;
                tracing::info!(module = %pinned, %layer, "module pulled from its registry");
            }
            return Ok(path);
        }
        let path = match &self.precompiled {
            Some(target) => self.dir.join(format!("{}.{target}.cwasm", d.hex())),
            None => self.cached_path(d),
        };
        if tokio::fs::try_exists(&path).await.unwrap_or(false) {
            return Ok(path);
        }
        if self.precompiled.is_some() && !self.tls {
            return Err(FetchError::PrecompiledNeedsTls {
                digest: d.to_string(),
            });
        }
        if artifact_base.is_empty() {
            return Err(FetchError::Http {
                digest: d.to_string(),
                url: String::new(),
                reason: "no artifact URL yet: the hub gave none (it listens on a wildcard address without --public-url) and has not been found over mDNS".into(),
            });
        }
        let mut url = format!(
            "{}/v1/blobs/{}",
            artifact_base.trim_end_matches('/'),
            d.as_str()
        );
        let mut query = Vec::new();
        if let Some(target) = &self.precompiled {
            url.push_str("/precompiled");
            query = vec![
                ("target", target.as_str()),
                ("engine", shoal_engine::ENGINE_ID),
            ];
        }
        let http_err = |reason: String| FetchError::Http {
            digest: d.to_string(),
            url: url.clone(),
            reason,
        };
        let resp = self
            .http
            .get(&url)
            .query(&query)
            .send()
            .await
            .map_err(|e| http_err(e.to_string()))?;
        if !resp.status().is_success() {
            let status = resp.status();
            // The hub explains a refused precompile (wrong engine, bad target) in the body.
            let why = resp
                .json::<shoal_api::views::ApiError>()
                .await
                .map(|b| format!(": {}", b.error))
                .unwrap_or_default();
            return Err(http_err(format!("hub answered {status}{why}")));
        }
        let bytes = resp.bytes().await.map_err(|e| http_err(e.to_string()))?;
        let actual = Digest::of(&bytes);
        // A precompiled artifact is the hub's output, not the blob: TLS vouches for it.
        if self.precompiled.is_none() && actual != *d {
            return Err(FetchError::Digest {
                digest: d.to_string(),
                url,
                actual: actual.to_string(),
            });
        }
        let dir = self.dir.clone();
        let target = path.clone();
        tokio::task::spawn_blocking(move || write_atomic(&dir, &target, &bytes))
            .await
            .map_err(|e| FetchError::Io {
                path: path.display().to_string(),
                source: std::io::Error::other(e),
            })??;
        Ok(path)
    }
}

fn write_atomic(dir: &Path, target: &Path, bytes: &[u8]) -> Result<(), FetchError> {
    let io = |p: &Path| {
        let p = p.display().to_string();
        move |source| FetchError::Io { path: p, source }
    };
    let tmp = dir.join(format!(
        ".fetch-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(bytes).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, target).map_err(io(target))?;
    Ok(())
}

/// Where supervisors get verified module files from (a seam for tests).
pub trait ModuleSource: Clone + Send + Sync + 'static {
    fn fetch(
        &self,
        artifact_base: &str,
        digest: &Digest,
        oci: Option<&OciRef>,
    ) -> impl std::future::Future<Output = Result<PathBuf, FetchError>> + Send;
}

impl ModuleSource for Fetcher {
    async fn fetch(
        &self,
        artifact_base: &str,
        digest: &Digest,
        oci: Option<&OciRef>,
    ) -> Result<PathBuf, FetchError> {
        Fetcher::fetch(self, artifact_base, digest, oci).await
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn fetcher(dir: &Path) -> Fetcher {
        let registries = std::sync::Arc::new(shoal_registry::Registries::new(
            shoal_registry::RegistryConfig::default(),
        ));
        Fetcher::new(dir, registries, None).unwrap()
    }

    #[tokio::test]
    async fn a_runtime_only_fetcher_refuses_what_it_could_not_run_safely() {
        let dir = tempfile::tempdir().unwrap();
        let f = fetcher(dir.path()).precompiled_for("pulley32".into());
        let d = Digest::of(b"module");
        // Native code from a hub it cannot authenticate: refused before any request.
        let e = f.fetch("http://127.0.0.1:9", &d, None).await.unwrap_err();
        assert!(matches!(e, FetchError::PrecompiledNeedsTls { .. }), "{e}");
        assert!(e.to_string().contains("not --insecure"), "{e}");
        // A registry module: the hub never saw it, so nobody compiles it.
        let oci: OciRef = "oci://localhost:5000/m:1".parse().unwrap();
        let e = f.fetch("", &d, Some(&oci)).await.unwrap_err();
        assert!(matches!(e, FetchError::NeedsCompiler { .. }), "{e}");
        assert!(e.to_string().contains("oci://localhost:5000/m"), "{e}");
        assert!(e.to_string().contains(d.as_str()), "{e}");
        // What it already holds it uses without asking anyone (the hub may be away).
        let cached = dir
            .path()
            .join("cache/modules")
            .join(format!("{}.pulley32.cwasm", d.hex()));
        std::fs::write(&cached, b"artifact").unwrap();
        assert_eq!(f.fetch("", &d, None).await.unwrap(), cached);
    }
}
