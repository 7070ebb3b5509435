//! `GET /v1/events` and `GET /v1/workloads/{name}/logs` (NDJSON, gathered from devices).

use super::*;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use shoal_api::model::ids::DeviceId;
use shoal_api::wire::views::LogEntry;

/// `GET /v1/events` query.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct EventsQuery {
    #[serde(default)]
    after: u64,
    object: Option<String>,
}

pub(super) async fn events(
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
pub(super) struct LogsQuery {
    device: Option<String>,
    tail: Option<u32>,
    /// Seconds.
    since: Option<u64>,
    #[serde(default)]
    follow: bool,
}

/// How long a device may stay silent before a (not followed) log read gives up on it.
pub(super) const LOG_ANSWER_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// `GET /v1/workloads/{name}/logs`: the lines the devices send, as they come, one
/// [`LogEntry`] per line; the header `x-shoal-replicas` says how many replicas they come from.
pub(super) async fn logs(
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
pub(super) fn ndjson(entries: &[LogEntry]) -> Bytes {
    let mut out = Vec::new();
    for e in entries {
        if serde_json::to_writer(&mut out, e).is_ok() {
            out.push(b'\n');
        }
    }
    Bytes::from(out)
}
