//! The hub's HTTP API (axum): read models for the CLI, apply/delete, the blob store, metrics.
//!
//! | route | |
//! |---|---|
//! | `GET /healthz` | liveness |
//! | `GET /v1/devices` | `[DeviceView]` |
//! | `GET /v1/workloads` | `[WorkloadView]` |
//! | `GET /v1/workloads/{name}` | `WorkloadView` with its spec |
//! | `DELETE /v1/workloads/{name}` | delete |
//! | `POST /v1/devices/{id}/cordon`, `/uncordon`, `/drain` | no new replicas; move replicas off |
//! | `POST /v1/devices/{id}/labels` | `LabelChange` (set, remove, overwrite) → the device's labels |
//! | `POST /v1/devices/{id}/annotations` | `LabelChange` of free text → the device's annotations |
//! | `POST /v1/workloads/{name}/rollout/{pause,resume,promote,undo}` | steer a rollout |
//! | `POST /v1/workloads/{name}/scale` | body `{"replicas": N}` |
//! | `POST /v1/workloads/{name}/rerun` | a job runs again (`shoal rerun`) |
//! | `POST /v1/apply` | manifest text → `ApplyResult` (same path as an MQTT apply) |
//! | `GET /v1/secrets` | `[SecretView]`: names, keys, versions, users; never values |
//! | `DELETE /v1/secrets/{name}` | delete a secret no workload uses (409 otherwise) |
//! | `DELETE /v1/devices/{id}` | forget an offline device (409 while it is online) |
//! | `GET /v1/policy`, `PUT /v1/policy` | the fleet's policy on privileged containers (set: admins) |
//! | `GET /v1/configs` | `[ConfigView]`: names, keys, versions, users |
//! | `GET /v1/configs/{name}` | `ConfigDescription`: the config, its users, each device's values |
//! | `DELETE /v1/configs/{name}` | delete a config no workload reads (409 otherwise) |
//! | `POST /v1/blobs` | upload bytes → `BlobRef` |
//! | `GET /v1/blobs/{digest}` | download a blob |
//! | `GET /v1/blobs/{digest}/precompiled?target=T&engine=E` | the blob compiled for a runtime-only agent |
//! | `GET /v1/events?after=N&object=KIND/NAME` | `[EventView]`: recent fleet events, oldest first |
//! | `GET /v1/workloads/{name}/logs?device=D&tail=N&since=SECS&follow=true` | `LogEntry` lines (NDJSON) from the devices, asked over MQTT |
//! | `GET /v1/stream` | server-sent events: a `FleetView` at once, then one per change |
//! | `GET /`, `/ui/*` | the web dashboard (page, script, style; no data) |
//! | `POST /v1/dashboard/login` | a one-time login link for a browser (`shoal dashboard`) |
//! | `GET /login?token=T` | trades it for a read-only session cookie, redirects to `/` |
//! | `GET /v1/audit?after=N` | `[AuditEntry]`: the audit log (admins) |
//! | `GET /metrics` | Prometheus text |
//! | `GET /v1/ca` | the fleet CA (PEM), for enrollment |
//! | `POST /v1/enroll` | `EnrollRequest` (join token + CSR) → `Enrolled` |
//! | `POST /v1/renew` | `RenewRequest` (CSR) → `Enrolled`, for the calling device |
//!
//! Served over TLS (unless `--insecure`), asking for a client certificate from the fleet CA.
//! Who may call what ([`need`]): `/healthz`, `/v1/ca` and `/v1/enroll` are open; blob
//! downloads and `/v1/renew` take any fleet certificate; everything else takes an operator's
//! (or the hub's). The dashboard's files and `/login` are open; a browser signed in through
//! `/login` may read the fleet (the dashboard's GET routes) and nothing more.
//!
//! Handlers that touch fleet state ask the main loop over a bounded channel and await its
//! answer; blobs are served straight from disk.
//!
//! - [`request`]: what handlers ask the main loop, and its typed replies;
//! - [`rules`]: the role each route needs, and the middleware that enforces it;
//! - [`audit`]: the audit middleware and `GET /v1/audit`;
//! - [`enroll`]: CA, enrollment and renewal; [`blobs`]: uploads and downloads;
//! - [`operate`]: the operator's changes (and the one place a refusal becomes a status);
//! - [`logs`]: events and `shoal logs`; [`browser`]: the dashboard's login and stream.

