//! The hub's HTTPS API, as the CLI calls it (every read and delete command, blob uploads).

use super::*;

pub(crate) struct Hub {
    pub(crate) base: String,
    /// `Err`: no client could be made (missing operator credentials), said on first use.
    client: Result<reqwest::Client, String>,
}

impl Hub {
    pub(crate) fn new(
        base: &str,
        tls: &Result<Arc<rustls::ClientConfig>, String>,
    ) -> anyhow::Result<Self> {
        let secure = base.starts_with("https://");
        if !secure && !base.starts_with("http://") {
            bail!("hub address {base:?} is invalid: expected https://HOST:PORT");
        }
        // The hub refuses state-changing requests a browser could send cross-site ("simple"
        // requests): this header, which a page cannot add without the hub's consent, says
        // the request is not one.
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(
            shoal_api::wire::views::CLIENT_HEADER,
            reqwest::header::HeaderValue::from_static("shoal-cli"),
        );
        let builder = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .default_headers(headers);
        let client = match (secure, tls) {
            (false, _) => Ok(builder),
            (true, Ok(t)) => Ok(builder.use_preconfigured_tls((**t).clone())),
            (true, Err(e)) => Err(e.clone()),
        }
        .and_then(|b| {
            b.build()
                .map_err(|e| format!("cannot create an http client: {e}"))
        });
        Ok(Self {
            base: base.trim_end_matches('/').to_string(),
            client,
        })
    }

    pub(crate) fn http(&self) -> anyhow::Result<&reqwest::Client> {
        self.client.as_ref().map_err(|e| anyhow::anyhow!("{e}"))
    }

    pub(crate) async fn check(
        &self,
        resp: reqwest::Result<reqwest::Response>,
        what: &str,
    ) -> anyhow::Result<reqwest::Response> {
        let resp =
            resp.with_context(|| format!("cannot reach the hub at {} ({what})", self.base))?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let body = resp.text().await.unwrap_or_default();
        let msg = serde_json::from_str::<ApiError>(&body)
            .map(|e| e.error)
            .unwrap_or(body);
        bail!("{msg} (hub answered {status})")
    }

    pub(crate) async fn get<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
    ) -> anyhow::Result<T> {
        let r = self
            .check(
                self.http()?
                    .get(format!("{}{path}", self.base))
                    .send()
                    .await,
                path,
            )
            .await?;
        r.json().await.context("hub sent an unreadable answer")
    }

    pub(crate) async fn delete(&self, path: &str) -> anyhow::Result<()> {
        self.check(
            self.http()?
                .delete(format!("{}{path}", self.base))
                .send()
                .await,
            path,
        )
        .await?;
        Ok(())
    }

    pub(crate) async fn post(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> anyhow::Result<reqwest::Response> {
        self.check(
            self.http()?
                .post(format!("{}{path}", self.base))
                .json(body)
                .send()
                .await,
            path,
        )
        .await
    }

    pub(crate) async fn post_for<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> anyhow::Result<T> {
        let r = self.post(path, body).await?;
        r.json().await.context("hub sent an unreadable answer")
    }

    pub(crate) async fn put_for<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> anyhow::Result<T> {
        let r = self
            .check(
                self.http()?
                    .put(format!("{}{path}", self.base))
                    .json(body)
                    .send()
                    .await,
                path,
            )
            .await?;
        r.json().await.context("hub sent an unreadable answer")
    }

    pub(crate) async fn post_json(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> anyhow::Result<()> {
        self.post(path, body).await.map(drop)
    }

    /// `POST /v1/devices/{device}/{action}`, then says what was done.
    pub(crate) async fn device_action(&self, device: &str, action: &str) -> anyhow::Result<()> {
        let path = format!("/v1/devices/{device}/{action}");
        self.check(
            self.http()?
                .post(format!("{}{path}", self.base))
                .send()
                .await,
            &path,
        )
        .await?;
        println!("device/{device} {action}ed");
        Ok(())
    }

    /// `POST /v1/apply`: the hub's verdict, accepted (200) or not (422).
    pub(crate) async fn apply(&self, manifest: String) -> anyhow::Result<ApplyResult> {
        let r = self
            .http()?
            .post(format!("{}/v1/apply", self.base))
            .body(manifest)
            .send()
            .await
            .with_context(|| format!("cannot reach the hub at {}", self.base))?;
        let status = r.status();
        if status.is_success() || status == reqwest::StatusCode::UNPROCESSABLE_ENTITY {
            return r.json().await.context("hub sent an unreadable verdict");
        }
        let body = r.text().await.unwrap_or_default();
        bail!("hub answered {status} to apply: {body}")
    }

    pub(crate) async fn put_blob(&self, bytes: Vec<u8>) -> anyhow::Result<BlobRef> {
        let what = format!(
            "uploading {} to the hub",
            format_memory_rounded(bytes.len() as u64)
        );
        with_spinner(what, self.put_blob_quiet(bytes)).await
    }

    pub(crate) async fn put_blob_quiet(&self, bytes: Vec<u8>) -> anyhow::Result<BlobRef> {
        let r = self
            .check(
                self.http()?
                    .post(format!("{}/v1/blobs", self.base))
                    .body(bytes)
                    .send()
                    .await,
                "upload",
            )
            .await?;
        r.json().await.context("hub sent an unreadable answer")
    }
}
