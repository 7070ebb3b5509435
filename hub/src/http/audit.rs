//! The audit middleware (every change an operator asks for is recorded, refusals too) and
//! `GET /v1/audit`.

use super::*;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use shoal_api::policy::acl::Identity;
use std::sync::Arc;

/// What a response says happened, for the audit log (set by handlers; errors carry their
/// message).
#[derive(Debug, Clone)]
pub(super) struct AuditNote(pub(super) String);

/// The connection's place at the gate (a dashboard session keeps it, see `authorize`).
#[derive(Debug, Clone)]
pub(super) struct ConnTicket(pub(super) Arc<crate::gate::Ticket>);

/// The SHA-256 of the connection's client certificate.
#[derive(Debug, Clone)]
pub(super) struct PeerFingerprint(pub(super) String);

/// The address a connection comes from (the audit log's "from").
#[derive(Debug, Clone, Copy)]
pub(super) struct ClientAddr(pub(super) std::net::SocketAddr);

/// Records every change an operator (or the hub) asks for in the audit log — who, from
/// where, what, and what came of it, refusals included — durably, before the answer goes
/// out. Reads are not recorded; neither are requests without an operator's certificate
/// (enrollment, renewal: a flood of those must not push operators' entries out).
pub(super) async fn audit_changes(
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
            .take(&who, shoal_daemon::clock::now_ms());
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
        outcome: shoal_api::present::printable::escaped(&outcome).into_owned(),
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
pub(super) async fn audit_log(
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
pub(super) struct AuditQuery {
    #[serde(default)]
    after: u64,
}
