//! The web dashboard: one page, one script and one stylesheet, compiled into the hub
//! (`include_str!`), served at `/` of its HTTP listener. No build step and no CDN: it works
//! on a fleet without internet.
//!
//! The page holds no data. Its script opens `GET /v1/stream` (server-sent events, see
//! [`crate::http`]) and renders what arrives: the fleet overview (devices and their load,
//! workloads and their phases, recent events), a workload's page (replicas, rollout
//! progress, history, events) and a device's page. Hand-written plain JavaScript: the views
//! are a few tables, which a framework (and its toolchain) would not make simpler.
//!
//! Signing in (a hub with TLS): a browser has no operator certificate, so `shoal dashboard`
//! asks the hub (with the operator's) for a one-time login link, `/login?token=…`, valid
//! [`LOGIN_TTL_MS`]. Opening it trades the token for a session cookie (`HttpOnly`, `Secure`,
//! `SameSite=Strict`, [`SESSION_TTL_MS`]) that lets the browser *read* the fleet: the
//! dashboard's GET routes, never a change. Sessions live in the hub's memory: a restarted
//! hub asks for a new link.

use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use std::collections::HashMap;
use std::sync::Mutex;

/// How long a login link may wait to be opened.
pub const LOGIN_TTL_MS: u64 = 5 * 60 * 1000;
/// How long a dashboard session lasts.
pub const SESSION_TTL_MS: u64 = 12 * 3600 * 1000;
/// The session cookie's name.
pub const COOKIE: &str = "shoal_session";

/// Who asked for a login link: a session reads as long as its owner may (a revoked
/// operator's sessions end with it). `None`: a hub run `--insecure`.
pub type Owner = Option<(shoal_api::policy::acl::Identity, String)>;

/// Login tokens and sessions, by their random value.
#[derive(Debug, Default)]
pub struct Sessions {
    /// token → (expiry (ms), owner): one use each.
    logins: Mutex<HashMap<String, (u64, Owner)>>,
    /// session → (expiry (ms), owner).
    sessions: Mutex<HashMap<String, (u64, Owner)>>,
}

fn random_token() -> String {
    hex::encode(rand::random::<[u8; 32]>())
}

impl Sessions {
    /// A new one-time login token for `owner` (the operator who asked: its identity and
    /// certificate fingerprint).
    pub fn login_token(&self, now_ms: u64, owner: Owner) -> String {
        let token = random_token();
        if let Ok(mut l) = self.logins.lock() {
            l.retain(|_, (exp, _)| *exp > now_ms);
            l.insert(token.clone(), (now_ms + LOGIN_TTL_MS, owner));
        }
        token
    }

    /// Trades a login token (once) for a session.
    pub fn log_in(&self, token: &str, now_ms: u64) -> Option<String> {
        let owner = self
            .logins
            .lock()
            .ok()?
            .remove(token)
            .filter(|(exp, _)| *exp > now_ms)?
            .1;
        let session = random_token();
        let mut s = self.sessions.lock().ok()?;
        s.retain(|_, (exp, _)| *exp > now_ms);
        s.insert(session.clone(), (now_ms + SESSION_TTL_MS, owner));
        Some(session)
    }

    /// The owner of the session the request's cookies hold, if any.
    pub fn owner(&self, headers: &axum::http::HeaderMap) -> Owner {
        let sessions = self.sessions.lock().ok()?;
        headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|c| c.trim().split_once('='))
            .find_map(|(k, v)| (k == COOKIE).then(|| sessions.get(v)).flatten())
            .and_then(|(_, owner)| owner.clone())
    }

    /// Whether the request's cookies hold a live session whose owner `may` still read.
    pub fn valid(
        &self,
        headers: &axum::http::HeaderMap,
        now_ms: u64,
        may: impl Fn(&Owner) -> bool,
    ) -> bool {
        let Ok(sessions) = self.sessions.lock() else {
            return false;
        };
        headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|c| c.trim().split_once('='))
            .any(|(k, v)| {
                k == COOKIE
                    && sessions
                        .get(v)
                        .is_some_and(|(exp, owner)| *exp > now_ms && may(owner))
            })
    }
}

/// The routes a dashboard session may call: reading the fleet, nothing else.
pub fn session_may(method: &axum::http::Method, path: &str) -> bool {
    matches!(method.as_str(), "GET" | "HEAD")
        && (matches!(
            path,
            "/v1/stream" | "/v1/devices" | "/v1/workloads" | "/v1/events"
        ) || path
            .strip_prefix("/v1/workloads/")
            .is_some_and(|n| !n.is_empty() && !n.contains('/')))
}

const INDEX: &str = include_str!("../ui/index.html");
const SCRIPT: &str = include_str!("../ui/app.js");
const STYLE: &str = include_str!("../ui/app.css");

/// Whether `path` is one of the dashboard's static files (served without credentials).
pub fn is_static(path: &str) -> bool {
    matches!(path, "/" | "/ui/app.js" | "/ui/app.css" | "/login")
}

fn file(content_type: &'static str, body: &'static str) -> axum::response::Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            // Only this origin's script and styles; no frames, no third-party anything.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
            ),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response()
}

pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route(
            "/",
            get(|| async { file("text/html; charset=utf-8", INDEX) }),
        )
        .route(
            "/ui/app.js",
            get(|| async { file("text/javascript; charset=utf-8", SCRIPT) }),
        )
        .route(
            "/ui/app.css",
            get(|| async { file("text/css; charset=utf-8", STYLE) }),
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_login_token_is_good_once_and_a_session_reads_only() {
        let s = Sessions::default();
        let t = s.login_token(1000, None);
        assert!(s.log_in("nope", 1000).is_none());
        let session = s.log_in(&t, 2000).unwrap();
        assert!(s.log_in(&t, 2000).is_none(), "one use");
        let late = s.login_token(0, None);
        assert!(s.log_in(&late, LOGIN_TTL_MS + 1).is_none(), "expired");
        let mut h = axum::http::HeaderMap::new();
        h.insert(
            header::COOKIE,
            format!("a=b; {COOKIE}={session}").parse().unwrap(),
        );
        assert!(s.valid(&h, 3000, |_| true));
        assert!(!s.valid(&h, 3000, |_| false), "its owner was shut out");
        assert!(!s.valid(&h, 2000 + SESSION_TTL_MS + 1, |_| true));
        h.insert(header::COOKIE, format!("{COOKIE}=forged").parse().unwrap());
        assert!(!s.valid(&h, 3000, |_| true));
        let get = axum::http::Method::GET;
        assert!(session_may(&get, "/v1/stream") && session_may(&get, "/v1/workloads/web"));
        assert!(!session_may(&axum::http::Method::POST, "/v1/apply"));
        assert!(!session_may(&get, "/v1/secrets") && !session_may(&get, "/v1/blobs/x"));
        assert!(!session_may(
            &axum::http::Method::DELETE,
            "/v1/workloads/web"
        ));
    }

    #[test]
    fn the_page_loads_only_its_own_files() {
        assert!(INDEX.contains("src=\"/ui/app.js\"") && INDEX.contains("href=\"/ui/app.css\""));
        for text in [INDEX, SCRIPT, STYLE] {
            assert!(
                !text.contains("http://") && !text.contains("https://"),
                "no CDN"
            );
        }
        assert!(SCRIPT.contains("new EventSource(\"/v1/stream\")"));
        assert!(is_static("/") && !is_static("/v1/devices"));
    }
}
