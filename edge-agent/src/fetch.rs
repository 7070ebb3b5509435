//! Module fetching: `GET {artifact_base}/v1/blobs/{digest}` from the hub, verified against the
//! digest and cached on disk as `DATA_DIR/cache/modules/<hex>.wasm`; or, for a module given as
//! a pinned `oci://` reference, pulled from its registry (manifest and layer verified by
//! [`shoal_registry`]) and cached as `DATA_DIR/cache/modules/oci-<manifest hex>.wasm`.
//!
//! A runtime-only agent (built without the `compiler` feature) cannot compile wasm: it fetches
//! `GET {artifact_base}/v1/blobs/{digest}/precompiled?target=T&engine=E` instead, the module
//! compiled by the hub for its engine and target, cached as `<hex>.<target>.signed.cwasm`.
//! That is native code, so it is only taken from a hub authenticated over TLS, and only with
//! the hub's signature over it (`shoal_pki::sign::verify_artifact`).
//!
//! A cached module is used without asking the hub, which is what lets a device restart its
//! workloads while the hub is unreachable.

use shoal_api::model::ids::Digest;
use shoal_api::model::oci::OciRef;
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
    #[error("precompiled module {digest} from {url:?} is refused: {reason}")]
    Unsigned {
        digest: String,
        url: String,
        reason: String,
    },
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
    /// The hub's signing key: a precompiled artifact is kept only with its valid signature.
    hub_key: Option<shoal_pki::sign::HubKey>,
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
        // No redirects: a module comes from the address the signed desired state (or the
        // agent's own configuration) names, nowhere else.
        let mut builder = reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(5))
            .timeout(std::time::Duration::from_secs(120))
            .redirect(reqwest::redirect::Policy::none());
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
            hub_key: None,
        })
    }

    /// Makes this a runtime-only agent's fetcher: modules from the hub come precompiled for
    /// `target` (see [`shoal_engine::native_target`]), each signed by the hub's key
    /// `hub_key` (without one, none is taken).
    pub fn precompiled_for(
        mut self,
        target: String,
        hub_key: Option<shoal_pki::sign::HubKey>,
    ) -> Self {
        self.precompiled = Some(target);
        self.hub_key = hub_key;
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
            // `.signed`: only artifacts whose signature was checked (those cached by agents
            // that did not check are never loaded).
            Some(target) => self.dir.join(format!("{}.{target}.signed.cwasm", d.hex())),
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
        // An agent that authenticates its hub takes modules over HTTPS only (the client
        // verifies the hub as `shoal-hub-api`; plain HTTP would verify nobody).
        if self.tls && !artifact_base.starts_with("https://") {
            return Err(FetchError::Http {
                digest: d.to_string(),
                url: artifact_base.to_string(),
                reason: "this agent authenticates its hub: modules come over https:// only".into(),
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
            .map_err(|e| http_err(crate::with_causes(&e)))?;
        if !resp.status().is_success() {
            let status = resp.status();
            // The hub explains a refused precompile (wrong engine, bad target) in the body.
            let why = resp
                .json::<shoal_api::wire::views::ApiError>()
                .await
                .map(|b| format!(": {}", b.error))
                .unwrap_or_default();
            return Err(http_err(format!("hub answered {status}{why}")));
        }
        let signature = resp
            .headers()
            .get("x-shoal-signature")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let bytes = resp.bytes().await.map_err(|e| http_err(e.to_string()))?;
        let actual = Digest::of(&bytes);
        // A precompiled artifact is the hub's output, not the blob: the hub's signature
        // vouches for it (a broker's or relay's key cannot make one).
        if let Some(target) = &self.precompiled {
            let unsigned = |reason: String| FetchError::Unsigned {
                digest: d.to_string(),
                url: url.clone(),
                reason,
            };
            let key = self
                .hub_key
                .as_ref()
                .ok_or_else(|| unsigned("this agent has no hub key to check it with".into()))?;
            let sig = signature.ok_or_else(|| unsigned("it carries no signature".into()))?;
            shoal_pki::sign::verify_artifact(
                key,
                d.as_str(),
                target,
                shoal_engine::ENGINE_ID,
                &bytes,
                &sig,
            )
            .map_err(|e| unsigned(e.to_string()))?;
        }
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
        let f = fetcher(dir.path()).precompiled_for("pulley32".into(), None);
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
            .join(format!("{}.pulley32.signed.cwasm", d.hex()));
        std::fs::write(&cached, b"artifact").unwrap();
        assert_eq!(f.fetch("", &d, None).await.unwrap(), cached);
    }

    /// A one-shot HTTPS "hub" on loopback: the fleet CA's certificate for `usage`, answering
    /// every request with `body` and, if given, the artifact signature header.
    async fn https_server(
        ca: &shoal_pki::ca::FleetCa,
        usage: shoal_pki::ca::Usage,
        body: &'static [u8],
        signature: Option<String>,
    ) -> u16 {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let name = match usage {
            shoal_pki::ca::Usage::Broker { .. } => shoal_pki::ca::BROKER_NAME,
            _ => shoal_pki::ca::HUB_NAME,
        };
        let (cert, key) = ca.issue(name, &usage).unwrap();
        let config = shoal_pki::tls::server_config(
            ca.pem(),
            &cert,
            &key,
            shoal_pki::tls::ClientAuth::Optional,
            &[b"http/1.1"],
        )
        .unwrap();
        let acceptor = shoal_pki::tls::TlsAcceptor::from(config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                let Ok(mut tls) = acceptor.accept(sock).await else {
                    continue;
                };
                let mut req = [0u8; 4096];
                let _ = tls.read(&mut req).await;
                let sig = signature
                    .as_ref()
                    .map(|s| format!("x-shoal-signature: {s}\r\n"))
                    .unwrap_or_default();
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n{sig}connection: close\r\n\r\n",
                    body.len()
                );
                let _ = tls.write_all(head.as_bytes()).await;
                let _ = tls.write_all(body).await;
                let _ = tls.shutdown().await;
            }
        });
        port
    }

    /// Native code reaches a runtime-only agent only as the hub signed it, and only from a
    /// server that is the hub (not a broker of the fleet, whose key a relay may hold).
    #[tokio::test]
    async fn a_tampered_or_unsigned_artifact_is_refused_and_a_broker_is_no_hub() {
        let dir = tempfile::tempdir().unwrap();
        let ca = shoal_pki::ca::FleetCa::load_or_create(&dir.path().join("ca")).unwrap();
        let hub = shoal_pki::sign::HubSigner::load_or_create(&dir.path().join("sign")).unwrap();
        let key = shoal_pki::sign::HubKey::from_b64(&hub.public_key_b64()).unwrap();
        let tls = shoal_pki::tls::client_config(ca.pem(), None).unwrap();
        let registries = std::sync::Arc::new(shoal_registry::Registries::new(
            shoal_registry::RegistryConfig::default(),
        ));
        let f = Fetcher::new(dir.path(), registries, Some(tls))
            .unwrap()
            .precompiled_for("pulley32".into(), Some(key));
        let d = Digest::of(b"module");
        let engine = shoal_engine::ENGINE_ID;
        let server = || shoal_pki::ca::Usage::Server {
            names: vec!["127.0.0.1".into()],
        };
        let cached = dir
            .path()
            .join("cache/modules")
            .join(format!("{}.pulley32.signed.cwasm", d.hex()));
        // The hub signed other code than what arrives: refused, nothing kept.
        let sig = hub.sign_artifact(d.as_str(), "pulley32", engine, b"good code");
        let port = https_server(&ca, server(), b"evil code", Some(sig)).await;
        let e = f
            .fetch(&format!("https://127.0.0.1:{port}"), &d, None)
            .await
            .unwrap_err();
        assert!(matches!(e, FetchError::Unsigned { .. }), "{e}");
        assert!(!cached.exists());
        // No signature at all: refused.
        let port = https_server(&ca, server(), b"evil code", None).await;
        let e = f
            .fetch(&format!("https://127.0.0.1:{port}"), &d, None)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("no signature"), "{e}");
        // A broker's certificate, from the same fleet CA, with a valid signature: the TLS
        // handshake fails, it is not the hub.
        let sig = hub.sign_artifact(d.as_str(), "pulley32", engine, b"good code");
        let broker = shoal_pki::ca::Usage::Broker {
            names: vec!["127.0.0.1".into()],
        };
        let port = https_server(&ca, broker, b"good code", Some(sig.clone())).await;
        let e = f
            .fetch(&format!("https://127.0.0.1:{port}"), &d, None)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("not valid for name"), "{e}");
        assert!(!cached.exists());
        // Plain HTTP is not even tried.
        let e = f.fetch("http://127.0.0.1:9", &d, None).await.unwrap_err();
        assert!(e.to_string().contains("https:// only"), "{e}");
        // The hub, its signature over what it sent: kept.
        let port = https_server(&ca, server(), b"good code", Some(sig)).await;
        let got = f
            .fetch(&format!("https://127.0.0.1:{port}"), &d, None)
            .await
            .unwrap();
        assert_eq!(std::fs::read(&got).unwrap(), b"good code");
    }
}
