//! The dashboard's way in for a browser: a login token traded for a read-only session, and
//! the server-sent event stream of the fleet.

use super::*;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

/// `POST /v1/dashboard/login` (an operator): a one-time login link for a browser.
pub(super) async fn login_token(
    State(s): State<AppState>,
    axum::Extension(peer): axum::Extension<Peer>,
    fingerprint: Option<axum::Extension<PeerFingerprint>>,
) -> Response {
    let owner = match (peer, fingerprint) {
        (Peer::Known(who), Some(axum::Extension(PeerFingerprint(f)))) => Some((who, f)),
        _ => None,
    };
    let token = s.sessions.login_token(shoal_daemon::clock::now_ms(), owner);
    Json(serde_json::json!({
        "path": format!("/login?token={token}"),
        "expiresInSeconds": crate::dashboard::LOGIN_TTL_MS / 1000,
    }))
    .into_response()
}

#[derive(Debug, serde::Deserialize)]
pub(super) struct LoginQuery {
    token: String,
}

/// `GET /login?token=T`: trades a login token for a session cookie, then shows the dashboard.
pub(super) async fn login(
    State(s): State<AppState>,
    query: Result<axum::extract::Query<LoginQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let now = shoal_daemon::clock::now_ms();
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
pub(super) const STREAM_BACKLOG: usize = 100;

/// `GET /v1/stream`: the dashboard's live view. A [`FleetView`] at once (with the latest
/// [`STREAM_BACKLOG`] events), then another whenever the fleet changes (at most about three
/// a second) and at least every 5 s (ages move on); it ends when the hub stops.
pub(super) async fn stream(
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