mod audit;
mod blobs;
mod browser;
mod configs;
mod enroll;
mod logs;
mod operate;
mod rules;

pub use crate::app::request::{DeviceAction, LogStream, ManifestText, Request};
use audit::*;
use blobs::*;
use browser::*;
use configs::*;
use enroll::*;
use logs::*;
use operate::*;
use rules::*;
pub use rules::{need, Need};

use crate::blobs::BlobStore;
use crate::security::Security;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use prometheus_client::registry::Registry;
use shoal_api::model::ids::WorkloadName;
use shoal_api::policy::acl::Identity;
use shoal_api::wire::views::ApiError;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Largest blob accepted by `POST /v1/blobs`.
pub const MAX_BLOB: usize = 64 << 20;

/// Largest enrollment or renewal request (a token and a CSR).
const ENROLL_BODY: usize = 16 << 10;

/// The response header that carries the hub's signature over a precompiled artifact.
pub const ARTIFACT_SIGNATURE: &str = "x-shoal-signature";

#[derive(Clone)]
pub struct AppState {
    pub requests: mpsc::Sender<Request>,
    pub blobs: Arc<BlobStore>,
    pub registry: Arc<Registry>,
    /// The fleet's credentials; `None` with `--insecure` (no enrollment).
    pub security: Option<Arc<Security>>,
    /// Bumped by the main loop when the fleet changed (wakes the dashboard streams).
    pub fleet_changed: tokio::sync::watch::Receiver<u64>,
    /// Ends the long-lived responses (the dashboard streams) when the hub stops.
    pub shutdown: CancellationToken,
    /// Dashboard logins and sessions (see [`crate::dashboard`]).
    pub sessions: Arc<crate::dashboard::Sessions>,
    /// `Some(the leader, as it announced itself)` while this hub stands by (see
    /// [`crate::ha`]): it answers reads and refuses changes.
    pub standby: tokio::sync::watch::Receiver<Option<String>>,
    /// What the enrollment book says of revocations (`None` with `--insecure`).
    pub verdicts: Option<crate::access::VerdictsRx>,
    /// How many refused requests each operator may still have recorded this minute.
    pub refusals: Arc<std::sync::Mutex<crate::fleet::audit::RefusalBudget>>,
}

