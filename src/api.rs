//! The controller's HTTP/JSON control API (`jiva controller --api ADDR`):
//!
//! | method and path             | what                                        |
//! |-----------------------------|---------------------------------------------|
//! | `GET /v1/volume`            | volume status with every replica            |
//! | `GET /v1/replicas`          | replica list: state, counters, rebuild      |
//! | `POST /v1/replicas`         | add a replica: `{"address": "HOST:PORT"}`   |
//! | `DELETE /v1/replicas/ADDR`  | remove a replica                            |
//!
//! Errors come back as `{"error": "..."}` with a 4xx/5xx status.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use axum::{Json, Router};
use jiva_core::remote::RemoteConnector;
use jiva_core::volume::Volume;
use serde::Deserialize;
use tokio::net::TcpListener;

type Vol = Arc<Volume<RemoteConnector>>;

#[derive(Deserialize)]
struct AddReplica {
    address: String,
}

fn error(status: StatusCode, e: impl std::fmt::Display) -> Response {
    (status, Json(serde_json::json!({ "error": e.to_string() }))).into_response()
}

async fn volume(State(v): State<Vol>) -> Response {
    Json(v.status()).into_response()
}

async fn list(State(v): State<Vol>) -> Response {
    Json(v.replicas()).into_response()
}

async fn add(State(v): State<Vol>, Json(req): Json<AddReplica>) -> Response {
    match v.add(&req.address) {
        Ok(()) => (StatusCode::CREATED, Json(serde_json::json!({ "address": req.address }))).into_response(),
        Err(e) => error(StatusCode::BAD_REQUEST, e),
    }
}

async fn remove(State(v): State<Vol>, Path(addr): Path<String>) -> Response {
    match v.remove(&addr).await {
        Ok(()) => Json(serde_json::json!({ "removed": addr })).into_response(),
        Err(e) if e.kind() == jiva_core::ErrorKind::InvalidArgument => error(StatusCode::BAD_REQUEST, e),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e),
    }
}

/// Serves the API on `listener` until the process ends.
pub async fn serve(listener: TcpListener, vol: Vol) {
    let app = Router::new()
        .route("/v1/volume", get(volume))
        .route("/v1/replicas", get(list).post(add))
        .route("/v1/replicas/{addr}", delete(remove))
        .with_state(vol);
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!("control API stopped: {e}");
    }
}
