//! The controller's HTTP/JSON control API (`jiva controller --api ADDR`):
//!
//! | method and path                    | what                                            |
//! |------------------------------------|-------------------------------------------------|
//! | `GET /v1/volume`                   | volume status with every replica                |
//! | `POST /v1/volume/pause`            | stop I/O (it waits) until resumed               |
//! | `POST /v1/volume/resume`           | let I/O go on                                   |
//! | `GET /v1/replicas`                 | replica list: state, counters, rebuild          |
//! | `POST /v1/replicas`                | add a replica: `{"address": "HOST:PORT"}`       |
//! | `DELETE /v1/replicas/ADDR`         | remove a replica                                |
//! | `GET /v1/snapshots`                | snapshots, oldest first                         |
//! | `POST /v1/snapshots`               | create one: `{"name": "NAME"}`; reports the pause |
//! | `DELETE /v1/snapshots/NAME`        | delete one (merges into its child)              |
//! | `POST /v1/snapshots/NAME/revert`   | revert the volume to it (paused, or no client)  |
//! | `POST /v1/snapshots/NAME/clone`    | clone it: `{"name", "dir", "replicas"}`         |
//! | `GET /v1/clones`                   | clone jobs and their progress                   |
//!
//! Errors come back as `{"error": "..."}` with a 4xx/5xx status.

use std::sync::{Arc, Mutex};

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use jiva_core::ErrorKind;
use jiva_core::remote::RemoteConnector;
use jiva_core::volume::Volume;
use serde::Deserialize;
use tokio::net::TcpListener;

use crate::clone::{CloneJob, CloneRequest};

type Vol = Arc<Volume<RemoteConnector>>;

/// How many NBD/iSCSI clients are attached to the volume now.
pub type Clients = Arc<dyn Fn() -> usize + Send + Sync>;

#[derive(Clone)]
struct App {
    vol: Vol,
    clones: Arc<Mutex<Vec<Arc<CloneJob>>>>,
    clients: Clients,
}

#[derive(Deserialize)]
struct AddReplica {
    address: String,
}

#[derive(Deserialize)]
struct NewSnapshot {
    name: String,
}

fn error(status: StatusCode, e: impl std::fmt::Display) -> Response {
    (status, Json(serde_json::json!({ "error": e.to_string() }))).into_response()
}

/// The HTTP status for a volume error.
fn status_of(e: &jiva_core::Error) -> StatusCode {
    match e.kind() {
        ErrorKind::InvalidArgument | ErrorKind::OutOfRange => StatusCode::BAD_REQUEST,
        ErrorKind::Unsupported => StatusCode::NOT_IMPLEMENTED,
        ErrorKind::Unavailable => StatusCode::CONFLICT,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    }
}

async fn volume(State(a): State<App>) -> Response {
    Json(a.vol.status()).into_response()
}

async fn pause(State(a): State<App>) -> Response {
    a.vol.pause().await;
    Json(serde_json::json!({ "paused": true })).into_response()
}

async fn resume(State(a): State<App>) -> Response {
    a.vol.resume();
    Json(serde_json::json!({ "paused": false })).into_response()
}

async fn list(State(a): State<App>) -> Response {
    Json(a.vol.replicas()).into_response()
}

async fn add(State(a): State<App>, Json(req): Json<AddReplica>) -> Response {
    match a.vol.add(&req.address) {
        Ok(()) => (StatusCode::CREATED, Json(serde_json::json!({ "address": req.address }))).into_response(),
        Err(e) => error(StatusCode::BAD_REQUEST, e),
    }
}

async fn remove(State(a): State<App>, Path(addr): Path<String>) -> Response {
    match a.vol.remove(&addr).await {
        Ok(()) => Json(serde_json::json!({ "removed": addr })).into_response(),
        Err(e) if e.kind() == jiva_core::ErrorKind::InvalidArgument => error(StatusCode::BAD_REQUEST, e),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e),
    }
}

async fn snapshots(State(a): State<App>) -> Response {
    match a.vol.snapshots().await {
        Ok(list) => Json(list).into_response(),
        Err(e) => error(status_of(&e), e),
    }
}

async fn snapshot_create(State(a): State<App>, Json(req): Json<NewSnapshot>) -> Response {
    if let Err(m) = jiva_replica::format::check_snapshot_name(&req.name) {
        return error(StatusCode::BAD_REQUEST, m);
    }
    match a.vol.snapshot_create(&req.name).await {
        Ok(done) => (StatusCode::CREATED, Json(done)).into_response(),
        Err(e) => error(status_of(&e), e),
    }
}

async fn snapshot_delete(State(a): State<App>, Path(name): Path<String>) -> Response {
    match a.vol.snapshot_delete(&name).await {
        Ok(()) => Json(serde_json::json!({ "deleted": name })).into_response(),
        Err(e) => error(status_of(&e), e),
    }
}

/// Refuses a revert that attached clients would see happen under them.
fn refuse_attached(attached: usize) -> Response {
    error(
        StatusCode::CONFLICT,
        format!(
            "revert changes the volume under its clients, and {attached} NBD/iSCSI client(s) are attached: \
             detach them, or pause I/O for the revert (`jiva snapshot revert NAME --pause`)"
        ),
    )
}

/// Reverts when the volume is paused, or when no client is attached (then
/// it pauses for the revert itself, so a client that attaches meanwhile
/// waits for its first I/O).
async fn snapshot_revert(State(a): State<App>, Path(name): Path<String>) -> Response {
    let result = if a.vol.is_paused() {
        a.vol.snapshot_revert(&name).await
    } else {
        match (a.clients)() {
            0 => {}
            n => return refuse_attached(n),
        }
        a.vol.pause().await;
        let attached = (a.clients)();
        let result = if attached == 0 { Some(a.vol.snapshot_revert(&name).await) } else { None };
        a.vol.resume();
        match result {
            Some(r) => r,
            None => return refuse_attached(attached),
        }
    };
    match result {
        Ok(()) => Json(serde_json::json!({ "reverted": name })).into_response(),
        Err(e) => error(status_of(&e), e),
    }
}

async fn snapshot_clone(
    State(a): State<App>,
    Path(name): Path<String>,
    Json(req): Json<CloneRequest>,
) -> Response {
    match crate::clone::start(a.vol.clone(), name, req) {
        Ok(job) => {
            a.clones.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(job.clone());
            (StatusCode::ACCEPTED, Json(job.status())).into_response()
        }
        Err(e) => error(StatusCode::BAD_REQUEST, format!("{e:#}")),
    }
}

async fn clones(State(a): State<App>) -> Response {
    let jobs = a.clones.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
    Json(jobs.iter().map(|j| j.status()).collect::<Vec<_>>()).into_response()
}

/// Serves the API on `listener` until the process ends.
pub async fn serve(listener: TcpListener, vol: Vol, clients: Clients) {
    let app = Router::new()
        .route("/v1/volume", get(volume))
        .route("/v1/volume/pause", post(pause))
        .route("/v1/volume/resume", post(resume))
        .route("/v1/replicas", get(list).post(add))
        .route("/v1/replicas/{addr}", delete(remove))
        .route("/v1/snapshots", get(snapshots).post(snapshot_create))
        .route("/v1/snapshots/{name}", delete(snapshot_delete))
        .route("/v1/snapshots/{name}/revert", post(snapshot_revert))
        .route("/v1/snapshots/{name}/clone", post(snapshot_clone))
        .route("/v1/clones", get(clones))
        .with_state(App { vol, clones: Arc::default(), clients });
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!("control API stopped: {e}");
    }
}
