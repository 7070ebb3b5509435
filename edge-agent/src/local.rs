//! The agent's local API: HTTP/1.1 over a Unix socket (default `/run/shoal/agent.sock`,
//! mode 0600), for the device CLI (`shoal-agent peers`, …) and a technician's `curl
//! --unix-socket`. It works without the hub: handlers ask the agent's main loop, which owns
//! all state, over a bounded channel.
//!
//! | route | answer |
//! |---|---|
//! | `GET /v1/peers` | [`PeersView`]: hubs and devices seen over mDNS |
//! | `GET /v1/status` | [`AgentStatusView`]: hub link, generation, last sync, disk, memory |
//! | `GET /v1/workloads` | [`ReplicaView`]s: every replica on this device (`ps`) |
//! | `GET /v1/workloads/{name}` | [`InspectView`]: desired vs observed for one workload |
//! | `GET /v1/workloads/{name}/logs?tail=N&since=SECS&follow=true` | its replicas' log lines, as text |
//! | `POST /v1/workloads/{name}/restart` | [`RestartView`]: the replicas restarted |
//! | `GET /metrics` | Prometheus text ([`crate::metrics`]); also on `--metrics-listen` |
//!
//! Errors are JSON `{"error": "..."}` with a 4xx/5xx status. Logs are read from the files in
//! `DATA_DIR/logs` by the handler itself (never through the main loop), so they are there for
//! a workload that has left the device too.

use crate::logs::{log_files, read_backlog, Follower, Window};
pub use crate::status::*;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use shoal_api::model::ids::WorkloadName;
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

/// Why `shoal-agent restart` restarted nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RestartError {
    #[error("no replica of workload {:?} runs on this device (see `shoal-agent ps`)", .0.as_str())]
    NotHere(WorkloadName),
}

/// A question for the agent's main loop.
#[derive(Debug)]
pub enum LocalRequest {
    Peers(oneshot::Sender<PeersView>),
    Status(oneshot::Sender<AgentStatusView>),
    Replicas(oneshot::Sender<Vec<ReplicaView>>),
    /// `None`: no such workload on this device.
    Inspect(WorkloadName, oneshot::Sender<Option<InspectView>>),
    /// Restart the replicas of a workload; `Err`: why nothing was restarted.
    Restart(
        WorkloadName,
        oneshot::Sender<Result<RestartView, RestartError>>,
    ),
}

#[derive(Clone)]
struct Ctx {
    requests: mpsc::Sender<LocalRequest>,
    logs_dir: PathBuf,
    /// Followed log streams end with the agent (graceful shutdown waits for open answers).
    stop: CancellationToken,
    tracker: TaskTracker,
}

/// An error answer: status and `{"error": message}`.
struct Failure(StatusCode, String);

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

impl Ctx {
    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> LocalRequest,
    ) -> Result<T, Failure> {
        let gone = || {
            Failure(
                StatusCode::SERVICE_UNAVAILABLE,
                "the agent is shutting down".into(),
            )
        };
        let (reply, rx) = oneshot::channel();
        self.requests.send(make(reply)).await.map_err(|_| gone())?;
        rx.await.map_err(|_| gone())
    }
}

fn workload_name(name: &str) -> Result<WorkloadName, Failure> {
    WorkloadName::try_from(name).map_err(|e| Failure(StatusCode::BAD_REQUEST, e.to_string()))
}

fn no_workload(name: &WorkloadName) -> Failure {
    Failure(
        StatusCode::NOT_FOUND,
        format!(
            "no workload {:?} on this device (see `shoal-agent ps`)",
            name.as_str()
        ),
    )
}