/// Who is calling: set per connection from its client certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    /// The hub runs `--insecure`: no identities, everything allowed.
    Insecure,
    /// TLS without a (fleet) client certificate.
    Anonymous,
    Known(Identity),
    /// A fleet certificate the hub does not let in (revoked, replaced), and why.
    Refused(String),
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/v1/ca", get(ca))
        // Small bodies for the routes anyone (or any device) may call.
        .route(
            "/v1/enroll",
            post(enroll).layer(DefaultBodyLimit::max(ENROLL_BODY)),
        )
        .route(
            "/v1/renew",
            post(renew).layer(DefaultBodyLimit::max(ENROLL_BODY)),
        )
        .route("/metrics", get(metrics))
        .route("/v1/events", get(events))
        .route("/v1/stream", get(stream))
        .route("/v1/dashboard/login", post(login_token))
        .route("/login", get(login))
        .merge(crate::dashboard::routes())
        .route("/v1/devices", get(devices))
        .route("/v1/devices/{id}", axum::routing::delete(delete_device))
        .route("/v1/devices/{id}/labels", post(label_device))
        .route("/v1/devices/{id}/annotations", post(annotate_device))
        .route("/v1/devices/{id}/{action}", post(device_action))
        .route(
            "/v1/workloads/{name}/rollout/{action}",
            post(rollout_action),
        )
        .route("/v1/workloads/{name}/scale", post(scale))
        .route("/v1/workloads/{name}/rerun", post(rerun))
        .route("/v1/workloads/{name}/logs", get(logs))
        .route("/v1/workloads", get(workloads))
        .route("/v1/workloads/{name}", get(workload).delete(delete))
        .route("/v1/apply", post(apply))
        .route("/v1/audit", get(audit_log))
        .route("/v1/secrets", get(secrets))
        .route("/v1/secrets/{name}", axum::routing::delete(delete_secret))
        .route("/v1/configs", get(configs))
        .route("/v1/policy", get(policy).put(set_policy))
        .route("/v1/configs/{name}", get(config).delete(delete_config))
        .route("/v1/blobs", post(put_blob))
        .route("/v1/blobs/{digest}", get(get_blob))
        .route("/v1/blobs/{digest}/precompiled", get(get_precompiled))
        .layer(DefaultBodyLimit::max(MAX_BLOB))
        // Inside `authorize`: who may not call a route at all hears that first.
        .layer(axum::middleware::from_fn(same_site_only))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            authorize,
        ))
        // Outside `authorize`: refusals are recorded too.
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            audit_changes,
        ))
        .with_state(state)
}

/// Serves `app` on `listener` until `shutdown`: over TLS with `tls` (each connection's
/// client certificate becomes its [`Peer`]), else in the clear with every call allowed.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    security: Option<(Arc<Security>, crate::access::VerdictsRx)>,
    gate: Arc<crate::gate::Gate>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
) {
    let Some((security, verdicts)) = security else {
        let app = app.layer(axum::Extension(Peer::Insecure));
        let r = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(e) = r {
            tracing::warn!(error = %e, "http server stopped");
        }
        return;
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(security.http.clone());
    loop {
        let (conn, addr) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "http accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // Past the descriptor budget, closed at once (see crate::gate).
        let Some(ticket) = gate.enter(crate::gate::HTTP_COST) else {
            tracing::debug!(%addr, "https connection refused: the hub holds as many as it may");
            continue;
        };
        let (acceptor, app, stop) = (acceptor.clone(), app.clone(), shutdown.clone());
        let (security, verdicts) = (security.clone(), verdicts.clone());
        let ticket = Arc::new(ticket);
        tracker.spawn(async move {
            let evicted = ticket.evicted();
            let handshake =
                tokio::time::timeout(std::time::Duration::from_secs(10), acceptor.accept(conn));
            let tls = tokio::select! {
                _ = evicted.cancelled() => return,
                h = handshake => match h {
                    Ok(Ok(t)) => t,
                    Ok(Err(e)) => {
                        tracing::debug!(%addr, error = %e, "https handshake failed");
                        return;
                    }
                    Err(_) => return,
                },
            };
            // Who it is, and the revocation watch marked seen before the book was read.
            let (admission, fingerprint, verdicts) =
                crate::access::admit_tls(&security, tls.get_ref().1, verdicts).await;
            let peer = match admission {
                crate::access::Admission::Anonymous => Peer::Anonymous,
                crate::access::Admission::In(who) => Peer::Known(who),
                crate::access::Admission::Out(why) => {
                    tracing::warn!(%addr, reason = %why, "https client refused");
                    Peer::Refused(why)
                }
            };
            let who = match &peer {
                Peer::Known(who) => Some(who.clone()),
                _ => None,
            };
            // A fleet certificate keeps the connection's place; others may be evicted, and
            // live at most UNVERIFIED_LIFETIME (slow bodies, idle keep-alives).
            match &who {
                Some(w) if !ticket.verified_as(w) => {
                    tracing::warn!(%addr, identity = %w, "https connection refused: this identity holds as many as it may");
                    return;
                }
                Some(_) => {}
                None => ticket.anonymous(),
            }
            let lifetime = {
                let ticket = ticket.clone();
                async move {
                    tokio::time::sleep(crate::gate::UNVERIFIED_LIFETIME).await;
                    // A dashboard session shown on the connection meanwhile verifies it.
                    if ticket.is_verified() {
                        std::future::pending::<()>().await;
                    }
                }
            };
            let svc = hyper_util::service::TowerToHyperService::new(
                app.layer(axum::Extension(peer))
                    .layer(axum::Extension(ClientAddr(addr)))
                    .layer(axum::Extension(PeerFingerprint(fingerprint.clone())))
                    .layer(axum::Extension(ConnTicket(ticket.clone()))),
            );
            // A client that sends its headers slowly is dropped (slowloris).
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(hyper_util::rt::TokioIo::new(tls), svc);
            tokio::pin!(conn);
            // A connection let in ends when the book shuts its holder out (keep-alive
            // connections and streams included).
            let shut_out = async {
                match who {
                    Some(who) => crate::access::until_shut_out(verdicts, who, fingerprint).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                r = conn.as_mut() => if let Err(e) = r {
                    tracing::debug!(%addr, error = %e, "https connection ended");
                },
                _ = shut_out => {
                    tracing::warn!(%addr, "https connection closed: its certificate was revoked");
                }
                _ = evicted.cancelled() => {
                    tracing::debug!(%addr, "https connection without a fleet certificate closed: room for newer ones");
                }
                _ = lifetime => {
                    tracing::debug!(%addr, "https connection without a fleet certificate closed: open too long");
                }
                _ = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), conn).await;
                }
            }
        });
    }
}

