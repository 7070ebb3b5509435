//! The operator's routes on configs (list, describe with each device's values, delete) and
//! on the fleet's policy (read; set, for admins).

use super::*;
use axum::extract::{Path, State};
use shoal_api::model::ids::ConfigName;

pub(super) async fn policy(State(s): State<AppState>) -> Response {
    match ask(&s, |reply| Request::Policy { reply }).await {
        Ok(p) => Json(p).into_response(),
        Err(f) => f.into_response(),
    }
}

pub(super) async fn set_policy(
    State(s): State<AppState>,
    Json(policy): Json<shoal_api::policy::fleet::FleetPolicy>,
) -> Response {
    match ask(&s, |reply| Request::SetPolicy { policy, reply }).await {
        Ok(Ok(())) => {
            let allowed: Vec<&str> = shoal_api::policy::fleet::Privilege::ALL
                .into_iter()
                .filter(|p| policy.allows(*p))
                .map(|p| p.name())
                .collect();
            let mut r = Json(policy).into_response();
            r.extensions_mut().insert(AuditNote(format!(
                "policy set: allow {}",
                if allowed.is_empty() {
                    "none".to_string()
                } else {
                    allowed.join(",")
                }
            )));
            r
        }
        Ok(Err(e)) => failed(e, |r| match r {
            crate::fleet::PolicyRefusal::InUse { .. } => StatusCode::CONFLICT,
        }),
        Err(f) => f.into_response(),
    }
}

pub(super) async fn configs(State(s): State<AppState>) -> Response {
    match ask(&s, |reply| Request::Configs { reply }).await {
        Ok(v) => Json(v).into_response(),
        Err(f) => f.into_response(),
    }
}

pub(super) async fn config(State(s): State<AppState>, Path(name): Path<String>) -> Response {
    let name = match ConfigName::try_from(name.as_str()) {
        Ok(n) => n,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
    };
    match ask(&s, |reply| Request::Config {
        name: name.clone(),
        reply,
    })
    .await
    {
        Ok(Some(v)) => Json(v).into_response(),
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            format!("config {:?} not found", name.as_str()),
        ),
        Err(f) => f.into_response(),
    }
}

pub(super) async fn delete_config(State(s): State<AppState>, Path(name): Path<String>) -> Response {
    let name = match ConfigName::try_from(name.as_str()) {
        Ok(n) => n,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
    };
    match ask(&s, |reply| Request::DeleteConfig {
        name: name.clone(),
        reply,
    })
    .await
    {
        Ok(Ok(())) => Json(serde_json::json!({ "deleted": name.as_str() })).into_response(),
        Ok(Err(e)) => failed(e, |r| match r {
            crate::fleet::ConfigRefusal::NotFound(_) => StatusCode::NOT_FOUND,
            crate::fleet::ConfigRefusal::InUse { .. } => StatusCode::CONFLICT,
        }),
        Err(f) => f.into_response(),
    }
}