/// Binds `path` (replacing a stale socket file; creating its directory) with owner-only
/// permissions and serves until `shutdown`; the socket file is removed on the way out.
pub async fn serve(
    path: &Path,
    requests: mpsc::Sender<LocalRequest>,
    logs_dir: PathBuf,
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
        .route("/v1/status", get(status))
        .route("/v1/workloads", get(replicas))
        .route("/v1/workloads/{name}", get(inspect))
        .route("/v1/workloads/{name}/logs", get(logs))
        .route("/v1/workloads/{name}/restart", post(restart))
        .route("/metrics", get(metrics))
        .with_state(Ctx {
            requests,
            logs_dir,
            stop: shutdown.clone(),
            tracker: tracker.clone(),
        });
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

async fn metrics(State(ctx): State<Ctx>) -> Result<Response, Failure> {
    let status = ctx.ask(LocalRequest::Status).await?;
    let replicas = ctx.ask(LocalRequest::Replicas).await?;
    let text = crate::metrics::render(&status, &replicas)
        .map_err(|e| Failure(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok(([("content-type", crate::metrics::CONTENT_TYPE)], text).into_response())
}

/// Serves `GET /metrics` (only that: the control routes stay on the owner-only socket) over
/// TCP at `addr`, for Prometheus, until `shutdown`.
pub async fn serve_metrics(
    addr: std::net::SocketAddr,
    requests: mpsc::Sender<LocalRequest>,
    tracker: &TaskTracker,
    shutdown: CancellationToken,
) -> Result<std::net::SocketAddr, LocalError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| LocalError::Bind {
            path: addr.to_string(),
            source,
        })?;
    let bound = listener.local_addr().map_err(|source| LocalError::Bind {
        path: addr.to_string(),
        source,
    })?;
    let app = Router::new()
        .route("/metrics", get(metrics))
        .with_state(Ctx {
            requests,
            logs_dir: PathBuf::new(),
            stop: shutdown.clone(),
            tracker: tracker.clone(),
        });
    tracker.spawn(async move {
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await
        {
            warn!(error = %e, "metrics listener stopped");
        }
    });
    Ok(bound)
}

async fn peers(State(ctx): State<Ctx>) -> Result<Json<PeersView>, Failure> {
    ctx.ask(LocalRequest::Peers).await.map(Json)
}

async fn status(State(ctx): State<Ctx>) -> Result<Json<AgentStatusView>, Failure> {
    ctx.ask(LocalRequest::Status).await.map(Json)
}

async fn replicas(State(ctx): State<Ctx>) -> Result<Json<Vec<ReplicaView>>, Failure> {
    ctx.ask(LocalRequest::Replicas).await.map(Json)
}

async fn inspect(
    State(ctx): State<Ctx>,
    UrlPath(name): UrlPath<String>,
) -> Result<Json<InspectView>, Failure> {
    let name = workload_name(&name)?;
    let mut view = ctx
        .ask(|r| LocalRequest::Inspect(name.clone(), r))
        .await?
        .ok_or_else(|| no_workload(&name))?;
    view.logs = log_files(&ctx.logs_dir, name.as_str())
        .into_iter()
        .map(|(_, p)| p.display().to_string())
        .collect();
    Ok(Json(view))
}

async fn restart(
    State(ctx): State<Ctx>,
    UrlPath(name): UrlPath<String>,
) -> Result<Json<RestartView>, Failure> {
    let name = workload_name(&name)?;
    ctx.ask(|r| LocalRequest::Restart(name.clone(), r))
        .await?
        .map(Json)
        .map_err(|e| Failure(StatusCode::NOT_FOUND, e.to_string()))
}

#[derive(Debug, Deserialize)]
struct LogQuery {
    /// Lines from the end of each replica's log; default all that is kept.
    tail: Option<usize>,
    /// Only lines written in the last this many seconds.
    since: Option<u64>,
    #[serde(default)]
    follow: bool,
}

/// How often a followed log is looked at for new lines.
const FOLLOW_POLL: std::time::Duration = std::time::Duration::from_millis(200);

async fn logs(
    State(ctx): State<Ctx>,
    UrlPath(name): UrlPath<String>,
    Query(q): Query<LogQuery>,
) -> Result<Response, Failure> {
    let name = workload_name(&name)?;
    let files = log_files(&ctx.logs_dir, name.as_str());
    if files.is_empty() {
        return Err(no_workload(&name));
    }
    let prefixed = files.len() > 1;
    let mut tails = Vec::new();
    let mut text = String::new();
    for (instance, path) in &files {
        let window = Window {
            since_ms: q
                .since
                .map(|secs| shoal_daemon::clock::now_ms().saturating_sub(secs * 1000)),
            tail: q.tail,
        };
        let (lines, end) = read_backlog(path, window).map_err(|e| {
            Failure(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot read {}: {e}", path.display()),
            )
        })?;
        for l in lines {
            push_line(&mut text, prefixed.then_some(instance.as_str()), &l);
        }
        tails.push(Follower::new(instance.clone(), path.clone(), end));
    }
    if !q.follow {
        return Ok(text.into_response());
    }
    // Followed: the lines so far, then whatever the replicas write, until the client goes
    // away or the agent stops.
    let (tx, rx) = mpsc::channel::<Result<String, std::io::Error>>(16);
    let stop = ctx.stop.clone();
    ctx.tracker.spawn(async move {
        if tx.send(Ok(text)).await.is_err() {
            return;
        }
        loop {
            tokio::select! {
                () = tx.closed() => return,
                () = stop.cancelled() => return,
                () = tokio::time::sleep(FOLLOW_POLL) => {}
            }
            let mut chunk = String::new();
            for f in &mut tails {
                for l in f.poll() {
                    push_line(&mut chunk, prefixed.then_some(f.instance.as_str()), &l);
                }
            }
            if !chunk.is_empty() && tx.send(Ok(chunk)).await.is_err() {
                return;
            }
        }
    });
    let body = axum::body::Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    Ok(([("content-type", "text/plain; charset=utf-8")], body).into_response())
}

fn push_line(out: &mut String, prefix: Option<&str>, line: &str) {
    if let Some(p) = prefix {
        out.push('[');
        out.push_str(p);
        out.push_str("] ");
    }
    out.push_str(line);
    out.push('\n');
}

/// A request to the agent at `socket`; answers other than 2xx are errors carrying the
/// agent's `{"error"}` message. Written on hyper directly: reqwest has no Unix-socket
/// transport.
pub async fn request(
    socket: &Path,
    method: hyper::Method,
    uri: &str,
) -> Result<hyper::Response<hyper::body::Incoming>, LocalError> {
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
    // Drives the connection; ends when the answer's body is done or dropped. Not tracked:
    // this is the CLI's side, which exits when the answer is read.
    tokio::spawn(conn);
    let req = hyper::Request::builder()
        .method(method)
        .uri(uri)
        .header("host", "localhost")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .map_err(|e| answer_err(e.to_string()))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| answer_err(e.to_string()))?;
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| answer_err(e.to_string()))?
        .to_bytes();
    let message = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_string))
        .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
    Err(answer_err(format!("{status}: {message}")))
}

