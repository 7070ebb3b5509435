//! The agent's local API: HTTP/1.1 over a Unix socket (default `/run/shoal/agent.sock`,
//! mode 0600), for the device CLI (`shoal-agent peers`, …) and a technician's `curl
//! --unix-socket`. It works without the hub: handlers ask the agent's main loop, which owns
//! all state, over a bounded channel.
//!
//! | route | answer |
//! |---|---|
//! | `GET /v1/peers` | [`PeersView`]: hubs and devices seen over mDNS |

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::warn;

/// Default socket path.
pub const DEFAULT_SOCKET: &str = "/run/shoal/agent.sock";

#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error("cannot serve the local API on {path:?}: {source}")]
    Bind {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot reach the agent at {path:?} (is `shoal-agent run` running, with the same --socket?): {reason}")]
    Connect { path: String, reason: String },
    #[error("agent at {path:?} answered {uri}: {reason}")]
    Answer {
        path: String,
        uri: String,
        reason: String,
    },
}

/// A question for the agent's main loop.
#[derive(Debug)]
pub enum LocalRequest {
    Peers(oneshot::Sender<PeersView>),
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PeersView {
    /// Whether mDNS is on.
    pub mdns: bool,
    pub fleet: String,
    pub hubs: Vec<HubPeer>,
    pub devices: Vec<DevicePeer>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HubPeer {
    pub instance: String,
    pub fleet: String,
    pub addresses: Vec<String>,
    /// `selected`, `conflict` (another hub of this fleet is used) or `ignored: {reason}`.
    pub state: String,
    pub first_seen_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DevicePeer {
    pub device: String,
    pub arch: String,
    pub runtimes: Vec<String>,
    pub labels: BTreeMap<String, String>,
    pub addresses: Vec<String>,
    pub first_seen_ms: u64,
}

type Requests = mpsc::Sender<LocalRequest>;

/// Binds `path` (replacing a stale socket file; creating its directory) with owner-only
/// permissions and serves until `shutdown`; the socket file is removed on the way out.
pub async fn serve(
    path: &Path,
    requests: Requests,
    tracker: &TaskTracker,
    shutdown: CancellationToken,
) -> Result<(), LocalError> {
    let bind_err = |source| LocalError::Bind {
        path: path.display().to_string(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(bind_err)?;
    }
    // A socket file left by a killed agent would make bind fail; a live agent on the same
    // path would lose its socket, which is why the path is per agent (`--socket`).
    let _ = std::fs::remove_file(path);
    let listener = tokio::net::UnixListener::bind(path).map_err(bind_err)?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind_err)?;
    }
    let app = Router::new()
        .route("/v1/peers", get(peers))
        .with_state(requests);
    let path: PathBuf = path.to_path_buf();
    tracker.spawn(async move {
        let stop = shutdown.clone();
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await
        {
            warn!(error = %e, "local api stopped");
        }
        let _ = std::fs::remove_file(&path);
    });
    Ok(())
}

async fn peers(State(tx): State<Requests>) -> Result<Json<PeersView>, StatusCode> {
    let (reply, rx) = oneshot::channel();
    tx.send(LocalRequest::Peers(reply))
        .await
        .map_err(|_| StatusCode::SERVICE_UNAVAILABLE)?;
    rx.await
        .map(Json)
        .map_err(|_| StatusCode::SERVICE_UNAVAILABLE)
}

/// `GET uri` on the agent at `socket`, decoded as JSON. Written on hyper directly: reqwest
/// has no Unix-socket transport.
pub async fn get_json<T: serde::de::DeserializeOwned>(
    socket: &Path,
    uri: &str,
) -> Result<T, LocalError> {
    use http_body_util::BodyExt;
    let connect_err = |reason: String| LocalError::Connect {
        path: socket.display().to_string(),
        reason,
    };
    let answer_err = |reason: String| LocalError::Answer {
        path: socket.display().to_string(),
        uri: uri.to_string(),
        reason,
    };
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|e| connect_err(e.to_string()))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| connect_err(e.to_string()))?;
    let driver = tokio::spawn(conn);
    let req = hyper::Request::get(uri)
        .header("host", "localhost")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .map_err(|e| answer_err(e.to_string()))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| answer_err(e.to_string()))?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| answer_err(e.to_string()))?
        .to_bytes();
    driver.abort();
    if !status.is_success() {
        return Err(answer_err(format!(
            "{status}: {}",
            String::from_utf8_lossy(&body)
        )));
    }
    serde_json::from_slice(&body).map_err(|e| answer_err(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn peers_round_trip_over_the_socket_with_owner_only_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/agent.sock");
        let (tx, mut rx) = mpsc::channel(4);
        let tracker = TaskTracker::new();
        let stop = CancellationToken::new();
        serve(&path, tx, &tracker, stop.clone()).await.unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        tokio::spawn(async move {
            while let Some(LocalRequest::Peers(reply)) = rx.recv().await {
                let _ = reply.send(PeersView {
                    mdns: true,
                    fleet: "farm".into(),
                    ..Default::default()
                });
            }
        });
        let v: PeersView = get_json(&path, "/v1/peers").await.unwrap();
        assert_eq!(v.fleet, "farm");
        let e = get_json::<PeersView>(&path, "/v1/nope").await.unwrap_err();
        assert!(e.to_string().contains("404"), "{e}");
        stop.cancel();
        tracker.close();
        tracker.wait().await;
        assert!(!path.exists(), "socket file removed on shutdown");
        let e = get_json::<PeersView>(&path, "/v1/peers").await.unwrap_err();
        assert!(e.to_string().contains("cannot reach the agent"), "{e}");
    }
}