impl AppState {
    /// Whether the request's cookies hold a live dashboard session whose owner the book
    /// still lets in.
    fn session_valid(&self, headers: &axum::http::HeaderMap) -> bool {
        self.sessions
            .valid(headers, shoal_daemon::clock::now_ms(), |owner| {
                match (owner, &self.verdicts) {
                    (Some((who, f)), Some(v)) => v.borrow().still_in(who, f),
                    (None, None) => true, // --insecure
                    _ => false,
                }
            })
    }
}

fn error(status: StatusCode, msg: impl Into<String>) -> Response {
    let msg = msg.into();
    let mut r = (status, Json(ApiError { error: msg.clone() })).into_response();
    r.extensions_mut().insert(AuditNote(msg));
    r
}

/// A failed request, turned into a JSON error body (small, so `Result`s stay cheap).
struct Failure(StatusCode, String);

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        error(self.0, self.1)
    }
}

async fn ask<T>(
    s: &AppState,
    make: impl FnOnce(oneshot::Sender<T>) -> Request,
) -> Result<T, Failure> {
    let down = || {
        Failure(
            StatusCode::SERVICE_UNAVAILABLE,
            "hub is shutting down".into(),
        )
    };
    let (tx, rx) = oneshot::channel();
    let req = make(tx);
    if !req.reads_only() {
        if let Some(leader) = s.standby.borrow().as_ref() {
            return Err(Failure(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("this hub is a standby replica and changes nothing: send changes to the leader ({leader})"),
            ));
        }
    }
    s.requests.send(req).await.map_err(|_| down())?;
    rx.await.map_err(|_| down())
}

fn parse_name(name: &str) -> Result<WorkloadName, Failure> {
    WorkloadName::try_from(name).map_err(|e| Failure(StatusCode::BAD_REQUEST, e.to_string()))
}

async fn metrics(State(s): State<AppState>) -> Response {
    if let Err(f) = ask(&s, |reply| Request::RefreshMetrics { reply }).await {
        return f.into_response();
    }
    let mut out = String::new();
    match prometheus_client::encoding::text::encode(&mut out, &s.registry) {
        Ok(()) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            out,
        )
            .into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}