/// `method uri` on the agent at `socket`, its answer decoded as JSON.
pub async fn call_json<T: serde::de::DeserializeOwned>(
    socket: &Path,
    method: hyper::Method,
    uri: &str,
) -> Result<T, LocalError> {
    use http_body_util::BodyExt;
    let resp = request(socket, method, uri).await?;
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| LocalError::Answer {
            path: socket.display().to_string(),
            uri: uri.to_string(),
            reason: e.to_string(),
        })?
        .to_bytes();
    serde_json::from_slice(&body).map_err(|e| LocalError::Answer {
        path: socket.display().to_string(),
        uri: uri.to_string(),
        reason: e.to_string(),
    })
}

/// `GET uri` on the agent at `socket`, decoded as JSON.
pub async fn get_json<T: serde::de::DeserializeOwned>(
    socket: &Path,
    uri: &str,
) -> Result<T, LocalError> {
    call_json(socket, hyper::Method::GET, uri).await
}

/// `GET uri` on the agent at `socket`, its body copied to `out` as it arrives (a followed
/// log), until the agent ends it.
pub async fn stream_to(
    socket: &Path,
    uri: &str,
    out: &mut (impl std::io::Write + Send),
) -> Result<(), LocalError> {
    use http_body_util::BodyExt;
    let mut body = request(socket, hyper::Method::GET, uri).await?.into_body();
    let fail = |reason: String| LocalError::Answer {
        path: socket.display().to_string(),
        uri: uri.to_string(),
        reason,
    };
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| fail(e.to_string()))?;
        if let Ok(data) = frame.into_data() {
            out.write_all(&data)
                .and_then(|()| out.flush())
                .map_err(|e| fail(format!("cannot write: {e}")))?;
        }
    }
    Ok(())
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
        serve(&path, tx, dir.path().join("logs"), &tracker, stop.clone())
            .await
            .unwrap();
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

    #[tokio::test]
    async fn logs_are_served_tailed_and_followed_and_unknown_workloads_are_404() {
        let dir = tempfile::tempdir().unwrap();
        let logs = dir.path().join("logs");
        std::fs::create_dir_all(&logs).unwrap();
        std::fs::write(logs.join("web-0.log"), "one\ntwo\n").unwrap();
        std::fs::write(logs.join("web-1.log"), "uno\n").unwrap();
        let path = dir.path().join("agent.sock");
        let (tx, _rx) = mpsc::channel(4);
        let tracker = TaskTracker::new();
        let stop = CancellationToken::new();
        serve(&path, tx, logs.clone(), &tracker, stop.clone())
            .await
            .unwrap();

        let text = |resp: hyper::Response<hyper::body::Incoming>| async move {
            use http_body_util::BodyExt;
            let b = resp.into_body().collect().await.unwrap().to_bytes();
            String::from_utf8(b.to_vec()).unwrap()
        };
        let all = request(&path, hyper::Method::GET, "/v1/workloads/web/logs")
            .await
            .unwrap();
        assert_eq!(text(all).await, "[web-0] one\n[web-0] two\n[web-1] uno\n");
        let tail = request(&path, hyper::Method::GET, "/v1/workloads/web/logs?tail=1")
            .await
            .unwrap();
        assert_eq!(text(tail).await, "[web-0] two\n[web-1] uno\n");
        let e = request(&path, hyper::Method::GET, "/v1/workloads/api/logs")
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("404") && e.contains("no workload \"api\""),
            "{e}"
        );
        let e = request(&path, hyper::Method::GET, "/v1/workloads/Bad_Name/logs")
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("400") && e.contains("Bad_Name"), "{e}");

        // Followed: the lines so far, then new ones as they are written.
        let mut body = request(
            &path,
            hyper::Method::GET,
            "/v1/workloads/web/logs?tail=0&follow=true",
        )
        .await
        .unwrap()
        .into_body();
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(logs.join("web-1.log"))
            .unwrap();
        f.write_all(b"dos\n").unwrap();
        use http_body_util::BodyExt;
        let mut got = String::new();
        while !got.contains("dos") {
            let frame = tokio::time::timeout(std::time::Duration::from_secs(5), body.frame())
                .await
                .expect("a line within 5 s")
                .unwrap()
                .unwrap();
            got.push_str(&String::from_utf8_lossy(&frame.into_data().unwrap()));
        }
        assert_eq!(got, "[web-1] dos\n");
        // The agent stopping ends the stream (shutdown does not wait for the client).
        stop.cancel();
        tracker.close();
        tokio::time::timeout(std::time::Duration::from_secs(5), tracker.wait())
            .await
            .expect("followed log ends with the agent");
    }
}
