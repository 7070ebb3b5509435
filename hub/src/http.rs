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
//! | `POST /v1/workloads/{name}/rollout/{pause,resume,promote,undo}` | steer a rollout |
//! | `POST /v1/workloads/{name}/scale` | body `{"replicas": N}` |
//! | `POST /v1/apply` | manifest text → `ApplyResult` (same path as an MQTT apply) |
//! | `GET /v1/secrets` | `[SecretView]`: names, keys, versions, users; never values |
//! | `DELETE /v1/secrets/{name}` | delete a secret no workload uses (409 otherwise) |
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

use crate::app::{Failed, LogRefusal, NotDurable};
use crate::blobs::BlobStore;
use crate::fleet::{RolloutAction, WorkloadRefusal};
use crate::security::Security;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use prometheus_client::registry::Registry;
use shoal_api::acl::Identity;
use shoal_api::ids::{DeviceId, Digest, SecretName, WorkloadName};
use shoal_api::labels::{LabelChange, LabelError, Labels};
use shoal_api::messages::ApplyResult;
use shoal_api::operator::Role;
use shoal_api::views::{
    ApiError, BlobRef, DeviceView, EnrollRequest, Enrolled, EventView, FleetView, LogEntry,
    RenewRequest, SecretView, WorkloadView,
};
use shoal_pki::token::JoinToken;
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

/// A question for the main loop.
#[derive(Debug)]
pub enum Request {
    Apply {
        text: ManifestText,
        reply: oneshot::Sender<ApplyResult>,
    },
    /// `Ok(false)`: no such workload.
    Delete {
        name: WorkloadName,
        reply: oneshot::Sender<Result<bool, NotDurable>>,
    },
    Devices {
        reply: oneshot::Sender<Vec<DeviceView>>,
    },
    Secrets {
        reply: oneshot::Sender<Vec<SecretView>>,
    },
    DeleteSecret {
        name: SecretName,
        reply: oneshot::Sender<Result<(), Failed<crate::fleet::SecretRefusal>>>,
    },
    /// A device enrolled (perhaps again, with a new key); what its token granted is in the
    /// enrollment book.
    Enrolled { device: DeviceId },
    /// May `device` download blob `digest` (its desired state names it)? Its reported
    /// architecture if so.
    MayFetch {
        device: DeviceId,
        digest: Digest,
        reply: oneshot::Sender<Result<String, crate::fleet::FetchRefusal>>,
    },
    /// `shoal label device`: the device's labels afterwards.
    Label {
        id: DeviceId,
        change: LabelChange,
        reply: oneshot::Sender<Result<Labels, Failed<crate::fleet::LabelRefusal>>>,
    },
    Workloads {
        reply: oneshot::Sender<Vec<WorkloadView>>,
    },
    /// Record a change in the audit log, durably; its number.
    Audit {
        change: crate::fleet::audit::Change,
        reply: oneshot::Sender<Result<u64, NotDurable>>,
    },
    /// The audit log after entry `after` (the leader's: a standby's copy is as old as the
    /// standby, so it is not answered as a read).
    AuditLog {
        after: u64,
        reply: oneshot::Sender<Vec<shoal_api::operator::AuditEntry>>,
    },
    /// The devices the enrollment book says are revoked (all of them; see
    /// [`crate::access::watch`]).
    Revoked {
        devices: std::collections::BTreeSet<DeviceId>,
    },
    /// Bring the gauges up to date before a scrape (computed on demand, not on every event).
    RefreshMetrics { reply: oneshot::Sender<()> },
    /// The fleet, and the events numbered after `after` (the dashboard's stream).
    Fleet {
        after: u64,
        reply: oneshot::Sender<FleetView>,
    },
    /// Recorded events numbered after `after`, about `object` when given.
    Events {
        after: u64,
        object: Option<String>,
        reply: oneshot::Sender<Vec<EventView>>,
    },
    Workload {
        name: WorkloadName,
        reply: oneshot::Sender<Option<WorkloadView>>,
    },
    /// Steer a rollout.
    Rollout {
        name: WorkloadName,
        action: RolloutAction,
        reply: oneshot::Sender<Result<(), Failed<WorkloadRefusal>>>,
    },
    Scale {
        name: WorkloadName,
        replicas: u32,
        reply: oneshot::Sender<Result<(), Failed<WorkloadRefusal>>>,
    },
    /// Cordon, uncordon or drain a device; `Ok(false)`: no such device.
    Device {
        id: DeviceId,
        action: DeviceAction,
        reply: oneshot::Sender<Result<bool, NotDurable>>,
    },
    /// Open a log session (`shoal logs`): all devices with a replica of `workload`, or only
    /// `device`.
    Logs {
        workload: WorkloadName,
        device: Option<DeviceId>,
        tail: Option<u32>,
        since_secs: Option<u64>,
        follow: bool,
        reply: oneshot::Sender<Result<LogStream, LogRefusal>>,
    },
}

/// An open log session, as the main loop hands it to the HTTP handler.
#[derive(Debug)]
pub struct LogStream {
    /// Devices that were asked.
    pub asked: Vec<DeviceId>,
    /// Devices that could not be asked, and why.
    pub unreachable: Vec<(DeviceId, String)>,
    /// Replicas of the workload on the devices concerned.
    pub replicas: usize,
    pub events: mpsc::Receiver<crate::logs::LogEvent>,
}

impl Request {
    /// Whether the request only reads (it changes nothing in the fleet).
    pub fn reads_only(&self) -> bool {
        matches!(
            self,
            Request::Devices { .. }
                | Request::MayFetch { .. }
                | Request::Secrets { .. }
                | Request::Workloads { .. }
                | Request::Workload { .. }
                | Request::RefreshMetrics { .. }
                | Request::Fleet { .. }
                | Request::Events { .. }
                | Request::Logs { .. }
        )
    }
}

/// A manifest as posted: its `Debug` shows only its size, since it may hold secret values.
pub struct ManifestText(pub String);

