//! Blobs: uploads by operators, downloads by devices (only what their desired state names),
//! and precompiled modules per device target.

use super::*;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use shoal_api::model::ids::Digest;
use shoal_api::policy::acl::Identity;
use shoal_api::wire::views::BlobRef;

pub(super) async fn put_blob(State(s): State<AppState>, body: Bytes) -> Response {
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
pub(super) async fn device_may_fetch(
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

pub(super) async fn get_blob(
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
pub(super) struct PrecompileQuery {
    /// The agent's engine target (`shoal_engine::native_target`).
    target: String,
    /// The agent's `shoal_engine::ENGINE_ID`.
    engine: String,
}

/// A precompiled artifact, compiled on the first request: only for a known target
/// ([`shoal_engine::KNOWN_TARGETS`]), and a device gets only its own architecture's, of a
/// module its desired state names. Every other request is refused before any compiling.
pub(super) async fn get_precompiled(
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
