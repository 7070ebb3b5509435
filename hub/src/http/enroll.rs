//! Enrollment over HTTPS: the fleet CA, a device's first enrollment with a join token, and
//! certificate renewal.

use super::*;
use crate::security::Security;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use shoal_api::model::ids::DeviceId;
use shoal_api::policy::acl::Identity;
use shoal_api::wire::views::{EnrollRequest, Enrolled, RenewRequest};
use shoal_pki::token::JoinToken;
use std::sync::Arc;

pub(super) fn security(s: &AppState) -> Result<&Arc<Security>, Failure> {
    s.security.as_ref().ok_or_else(|| {
        Failure(
            StatusCode::NOT_FOUND,
            "this hub runs --insecure: there is no fleet CA and no enrollment".into(),
        )
    })
}

pub(super) async fn ca(State(s): State<AppState>) -> Response {
    match security(&s) {
        Ok(sec) => (
            [(header::CONTENT_TYPE, "application/x-pem-file")],
            sec.ca.pem().to_string(),
        )
            .into_response(),
        Err(f) => f.into_response(),
    }
}

pub(super) fn enrolled(sec: &Security, csr: &str, device: &DeviceId) -> Result<Enrolled, Failure> {
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

pub(super) async fn enroll(State(s): State<AppState>, Json(req): Json<EnrollRequest>) -> Response {
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
        let now = shoal_daemon::clock::now_ms();
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
pub(super) fn enroll_failure(e: crate::enrollment::EnrollError) -> Failure {
    let status = match e {
        crate::enrollment::EnrollError::Refused(_) | crate::enrollment::EnrollError::Revoked(_) => {
            StatusCode::FORBIDDEN
        }
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    Failure(status, e.to_string())
}

pub(super) async fn renew(
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