impl std::fmt::Debug for ManifestText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ManifestText({} bytes)", self.0.len())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceAction {
    Cordon,
    Uncordon,
    Drain,
}

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

/// What a route requires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    Nothing,
    /// Any fleet certificate (devices fetch blobs and renew).
    Fleet,
    /// An operator's certificate with this role at least (or the hub's).
    Operator(Role),
}

/// The access rule for a request: viewers read; deployers change workloads, secrets and
/// blobs; admins also manage devices and read the audit log.
pub fn need(method: &axum::http::Method, path: &str) -> Need {
    match (method.as_str(), path) {
        (_, "/healthz" | "/v1/ca" | "/v1/enroll") => Need::Nothing,
        // The dashboard's page and code carry no fleet data: what it shows comes from the
        // API below, with the caller's credentials.
        ("GET" | "HEAD", p) if crate::dashboard::is_static(p) => Need::Nothing,
        ("POST", "/v1/renew") => Need::Fleet,
        ("GET" | "HEAD", p) if p.starts_with("/v1/blobs/") => Need::Fleet,
        ("GET" | "HEAD", "/v1/audit") => Need::Operator(Role::Admin),
        ("GET" | "HEAD", _) => Need::Operator(Role::Viewer),
        // A read-only session for a browser.
        ("POST", "/v1/dashboard/login") => Need::Operator(Role::Viewer),
        (_, p) if p.starts_with("/v1/devices/") => Need::Operator(Role::Admin),
        _ => Need::Operator(Role::Deployer),
    }
}

/// Whether `peer` meets `need`.
fn meets(peer: &Peer, need: Need) -> bool {
    match (peer, need) {
        (Peer::Insecure, _) | (_, Need::Nothing) => true,
        (Peer::Known(_), Need::Fleet) => true,
        (Peer::Known(Identity::Hub), Need::Operator(_)) => true,
        (Peer::Known(Identity::Operator(o)), Need::Operator(role)) => o.role >= role,
        _ => false,
    }
}

async fn authorize(
    State(s): State<AppState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let peer = req
        .extensions()
        .get::<Peer>()
        .cloned()
        .unwrap_or(Peer::Anonymous);
    let need = need(req.method(), req.uri().path());
    let ok = meets(&peer, need);
    // A dashboard session (a browser signed in with `shoal dashboard`) may read.
    let session = need == Need::Operator(Role::Viewer)
        && crate::dashboard::session_may(req.method(), req.uri().path())
        && s.session_valid(req.headers());
    // A dashboard session keeps its connection, counted against the operator who asked for
    // the link.
    if session {
        let owner = s.sessions.owner(req.headers());
        if let (Some(ConnTicket(t)), Some((who, _))) =
            (req.extensions().get::<ConnTicket>(), owner.as_ref())
        {
            if !t.is_verified() && !t.verified_as(who) {
                return error(
                    StatusCode::TOO_MANY_REQUESTS,
                    format!("{who} holds as many connections as it may"),
                );
            }
        }
    }
    if ok || session {
        return next.run(req).await;
    }
    let (status, who) = match &peer {
        Peer::Known(who) => (StatusCode::FORBIDDEN, who.to_string()),
        Peer::Refused(why) => (StatusCode::FORBIDDEN, format!("a client refused ({why})")),
        _ => (
            StatusCode::UNAUTHORIZED,
            "a client without a fleet certificate".to_string(),
        ),
    };
    tracing::warn!(%who, method = %req.method(), path = req.uri().path(), "http request refused");
    let reason = match (need, &peer) {
        (Need::Operator(role), Peer::Known(Identity::Operator(_))) => {
            format!("it needs the {role} role or higher")
        }
        (_, Peer::Refused(_)) => "this hub does not let its certificate in".to_string(),
        (Need::Operator(_), _) => {
            "it needs an operator certificate (see the hub's DATA_DIR/operator bundle, or `shoal-hub operator create`)".to_string()
        }
        _ => "it needs a fleet certificate".to_string(),
    };
    error(
        status,
        format!(
            "{who} may not {} {}: {reason}",
            req.method(),
            req.uri().path()
        ),
    )
}

/// Refuses a state-changing request a browser could have sent from another site: an
/// operator who installed the operator certificate in a browser must not have a page
/// elsewhere cordon, delete or apply with it (cross-site request forgery). Browsers send
/// cross-site, without asking the hub first, only "simple" requests: no custom header and a
/// body of text/plain or a form. So a change needs [`CLIENT_HEADER`] (the CLI sends it), or
/// a JSON, YAML or binary body; and an `Origin`, when there is one, must be this host.
async fn same_site_only(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let m = req.method();
    if m == axum::http::Method::GET || m == axum::http::Method::HEAD {
        return next.run(req).await;
    }
    let h = req.headers();
    let text = |name: header::HeaderName| h.get(name).and_then(|v| v.to_str().ok());
    if let Some(origin) = text(header::ORIGIN) {
        let host = text(header::HOST).unwrap_or_default();
        let same = origin
            .split_once("://")
            .is_some_and(|(_, o)| !host.is_empty() && o.eq_ignore_ascii_case(host));
        if !same {
            tracing::warn!(origin, method = %m, path = req.uri().path(), "cross-site request refused");
            return error(
                StatusCode::FORBIDDEN,
                format!("cross-site request from origin {origin:?} refused"),
            );
        }
    }
    let marked = h.contains_key(shoal_api::views::CLIENT_HEADER);
    let mime = text(header::CONTENT_TYPE)
        .unwrap_or_default()
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    let typed = [
        "application/json",
        "application/yaml",
        "application/x-yaml",
        "application/octet-stream",
        "application/wasm",
    ]
    .contains(&mime.as_str());
    if !marked && !typed {
        tracing::warn!(content_type = %mime, method = %m, path = req.uri().path(), "request a browser could forge refused");
        return error(
            StatusCode::FORBIDDEN,
            format!(
                "{m} {} needs a JSON, YAML or binary body (Content-Type, not {mime:?}) or the {} header: a browser page could send this one from another site",
                req.uri().path(),
                shoal_api::views::CLIENT_HEADER
            ),
        );
    }
    next.run(req).await
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
        .route("/v1/devices/{id}/labels", post(label_device))
        .route("/v1/devices/{id}/{action}", post(device_action))
        .route(
            "/v1/workloads/{name}/rollout/{action}",
            post(rollout_action),
        )
        .route("/v1/workloads/{name}/scale", post(scale))
        .route("/v1/workloads/{name}/logs", get(logs))
        .route("/v1/workloads", get(workloads))
        .route("/v1/workloads/{name}", get(workload).delete(delete))
        .route("/v1/apply", post(apply))
        .route("/v1/audit", get(audit_log))
        .route("/v1/secrets", get(secrets))
        .route("/v1/secrets/{name}", axum::routing::delete(delete_secret))
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
            .valid(headers, shoal_api::messages::now_ms(), |owner| {
                match (owner, &self.verdicts) {
                    (Some((who, f)), Some(v)) => v.borrow().still_in(who, f),
                    (None, None) => true, // --insecure
                    _ => false,
                }
            })
    }
}

