//! Who may do what: the role each route needs ([`need`]), whether a caller's identity
//! meets it, and the middleware that refuses the rest (and cross-site browser requests).

use super::*;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::Response;
use shoal_api::policy::acl::Identity;
use shoal_api::policy::operator::Role;

/// What a route requires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    Nothing,
    /// Any fleet certificate (devices fetch blobs and renew).
    Fleet,
    /// An operator's certificate with this role at least (or the hub's).
    Operator(Role),
}

/// The access rule for a request: viewers read; deployers change workloads, secrets,
/// configs and blobs; admins also manage devices, set the fleet's policy and read the audit
/// log.
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
        (_, "/v1/policy") => Need::Operator(Role::Admin),
        _ => Need::Operator(Role::Deployer),
    }
}

/// Whether `peer` meets `need`.
pub(super) fn meets(peer: &Peer, need: Need) -> bool {
    match (peer, need) {
        (Peer::Insecure, _) | (_, Need::Nothing) => true,
        (Peer::Known(_), Need::Fleet) => true,
        (Peer::Known(Identity::Hub), Need::Operator(_)) => true,
        (Peer::Known(Identity::Operator(o)), Need::Operator(role)) => o.role >= role,
        _ => false,
    }
}

pub(super) async fn authorize(
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
pub(super) async fn same_site_only(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
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
    let marked = h.contains_key(shoal_api::wire::views::CLIENT_HEADER);
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
                shoal_api::wire::views::CLIENT_HEADER
            ),
        );
    }
    next.run(req).await
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
                Method::POST,
                "/v1/workloads/web/rerun",
                Need::Operator(Role::Deployer),
            ),
            (
                Method::DELETE,
                "/v1/secrets/s",
                Need::Operator(Role::Deployer),
            ),
            (
                Method::DELETE,
                "/v1/configs/c",
                Need::Operator(Role::Deployer),
            ),
            (Method::GET, "/v1/configs/c", Need::Operator(Role::Viewer)),
            (Method::DELETE, "/v1/devices/d", Need::Operator(Role::Admin)),
            (Method::PUT, "/v1/policy", Need::Operator(Role::Admin)),
            (Method::GET, "/v1/policy", Need::Operator(Role::Viewer)),
            (
                Method::POST,
                "/v1/devices/d/labels",
                Need::Operator(Role::Admin),
            ),
            (
                Method::POST,
                "/v1/devices/d/annotations",
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
