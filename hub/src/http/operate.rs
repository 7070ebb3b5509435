//! The operator's routes on workloads, secrets and devices: apply, delete, scale, rollout
//! steering, labels, cordon and drain; and the one place a refusal becomes a status
//! ([`failed`]).

use super::*;
use crate::app::Failed;
use crate::fleet::{RolloutAction, WorkloadRefusal};
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use shoal_api::model::ids::{DeviceId, SecretName};
use shoal_api::model::labels::{LabelChange, LabelError, Meta};

pub(super) async fn devices(State(s): State<AppState>) -> Response {
    match ask(&s, |reply| Request::Devices { reply }).await {
        Ok(v) => Json(v).into_response(),
        Err(f) => f.into_response(),
    }
}

pub(super) async fn device_action(
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
pub(super) struct UndoBody {
    #[serde(default)]
    to_revision: Option<String>,
}

pub(super) async fn rollout_action(
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
pub(super) struct ScaleBody {
    replicas: u32,
}

pub(super) async fn scale(
    State(s): State<AppState>,
    Path(name): Path<String>,
    body: Bytes,
) -> Response {
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

/// `POST /v1/workloads/{name}/rerun`: a job's next run, from no results.
pub(super) async fn rerun(State(s): State<AppState>, Path(name): Path<String>) -> Response {
    let name = match parse_name(&name) {
        Ok(n) => n,
        Err(f) => return f.into_response(),
    };
    answer(ask(&s, |reply| Request::Rerun { name, reply }).await)
}

/// `DELETE /v1/devices/{id}`: forget a device that is gone for good.
pub(super) async fn delete_device(State(s): State<AppState>, Path(id): Path<String>) -> Response {
    let id: DeviceId = match id.parse() {
        Ok(d) => d,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("{e}")),
    };
    match ask(&s, |reply| Request::DeleteDevice {
        id: id.clone(),
        reply,
    })
    .await
    {
        Ok(Ok(())) => Json(serde_json::json!({ "deleted": id.as_str() })).into_response(),
        Ok(Err(e)) => failed(e, |r| match r {
            crate::fleet::DeviceRefusal::NotFound(_) => StatusCode::NOT_FOUND,
            crate::fleet::DeviceRefusal::Online(_) => StatusCode::CONFLICT,
        }),
        Err(f) => f.into_response(),
    }
}

pub(super) async fn label_device(
    s: State<AppState>,
    id: Path<String>,
    change: Json<LabelChange>,
) -> Response {
    edit_device(s, id, change, Meta::Label).await
}

/// `POST /v1/devices/{id}/annotations`: a [`LabelChange`] of free-text values.
pub(super) async fn annotate_device(
    s: State<AppState>,
    id: Path<String>,
    change: Json<LabelChange>,
) -> Response {
    edit_device(s, id, change, Meta::Annotation).await
}

async fn edit_device(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Json(change): Json<LabelChange>,
    meta: Meta,
) -> Response {
    let id: DeviceId = match id.parse() {
        Ok(d) => d,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("{e}")),
    };
    if let Err(e) = change.check_as(meta) {
        return error(StatusCode::BAD_REQUEST, e.to_string());
    }
    match ask(&s, |reply| Request::Label {
        id,
        meta,
        change,
        reply,
    })
    .await
    {
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
pub(super) fn failed<R: std::fmt::Display>(
    f: Failed<R>,
    status_of: impl Fn(&R) -> StatusCode,
) -> Response {
    match &f {
        Failed::Refused(r) => error(status_of(r), f.to_string()),
        Failed::NotDurable(_) => error(StatusCode::INTERNAL_SERVER_ERROR, f.to_string()),
    }
}

/// The main loop's verdict on a workload command: done, refused (404 for a workload that
/// does not exist, else 422) or failed (500).
pub(super) fn answer(r: Result<Result<(), Failed<WorkloadRefusal>>, Failure>) -> Response {
    match r {
        Ok(Ok(())) => Json(serde_json::json!({ "ok": true })).into_response(),
        Ok(Err(e)) => failed(e, |r| match r {
            WorkloadRefusal::NotFound(_) => StatusCode::NOT_FOUND,
            _ => StatusCode::UNPROCESSABLE_ENTITY,
        }),
        Err(f) => f.into_response(),
    }
}

pub(super) fn action_name(a: DeviceAction) -> &'static str {
    match a {
        DeviceAction::Cordon => "cordoned",
        DeviceAction::Uncordon => "uncordoned",
        DeviceAction::Drain => "drained",
    }
}

pub(super) async fn workloads(State(s): State<AppState>) -> Response {
    match ask(&s, |reply| Request::Workloads { reply }).await {
        Ok(v) => Json(v).into_response(),
        Err(f) => f.into_response(),
    }
}

pub(super) async fn workload(State(s): State<AppState>, Path(name): Path<String>) -> Response {
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

pub(super) async fn secrets(State(s): State<AppState>) -> Response {
    match ask(&s, |reply| Request::Secrets { reply }).await {
        Ok(v) => Json(v).into_response(),
        Err(f) => f.into_response(),
    }
}

pub(super) async fn delete_secret(State(s): State<AppState>, Path(name): Path<String>) -> Response {
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

pub(super) async fn delete(State(s): State<AppState>, Path(name): Path<String>) -> Response {
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

pub(super) async fn apply(State(s): State<AppState>, body: Bytes) -> Response {
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