fn security(s: &AppState) -> Result<&Arc<Security>, Failure> {
    s.security.as_ref().ok_or_else(|| {
        Failure(
            StatusCode::NOT_FOUND,
            "this hub runs --insecure: there is no fleet CA and no enrollment".into(),
        )
    })
}

async fn ca(State(s): State<AppState>) -> Response {
    match security(&s) {
        Ok(sec) => (
            [(header::CONTENT_TYPE, "application/x-pem-file")],
            sec.ca.pem().to_string(),
        )
            .into_response(),
        Err(f) => f.into_response(),
    }
}

fn enrolled(sec: &Security, csr: &str, device: &DeviceId) -> Result<Enrolled, Failure> {
    let certificate = sec
        .ca
        .sign_csr(csr, device.as_str(), sec.device_cert_lifetime)
        .map_err(|e| Failure(StatusCode::BAD_REQUEST, e.to_string()))?;
    Ok(Enrolled {
        certificate,
        ca: sec.ca.pem().to_string(),
        signing_key: sec.signing_key.clone(),
    })
}

async fn enroll(State(s): State<AppState>, Json(req): Json<EnrollRequest>) -> Response {
    let r = async {
        let sec = security(&s)?.clone();
        let bad = |m: String| Failure(StatusCode::BAD_REQUEST, m);
        let device = DeviceId::try_from(req.device.as_str()).map_err(|e| bad(e.to_string()))?;
        if Identity::reserved(device.as_str()) {
            return Err(bad(format!("device id {:?} is reserved", device.as_str())));
        }
        let token: JoinToken = req
            .token
            .parse()
            .map_err(|e: shoal_pki::token::TokenError| {
                Failure(StatusCode::FORBIDDEN, e.to_string())
            })?;
        if token.ca_hash != sec.ca.hash() {
            return Err(Failure(
                StatusCode::FORBIDDEN,
                format!("join token {token:?} pins another fleet CA than this hub's"),
            ));
        }
        // Sign first: a bad CSR must not burn the token.
        let out = enrolled(&sec, &req.csr, &device)?;
        let now = shoal_api::messages::now_ms();
        let (id, secret) = (token.id.clone(), token.secret().to_string());
        let (sec2, dev, cert) = (sec.clone(), device.clone(), out.certificate.clone());
        let grant = tokio::task::spawn_blocking(move || {
            // Claims the token and records the certificate in one step, durably, before
            // the certificate is handed out.
            crate::enrollment::claim(&*sec2.enrollments, &id, &secret, &dev, &cert, now)
                .map_err(enroll_failure)
        })
        .await
        .map_err(|e| Failure(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
        tracing::info!(device = %device, token = %token.id, labels = ?grant.labels, "device enrolled");
        // The grant is in the book already (durable with the claim, before the certificate
        // goes out); the main loop applies it and re-seals the device's state for its key.
        let _ = s.requests.send(Request::Enrolled { device }).await;
        Ok(out)
    };
    match r.await {
        Ok(e) => Json(e).into_response(),
        Err(f) => {
            tracing::warn!(device = ?req.device, reason = %f.1, "enrollment refused");
            f.into_response()
        }
    }
}

/// A refused token is the caller's fault; anything else is the hub's.
fn enroll_failure(e: crate::enrollment::EnrollError) -> Failure {
    let status = match e {
        crate::enrollment::EnrollError::Refused(_) | crate::enrollment::EnrollError::Revoked(_) => {
            StatusCode::FORBIDDEN
        }
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    Failure(status, e.to_string())
}

async fn renew(
    State(s): State<AppState>,
    axum::Extension(peer): axum::Extension<Peer>,
    Json(req): Json<RenewRequest>,
) -> Response {
    let r = async {
        let sec = security(&s)?.clone();
        let Peer::Known(Identity::Device(device)) = peer else {
            return Err(Failure(
                StatusCode::FORBIDDEN,
                "only a device renews its certificate".into(),
            ));
        };
        // The record's store may be etcd: blocking calls off the async threads.
        tokio::task::spawn_blocking(move || {
            let Some(recorded) = sec
                .enrollments
                .enrolled_cert(&device)
                .map_err(enroll_failure)?
            else {
                return Err(Failure(
                    StatusCode::FORBIDDEN,
                    format!("device {:?} is not enrolled (any more)", device.as_str()),
                ));
            };
            // A renewal keeps the key the device enrolled with: the key its secrets are
            // sealed to, and the one its connections are checked against. A new key needs a
            // new enrollment (a token the operator gave).
            let bad = |e: shoal_pki::PkiError| Failure(StatusCode::BAD_REQUEST, e.to_string());
            let asked = shoal_pki::tls::public_key_of_csr(&req.csr).map_err(bad)?;
            let known = shoal_pki::tls::public_key_of_pem(&recorded)
                .map_err(|e| Failure(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
            if asked != known {
                return Err(Failure(
                    StatusCode::FORBIDDEN,
                    format!(
                        "device {:?} asked to renew for a key it did not enroll with: renewal keeps the key; enroll again with a join token for a new one",
                        device.as_str()
                    ),
                ));
            }
            // A connection admitted before a revocation may still be open.
            if crate::access::revoked(&*sec.enrollments, &device).map_err(enroll_failure)? {
                return Err(Failure(
                    StatusCode::FORBIDDEN,
                    format!("device {:?} was revoked", device.as_str()),
                ));
            }
            let out = enrolled(&sec, &req.csr, &device)?;
            if !sec
                .enrollments
                .renew_record(&device, &recorded, &out.certificate)
                .map_err(enroll_failure)?
            {
                return Err(Failure(
                    StatusCode::CONFLICT,
                    format!(
                        "device {:?} enrolled again while this renewal ran: renew with the new certificate",
                        device.as_str()
                    ),
                ));
            }
            tracing::info!(device = %device, "device certificate renewed");
            Ok(out)
        })
        .await
        .map_err(|e| Failure(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
    };
    match r.await {
        Ok(e) => Json(e).into_response(),
        Err(f) => f.into_response(),
    }
}

fn error(status: StatusCode, msg: impl Into<String>) -> Response {
    let msg = msg.into();
    let mut r = (status, Json(ApiError { error: msg.clone() })).into_response();
    r.extensions_mut().insert(AuditNote(msg));
    r
}

/// What a response says happened, for the audit log (set by handlers; errors carry their
/// message).
#[derive(Debug, Clone)]
struct AuditNote(String);

/// The connection's place at the gate (a dashboard session keeps it, see `authorize`).
#[derive(Debug, Clone)]
struct ConnTicket(Arc<crate::gate::Ticket>);

/// The SHA-256 of the connection's client certificate.
#[derive(Debug, Clone)]
struct PeerFingerprint(String);

/// The address a connection comes from (the audit log's "from").
#[derive(Debug, Clone, Copy)]
struct ClientAddr(std::net::SocketAddr);

/// Records every change an operator (or the hub) asks for in the audit log — who, from
/// where, what, and what came of it, refusals included — durably, before the answer goes
/// out. Reads are not recorded; neither are requests without an operator's certificate
/// (enrollment, renewal: a flood of those must not push operators' entries out).
async fn audit_changes(
    State(s): State<AppState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let m = req.method().clone();
    let who = match req.extensions().get::<Peer>() {
        Some(Peer::Known(who @ (Identity::Operator(_) | Identity::Hub))) => who.to_string(),
        Some(Peer::Insecure) => "anyone (--insecure)".to_string(),
        _ => return next.run(req).await,
    };
    if m == axum::http::Method::GET || m == axum::http::Method::HEAD {
        return next.run(req).await;
    }
    let from = req
        .extensions()
        .get::<ClientAddr>()
        .map_or_else(|| "unknown".to_string(), |a| a.0.to_string());
    let action = format!("{m} {}", req.uri().path());
    let response = next.run(req).await;
    let status = response.status();
    let mut outcome = match response.extensions().get::<AuditNote>() {
        Some(AuditNote(note)) if status.is_success() => note.clone(),
        Some(AuditNote(note)) => format!("refused ({}): {note}", status.as_u16()),
        None => format!("{}", status.as_u16()),
    };
    if !status.is_success() {
        let budget = s
            .refusals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take(&who, shoal_api::messages::now_ms());
        match budget {
            None => return response,
            Some(0) => {}
            Some(n) => outcome.push_str(&format!(" ({n} more refused requests not recorded)")),
        }
    }
    let change = crate::fleet::audit::Change {
        who,
        from,
        action,
        outcome: shoal_api::printable::escaped(&outcome).into_owned(),
        accepted: status.is_success(),
    };
    match ask(&s, |reply| Request::Audit { change, reply }).await {
        Ok(Ok(_)) => response,
        Ok(Err(e)) => {
            tracing::error!(error = %e, "cannot record a change in the audit log");
            response
        }
        // A standby refuses changes, and has nothing to record.
        Err(_) => response,
    }
}

/// `GET /v1/audit?after=N`: the audit log after entry N, oldest first.
async fn audit_log(
    State(s): State<AppState>,
    query: Result<axum::extract::Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let q = match query {
        Ok(axum::extract::Query(q)) => q,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    match ask(&s, |reply| Request::AuditLog {
        after: q.after,
        reply,
    })
    .await
    {
        Ok(v) => Json(v).into_response(),
        Err(f) => f.into_response(),
    }
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditQuery {
    #[serde(default)]
    after: u64,
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

async fn devices(State(s): State<AppState>) -> Response {
    match ask(&s, |reply| Request::Devices { reply }).await {
        Ok(v) => Json(v).into_response(),
        Err(f) => f.into_response(),
    }
}

async fn device_action(
    State(s): State<AppState>,
    Path((id, action)): Path<(String, String)>,
) -> Response {
    let id: DeviceId = match id.parse() {
        Ok(d) => d,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("{e}")),
    };
    let action = match action.as_str() {
        "cordon" => DeviceAction::Cordon,
        "uncordon" => DeviceAction::Uncordon,
        "drain" => DeviceAction::Drain,
        other => {
            return error(
                StatusCode::NOT_FOUND,
                format!("device action {other:?} is unknown: expected cordon, uncordon or drain"),
            )
        }
    };
    match ask(&s, |reply| Request::Device {
        id: id.clone(),
        action,
        reply,
    })
    .await
    {
        Ok(Ok(true)) => {
            Json(serde_json::json!({ "device": id.as_str(), "done": action_name(action) }))
                .into_response()
        }
        Ok(Ok(false)) => error(
            StatusCode::NOT_FOUND,
            format!("device {:?} not found", id.as_str()),
        ),
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        Err(f) => f.into_response(),
    }
}

/// The optional body of `POST …/rollout/undo`.
#[derive(serde::Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct UndoBody {
    #[serde(default)]
    to_revision: Option<String>,
}

async fn rollout_action(
    State(s): State<AppState>,
    Path((name, action)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    let name = match parse_name(&name) {
        Ok(n) => n,
        Err(f) => return f.into_response(),
    };
    let action = match action.as_str() {
        "pause" => RolloutAction::Pause,
        "resume" => RolloutAction::Resume,
        "promote" => RolloutAction::Promote,
        "undo" => {
            let body = if body.iter().all(u8::is_ascii_whitespace) {
                Ok(UndoBody::default())
            } else {
                serde_json::from_slice::<UndoBody>(&body)
            };
            match body {
                Ok(b) => RolloutAction::Undo { to: b.to_revision },
                Err(e) => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        format!("expected {{\"toRevision\": \"REVISION\"}} or no body: {e}"),
                    )
                }
            }
        }
        other => {
            return error(
                StatusCode::NOT_FOUND,
                format!(
                    "rollout action {other:?} is unknown: expected pause, resume, promote or undo"
                ),
            )
        }
    };
    answer(
        ask(&s, |reply| Request::Rollout {
            name,
            action,
            reply,
        })
        .await,
    )
}

#[derive(serde::Deserialize)]
struct ScaleBody {
    replicas: u32,
}

async fn scale(State(s): State<AppState>, Path(name): Path<String>, body: Bytes) -> Response {
    let name = match parse_name(&name) {
        Ok(n) => n,
        Err(f) => return f.into_response(),
    };
    let replicas = match serde_json::from_slice::<ScaleBody>(&body) {
        Ok(b) => b.replicas,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("expected {{\"replicas\": N}}: {e}"),
            )
        }
    };
    answer(
        ask(&s, |reply| Request::Scale {
            name,
            replicas,
            reply,
        })
        .await,
    )
}

async fn label_device(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Json(change): Json<LabelChange>,
) -> Response {
    let id: DeviceId = match id.parse() {
        Ok(d) => d,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("{e}")),
    };
    if let Err(e) = change.check() {
        return error(StatusCode::BAD_REQUEST, e.to_string());
    }
    match ask(&s, |reply| Request::Label { id, change, reply }).await {
        Ok(Ok(labels)) => Json(labels).into_response(),
        Ok(Err(e)) => failed(e, |r| match r {
            crate::fleet::LabelRefusal::UnknownDevice(_) => StatusCode::NOT_FOUND,
            crate::fleet::LabelRefusal::Invalid(LabelError::Exists { .. }) => StatusCode::CONFLICT,
            crate::fleet::LabelRefusal::Invalid(_) => StatusCode::BAD_REQUEST,
        }),
        Err(f) => f.into_response(),
    }
}

/// The answer to a change the main loop did not make: the refusal's status (`status_of`),
/// or 500 when the hub could not make it durable. The one place a refusal becomes a status.
fn failed<R: std::fmt::Display>(f: Failed<R>, status_of: impl Fn(&R) -> StatusCode) -> Response {
    match &f {
        Failed::Refused(r) => error(status_of(r), f.to_string()),
        Failed::NotDurable(_) => error(StatusCode::INTERNAL_SERVER_ERROR, f.to_string()),
    }
}

/// The main loop's verdict on a workload command: done, refused (404 for a workload that
/// does not exist, else 422) or failed (500).
fn answer(r: Result<Result<(), Failed<WorkloadRefusal>>, Failure>) -> Response {
    match r {
        Ok(Ok(())) => Json(serde_json::json!({ "ok": true })).into_response(),
        Ok(Err(e)) => failed(e, |r| match r {
            WorkloadRefusal::NotFound(_) => StatusCode::NOT_FOUND,
            _ => StatusCode::UNPROCESSABLE_ENTITY,
        }),
        Err(f) => f.into_response(),
    }
}

fn action_name(a: DeviceAction) -> &'static str {
    match a {
        DeviceAction::Cordon => "cordoned",
        DeviceAction::Uncordon => "uncordoned",
        DeviceAction::Drain => "drained",
    }
}

async fn workloads(State(s): State<AppState>) -> Response {
    match ask(&s, |reply| Request::Workloads { reply }).await {
        Ok(v) => Json(v).into_response(),
        Err(f) => f.into_response(),
    }
}

async fn workload(State(s): State<AppState>, Path(name): Path<String>) -> Response {
    let name = match parse_name(&name) {
        Ok(n) => n,
        Err(f) => return f.into_response(),
    };
    match ask(&s, |reply| Request::Workload {
        name: name.clone(),
        reply,
    })
    .await
    {
        Ok(Some(v)) => Json(v).into_response(),
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            format!("workload {:?} not found", name.as_str()),
        ),
        Err(f) => f.into_response(),
    }
}

async fn secrets(State(s): State<AppState>) -> Response {
    match ask(&s, |reply| Request::Secrets { reply }).await {
        Ok(v) => Json(v).into_response(),
        Err(f) => f.into_response(),
    }
}

async fn delete_secret(State(s): State<AppState>, Path(name): Path<String>) -> Response {
    let name = match SecretName::try_from(name.as_str()) {
        Ok(n) => n,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
    };
    match ask(&s, |reply| Request::DeleteSecret {
        name: name.clone(),
        reply,
    })
    .await
    {
        Ok(Ok(())) => Json(serde_json::json!({ "deleted": name.as_str() })).into_response(),
        Ok(Err(e)) => failed(e, |r| match r {
            crate::fleet::SecretRefusal::NotFound(_) => StatusCode::NOT_FOUND,
            crate::fleet::SecretRefusal::InUse { .. } => StatusCode::CONFLICT,
        }),
        Err(f) => f.into_response(),
    }
}

async fn delete(State(s): State<AppState>, Path(name): Path<String>) -> Response {
    let name = match parse_name(&name) {
        Ok(n) => n,
        Err(f) => return f.into_response(),
    };
    match ask(&s, |reply| Request::Delete {
        name: name.clone(),
        reply,
    })
    .await
    {
        Ok(Ok(true)) => Json(serde_json::json!({ "deleted": name.as_str() })).into_response(),
        Ok(Ok(false)) => error(
            StatusCode::NOT_FOUND,
            format!("workload {:?} not found", name.as_str()),
        ),
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        Err(f) => f.into_response(),
    }
}

async fn apply(State(s): State<AppState>, body: Bytes) -> Response {
    let text = match String::from_utf8(body.to_vec()) {
        Ok(t) => t,
        Err(_) => return error(StatusCode::BAD_REQUEST, "manifest is not valid UTF-8"),
    };
    let text = ManifestText(text);
    match ask(&s, |reply| Request::Apply { text, reply }).await {
        Ok(r) => {
            let note = AuditNote(crate::fleet::audit::apply_outcome(&r));
            let status = match r.accepted {
                true => StatusCode::OK,
                false => StatusCode::UNPROCESSABLE_ENTITY,
            };
            let mut response = (status, Json(r)).into_response();
            response.extensions_mut().insert(note);
            response
        }
        Err(f) => f.into_response(),
    }
}

async fn put_blob(State(s): State<AppState>, body: Bytes) -> Response {
    let size = body.len() as u64;
    let blobs = s.blobs.clone();
    match tokio::task::spawn_blocking(move || blobs.put(&body)).await {
        Ok(Ok(d)) => Json(BlobRef {
            digest: d.to_string(),
            size,
        })
        .into_response(),
        Ok(Err(e)) => error(StatusCode::BAD_REQUEST, e.to_string()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// A device downloads only the blobs its desired state names (the hub's answer is its
/// reported architecture, which bounds the precompiled targets it may ask for); operators and
/// the hub anything. `Ok(None)`: no device identity to hold to (operators, `--insecure`).
async fn device_may_fetch(
    s: &AppState,
    peer: &Peer,
    d: &Digest,
) -> Result<Option<String>, Failure> {
    let Peer::Known(Identity::Device(device)) = peer else {
        return Ok(None);
    };
    let answer = ask(s, |reply| Request::MayFetch {
        device: device.clone(),
        digest: d.clone(),
        reply,
    })
    .await?;
    match answer {
        Ok(arch) => Ok(Some(arch)),
        Err(refused) => {
            tracing::warn!(%device, digest = %d, reason = %refused, "blob download refused");
            Err(Failure(StatusCode::FORBIDDEN, refused.to_string()))
        }
    }
}

async fn get_blob(
    State(s): State<AppState>,
    axum::Extension(peer): axum::Extension<Peer>,
    Path(digest): Path<String>,
) -> Response {
    let d: Digest = match digest.parse() {
        Ok(d) => d,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("{e}")),
    };
    if let Err(f) = device_may_fetch(&s, &peer, &d).await {
        return f.into_response();
    }
    let blobs = s.blobs.clone();
    let dd = d.clone();
    match tokio::task::spawn_blocking(move || blobs.open_blob(&dd)).await {
        // Streamed from disk, a chunk at a time: many devices fetching a large module hold
        // a file each, not a copy of it.
        Ok(Ok((file, len))) => {
            let stream = tokio_util::io::ReaderStream::new(tokio::fs::File::from_std(file));
            (
                [
                    (header::CONTENT_TYPE, "application/wasm".to_string()),
                    (header::CONTENT_LENGTH, len.to_string()),
                ],
                axum::body::Body::from_stream(stream),
            )
                .into_response()
        }
        Ok(Err(_)) => error(
            StatusCode::NOT_FOUND,
            format!("blob {:?} not found", d.as_str()),
        ),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// The query of `GET /v1/blobs/{digest}/precompiled`.
#[derive(Debug, serde::Deserialize)]
struct PrecompileQuery {
    /// The agent's engine target (`shoal_engine::native_target`).
    target: String,
    /// The agent's `shoal_engine::ENGINE_ID`.
    engine: String,
}

/// A precompiled artifact, compiled on the first request: only for a known target
/// ([`shoal_engine::KNOWN_TARGETS`]), and a device gets only its own architecture's, of a
/// module its desired state names. Every other request is refused before any compiling.
async fn get_precompiled(
    State(s): State<AppState>,
    axum::Extension(peer): axum::Extension<Peer>,
    Path(digest): Path<String>,
    axum::extract::Query(q): axum::extract::Query<PrecompileQuery>,
) -> Response {
    use crate::blobs::PrecompileError as E;
    let d: Digest = match digest.parse() {
        Ok(d) => d,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("{e}")),
    };
    let Some(target) = shoal_engine::known_target(&q.target) else {
        tracing::warn!(target = ?q.target, "precompile refused: unknown target");
        return error(
            StatusCode::BAD_REQUEST,
            format!(
                "target {:?} is not one this hub compiles for: expected one of {}",
                q.target,
                shoal_engine::KNOWN_TARGETS.join(", ")
            ),
        );
    };
    match device_may_fetch(&s, &peer, &d).await {
        Err(f) => return f.into_response(),
        Ok(Some(arch)) if !shoal_engine::target_fits(target, &arch) => {
            tracing::warn!(%target, %arch, "precompile refused: not the device's architecture");
            return error(
                StatusCode::FORBIDDEN,
                format!("target {target:?} is not for this device's architecture {arch:?}"),
            );
        }
        Ok(_) => {}
    }
    let blobs = s.blobs.clone();
    let (dd, engine) = (d.clone(), q.engine.clone());
    match tokio::task::spawn_blocking(move || blobs.precompiled(&dd, &engine, target)).await {
        Ok(Ok(bytes)) => {
            // Native code: signed by the hub's key, which the agent checks before keeping it.
            let signature = s.security.as_ref().map(|sec| {
                sec.signer
                    .sign_artifact(d.as_str(), target, &q.engine, &bytes)
            });
            let mut r =
                ([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response();
            if let Some(v) = signature.and_then(|s| header::HeaderValue::from_str(&s).ok()) {
                r.headers_mut().insert(ARTIFACT_SIGNATURE, v);
            }
            r
        }
        Ok(Err(e)) => {
            let status = match &e {
                E::Engine { .. } => StatusCode::CONFLICT,
                E::BadTarget(_) => StatusCode::BAD_REQUEST,
                E::NotFound(_) => StatusCode::NOT_FOUND,
                E::Compile { .. } => StatusCode::UNPROCESSABLE_ENTITY,
                E::Io(_) => StatusCode::INTERNAL_SERVER_ERROR,
            };
            tracing::warn!(error = %e, "precompile refused");
            error(status, e.to_string())
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// `GET /v1/events` query.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct EventsQuery {
    #[serde(default)]
    after: u64,
    object: Option<String>,
}

async fn events(
    State(s): State<AppState>,
    query: Result<axum::extract::Query<EventsQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let q = match query {
        Ok(axum::extract::Query(q)) => q,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    match ask(&s, |reply| Request::Events {
        after: q.after,
        object: q.object,
        reply,
    })
    .await
    {
        Ok(v) => Json(v).into_response(),
        Err(f) => f.into_response(),
    }
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct LogsQuery {
    device: Option<String>,
    tail: Option<u32>,
    /// Seconds.
    since: Option<u64>,
    #[serde(default)]
    follow: bool,
}

/// How long a device may stay silent before a (not followed) log read gives up on it.
const LOG_ANSWER_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// `GET /v1/workloads/{name}/logs`: the lines the devices send, as they come, one
/// [`LogEntry`] per line; the header `x-shoal-replicas` says how many replicas they come from.
async fn logs(
    State(s): State<AppState>,
    Path(name): Path<String>,
    query: Result<axum::extract::Query<LogsQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let q = match query {
        Ok(axum::extract::Query(q)) => q,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    let workload = match parse_name(&name) {
        Ok(w) => w,
        Err(f) => return f.into_response(),
    };
    let device = match q.device.as_deref().map(DeviceId::try_from).transpose() {
        Ok(d) => d,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
    };
    let follow = q.follow;
    let opened = ask(&s, |reply| Request::Logs {
        workload,
        device,
        tail: q.tail,
        since_secs: q.since,
        follow,
        reply,
    })
    .await;
    let stream = match opened {
        Ok(Ok(st)) => st,
        // Every refusal names something that is not there (or not placed yet).
        Ok(Err(e)) => return error(StatusCode::NOT_FOUND, e.to_string()),
        Err(f) => return f.into_response(),
    };
    let replicas = stream.replicas;
    let first: Vec<LogEntry> = stream
        .unreachable
        .iter()
        .map(|(d, why)| LogEntry {
            device: d.to_string(),
            instance: String::new(),
            line: String::new(),
            error: Some(why.clone()),
        })
        .collect();
    let pending: std::collections::BTreeSet<DeviceId> = stream.asked.into_iter().collect();
    let state = (stream.events, pending, Some(first), s.shutdown.clone());
    let body = futures_util::stream::unfold(
        state,
        move |(mut rx, mut pending, first, stop)| async move {
            if let Some(entries) = first {
                return Some((Ok(ndjson(&entries)), (rx, pending, None, stop)));
            }
            if !follow && pending.is_empty() {
                return None;
            }
            let next = tokio::select! {
                () = stop.cancelled() => return None,
                e = rx.recv() => e,
                // Only a read that ends waits for answers; a follow waits for lines.
                () = tokio::time::sleep(LOG_ANSWER_WAIT), if !follow => {
                    if pending.is_empty() {
                        return None;
                    }
                    let silent: Vec<LogEntry> = std::mem::take(&mut pending)
                        .into_iter()
                        .map(|d| LogEntry {
                            error: Some(format!(
                                "device {d} did not answer within {}s",
                                LOG_ANSWER_WAIT.as_secs()
                            )),
                            device: d.to_string(),
                            instance: String::new(),
                            line: String::new(),
                        })
                        .collect();
                    return Some((Ok(ndjson(&silent)), (rx, pending, None, stop)));
                }
            };
            let entries = match next? {
            crate::logs::LogEvent::Chunk(c) => {
                if c.done {
                    pending.remove(&c.device_id);
                }
                let device = c.device_id.to_string();
                let mut v: Vec<LogEntry> = c
                    .lines
                    .into_iter()
                    .map(|l| LogEntry {
                        device: device.clone(),
                        instance: l.instance,
                        line: l.line,
                        error: None,
                    })
                    .collect();
                if let Some(e) = c.error {
                    v.push(LogEntry {
                        device,
                        instance: String::new(),
                        line: String::new(),
                        error: Some(e),
                    });
                }
                v
            }
            crate::logs::LogEvent::Dropped { device, chunks } => vec![LogEntry {
                error: Some(format!(
                    "{chunks} chunk(s) of lines from device {device} were dropped: this reader fell behind"
                )),
                device: device.to_string(),
                instance: String::new(),
                line: String::new(),
            }],
        };
            Some((
                Ok::<_, std::convert::Infallible>(ndjson(&entries)),
                (rx, pending, None, stop),
            ))
        },
    );
    (
        [
            (header::CONTENT_TYPE, "application/x-ndjson".to_string()),
            (
                header::HeaderName::from_static("x-shoal-replicas"),
                replicas.to_string(),
            ),
        ],
        axum::body::Body::from_stream(body),
    )
        .into_response()
}

/// One JSON document per line.
fn ndjson(entries: &[LogEntry]) -> Bytes {
    let mut out = Vec::new();
    for e in entries {
        if serde_json::to_writer(&mut out, e).is_ok() {
            out.push(b'\n');
        }
    }
    Bytes::from(out)
}

/// `POST /v1/dashboard/login` (an operator): a one-time login link for a browser.
async fn login_token(
    State(s): State<AppState>,
    axum::Extension(peer): axum::Extension<Peer>,
    fingerprint: Option<axum::Extension<PeerFingerprint>>,
) -> Response {
    let owner = match (peer, fingerprint) {
        (Peer::Known(who), Some(axum::Extension(PeerFingerprint(f)))) => Some((who, f)),
        _ => None,
    };
    let token = s.sessions.login_token(shoal_api::messages::now_ms(), owner);
    Json(serde_json::json!({
        "path": format!("/login?token={token}"),
        "expiresInSeconds": crate::dashboard::LOGIN_TTL_MS / 1000,
    }))
    .into_response()
}

#[derive(Debug, serde::Deserialize)]
struct LoginQuery {
    token: String,
}

/// `GET /login?token=T`: trades a login token for a session cookie, then shows the dashboard.
async fn login(
    State(s): State<AppState>,
    query: Result<axum::extract::Query<LoginQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let now = shoal_api::messages::now_ms();
    let Some(session) = query.ok().and_then(|q| s.sessions.log_in(&q.token, now)) else {
        return error(
            StatusCode::UNAUTHORIZED,
            "this login link is invalid, used or expired: run `shoal dashboard` for a new one",
        );
    };
    let secure = if s.security.is_some() { "; Secure" } else { "" };
    (
        StatusCode::SEE_OTHER,
        [
            (
                header::SET_COOKIE,
                format!(
                    "{}={session}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{secure}",
                    crate::dashboard::COOKIE,
                    crate::dashboard::SESSION_TTL_MS / 1000
                ),
            ),
            (header::LOCATION, "/".to_string()),
        ],
    )
        .into_response()
}

/// How many past events the first message of a stream carries.
const STREAM_BACKLOG: usize = 100;

/// `GET /v1/stream`: the dashboard's live view. A [`FleetView`] at once (with the latest
/// [`STREAM_BACKLOG`] events), then another whenever the fleet changes (at most about three
/// a second) and at least every 5 s (ages move on); it ends when the hub stops.
async fn stream(
    State(s): State<AppState>,
    axum::Extension(peer): axum::Extension<Peer>,
    headers: axum::http::HeaderMap,
) -> Response {
    use axum::response::sse::{Event, KeepAlive, Sse};
    // A browser's stream lasts as long as its session (expiry, its owner's revocation); a
    // certificate's connection is ended by the revocation watch itself.
    let by_session = !matches!(peer, Peer::Known(_) | Peer::Insecure);
    let mut changed = s.fleet_changed.clone();
    changed.mark_unchanged();
    let first = true;
    let after = 0u64;
    let messages = futures_util::stream::unfold(
        (s, changed, after, first),
        move |(s, mut changed, after, first)| {
            let headers = headers.clone();
            async move {
                if by_session && !s.session_valid(&headers) {
                    return None;
                }
                if !first {
                    tokio::select! {
                        _ = s.shutdown.cancelled() => return None,
                        _ = tokio::time::sleep(std::time::Duration::from_millis(300)) => {}
                    }
                    tokio::select! {
                        _ = s.shutdown.cancelled() => return None,
                        r = changed.changed() => r.ok()?,
                        _ = tokio::time::sleep(std::time::Duration::from_secs(5)) => {}
                    }
                }
                let mut fleet = ask(&s, |reply| Request::Fleet { after, reply })
                    .await
                    .ok()?;
                if first && fleet.events.len() > STREAM_BACKLOG {
                    fleet.events.drain(..fleet.events.len() - STREAM_BACKLOG);
                }
                let after = fleet.events.last().map_or(after, |e| e.seq);
                let event = Event::default().event("fleet").json_data(&fleet).ok()?;
                Some((
                    Ok::<_, std::convert::Infallible>(event),
                    (s, changed, after, false),
                ))
            }
        },
    );
    Sse::new(messages)
        .keep_alive(KeepAlive::default())
        .into_response()
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

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::Method;

    #[test]
    fn who_needs_what() {
        let table = [
            (Method::GET, "/healthz", Need::Nothing),
            (Method::GET, "/", Need::Nothing),
            (Method::GET, "/ui/app.js", Need::Nothing),
            (Method::GET, "/login", Need::Nothing),
            (Method::POST, "/v1/enroll", Need::Nothing),
            (Method::POST, "/v1/renew", Need::Fleet),
            (Method::GET, "/v1/blobs/sha256:ab", Need::Fleet),
            (Method::GET, "/v1/stream", Need::Operator(Role::Viewer)),
            (Method::GET, "/v1/events", Need::Operator(Role::Viewer)),
            (
                Method::POST,
                "/v1/dashboard/login",
                Need::Operator(Role::Viewer),
            ),
            (Method::POST, "/", Need::Operator(Role::Deployer)),
            (Method::GET, "/ui/other.js", Need::Operator(Role::Viewer)),
            (
                Method::DELETE,
                "/v1/workloads/web",
                Need::Operator(Role::Deployer),
            ),
            (Method::POST, "/v1/apply", Need::Operator(Role::Deployer)),
            (
                Method::POST,
                "/v1/workloads/web/scale",
                Need::Operator(Role::Deployer),
            ),
            (
                Method::DELETE,
                "/v1/secrets/s",
                Need::Operator(Role::Deployer),
            ),
            (
                Method::POST,
                "/v1/devices/d/labels",
                Need::Operator(Role::Admin),
            ),
            (
                Method::POST,
                "/v1/devices/d/drain",
                Need::Operator(Role::Admin),
            ),
            (Method::GET, "/v1/devices", Need::Operator(Role::Viewer)),
            (Method::GET, "/v1/audit", Need::Operator(Role::Admin)),
        ];
        for (m, p, want) in table {
            assert_eq!(need(&m, p), want, "{m} {p}");
        }
    }
}
