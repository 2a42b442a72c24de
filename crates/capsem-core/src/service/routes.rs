//! HTTP front end of the service (axum over `run/service.sock`). Each handler turns its request
//! into one [`Service`] call; per-VM calls are forwarded to the session's process, and streams
//! (exec, terminal, run) are upgraded and spliced through.

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use hyper::Method;
use serde::Deserialize;

use super::{DeleteOnDrop, HttpError, Service};
use crate::api::{
    CreateRequest, DeleteResponse, ForkRequest, ImageInfo, ImageListResponse, ListResponse,
    PurgeRequest, PurgeResponse, RunRequest, SessionInfo, StatusResponse, StreamKind,
    VersionResponse, WarmRequest, WarmResponse, API_VERSION,
};
use crate::uds_http::{self, take_upgrade, UdsClient};

/// Largest request body accepted (file writes are the big case).
const BODY_LIMIT: usize = 64 * 1024 * 1024;

type ApiResult<T> = Result<Json<T>, HttpError>;

pub fn router(svc: Service) -> Router {
    Router::new()
        .route("/version", get(version))
        .route("/status", get(status))
        .route("/vms/create", post(create))
        .route("/vms/list", get(list))
        .route("/vms/{id}/info", get(info))
        .route("/vms/{id}/logs", get(logs))
        .route("/vms/{id}/delete", delete(remove))
        .route("/vms/{id}/persist", post(persist))
        .route("/vms/{id}/suspend", post(suspend))
        .route("/vms/{id}/resume", post(resume))
        .route("/vms/{id}/restart", post(restart))
        .route("/vms/{id}/fork", post(fork))
        .route("/images/list", get(images))
        .route("/images/{name}", delete(delete_image))
        .route("/vms/{id}", delete(remove))
        .route("/vms/{id}/exec", post(forward))
        .route("/vms/{id}/files/read", post(forward))
        .route("/vms/{id}/files/write", post(forward))
        .route("/vms/{id}/bench/echo", post(forward))
        .route("/vms/{id}/exec/stream", post(stream))
        .route("/vms/{id}/terminal", post(stream))
        .route("/run", post(run))
        .route("/purge", post(purge))
        .route("/warm", post(warm))
        .with_state(svc)
}

async fn version() -> Json<VersionResponse> {
    Json(VersionResponse {
        version: env!("CARGO_PKG_VERSION").to_string(),
        api_version: API_VERSION,
        protocol_version: capsem_proto::PROTOCOL_VERSION,
    })
}

async fn status(State(svc): State<Service>) -> Json<StatusResponse> {
    let loaded = crate::image::load(&svc.home().assets_root()).ok();
    let assets = loaded.as_ref().map(|a| a.dir.display().to_string());
    let warm_discarded = loaded.as_ref().and_then(crate::warm::last_discard);
    let warm = loaded
        .map(|a| {
            crate::warm::usable(&a)
                .into_iter()
                .map(|m| crate::api::WarmTemplate {
                    ram_mb: m.ram_mb,
                    cpus: m.cpus,
                    state_bytes: m.state_bytes,
                    created_at: m.created_at,
                })
                .collect()
        })
        .unwrap_or_default();
    Json(StatusResponse {
        version: env!("CARGO_PKG_VERSION").to_string(),
        pid: std::process::id(),
        home: svc.home().root().display().to_string(),
        sessions: svc.count().await,
        accel: svc.accel_known().map(|a| a.as_str().to_string()),
        assets,
        warm,
        warm_discarded,
    })
}

/// Parse a JSON body, answering 400 with the reason when it does not fit.
fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, HttpError> {
    let body = if body.is_empty() {
        b"{}".as_slice()
    } else {
        body
    };
    serde_json::from_slice(body).map_err(|e| {
        HttpError::new(
            StatusCode::BAD_REQUEST,
            format!("invalid request body: {e}"),
        )
    })
}

/// Run a state-changing call in a task of its own: a client that disconnects must not cancel a
/// boot or a delete half way (hyper drops the handler's future with the connection).
async fn detached<T: Send + 'static>(
    what: &str,
    call: impl std::future::Future<Output = Result<T, HttpError>> + Send + 'static,
) -> Result<T, HttpError> {
    tokio::spawn(call).await.map_err(|_| {
        HttpError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("{what} task failed"),
        )
    })?
}

async fn create(State(svc): State<Service>, body: Bytes) -> ApiResult<SessionInfo> {
    let req: CreateRequest = parse(&body)?;
    detached("create", async move { svc.create(req).await })
        .await
        .map(Json)
}

async fn list(State(svc): State<Service>) -> Json<ListResponse> {
    Json(ListResponse {
        sandboxes: svc.list().await,
    })
}

async fn info(State(svc): State<Service>, Path(id): Path<String>) -> ApiResult<SessionInfo> {
    svc.info(&id).await.map(Json)
}

#[derive(Deserialize)]
struct LogsQuery {
    tail: Option<usize>,
}

async fn logs(
    State(svc): State<Service>,
    Path(id): Path<String>,
    Query(q): Query<LogsQuery>,
) -> ApiResult<crate::api::LogsResponse> {
    svc.logs(&id, q.tail).await.map(Json)
}

async fn remove(State(svc): State<Service>, Path(id): Path<String>) -> ApiResult<DeleteResponse> {
    let id = detached("delete", async move { svc.delete(&id).await }).await?;
    Ok(Json(DeleteResponse { id }))
}

async fn persist(
    State(svc): State<Service>,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<SessionInfo> {
    let req: crate::api::PersistRequest = parse(&body)?;
    svc.persist(&id, &req.name).await.map(Json)
}

async fn suspend(State(svc): State<Service>, Path(id): Path<String>) -> ApiResult<SessionInfo> {
    detached("suspend", async move { svc.suspend(&id).await })
        .await
        .map(Json)
}

async fn resume(State(svc): State<Service>, Path(id): Path<String>) -> ApiResult<SessionInfo> {
    detached("resume", async move { svc.resume(&id).await })
        .await
        .map(Json)
}

async fn restart(State(svc): State<Service>, Path(id): Path<String>) -> ApiResult<SessionInfo> {
    detached("restart", async move { svc.restart(&id).await })
        .await
        .map(Json)
}

async fn fork(
    State(svc): State<Service>,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<ImageInfo> {
    let req: ForkRequest = parse(&body)?;
    detached("fork", async move {
        svc.fork(&id, &req.name, req.description).await
    })
    .await
    .map(Json)
}

async fn warm(State(svc): State<Service>, body: Bytes) -> ApiResult<WarmResponse> {
    let req: WarmRequest = parse(&body)?;
    detached("warm", async move { svc.warm(req).await })
        .await
        .map(Json)
}

async fn images(State(svc): State<Service>) -> Json<ImageListResponse> {
    Json(ImageListResponse {
        images: svc.images().await,
    })
}

#[derive(Deserialize)]
struct DeleteImageQuery {
    #[serde(default)]
    force: bool,
}

async fn delete_image(
    State(svc): State<Service>,
    Path(name): Path<String>,
    Query(q): Query<DeleteImageQuery>,
) -> ApiResult<ImageInfo> {
    svc.delete_image(&name, q.force).await.map(Json)
}

async fn purge(State(svc): State<Service>, body: Bytes) -> ApiResult<PurgeResponse> {
    let req: PurgeRequest = parse(&body)?;
    let deleted = detached("purge", async move { Ok(svc.purge(req.all).await) }).await?;
    Ok(Json(PurgeResponse { deleted }))
}

/// The per-VM path after `/vms/{id}`.
fn vm_subpath(uri: &hyper::Uri) -> String {
    let p = uri.path();
    let rest = p.trim_start_matches("/vms/");
    match rest.find('/') {
        Some(i) => rest[i..].to_string(),
        None => "/".to_string(),
    }
}

/// Forward a JSON call to the session's process and relay its answer.
async fn forward(
    State(svc): State<Service>,
    Path(id): Path<String>,
    method: Method,
    uri: hyper::Uri,
    body: Bytes,
) -> Response {
    let (_, client) = match svc.instance(&id).await {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    match client
        .raw(method, &vm_subpath(&uri), Some(body.to_vec()))
        .await
    {
        Ok((status, bytes)) => (
            status,
            [(hyper::header::CONTENT_TYPE, "application/json")],
            Body::from(bytes),
        )
            .into_response(),
        Err(e) => HttpError::new(StatusCode::BAD_GATEWAY, crate::error_chain(&e)).into_response(),
    }
}

/// Upgrade both the client's connection and one to the process, then splice them. The optional
/// guard (a temporary session) is dropped — deleting the session — when the splice ends.
async fn splice(
    client_up: hyper::upgrade::OnUpgrade,
    instance: UdsClient,
    path: &str,
    guard: Option<DeleteOnDrop>,
) -> Response {
    let mut vm_io = match instance.upgrade(path, &serde_json::json!({})).await {
        Ok(io) => io,
        Err(e) => {
            drop(guard);
            return HttpError::new(StatusCode::BAD_GATEWAY, crate::error_chain(&e)).into_response();
        }
    };
    tokio::spawn(async move {
        let _guard = guard;
        if let Ok(up) = client_up.await {
            let mut client_io = hyper_util::rt::TokioIo::new(up);
            let _ = tokio::io::copy_bidirectional(&mut client_io, &mut vm_io).await;
        }
    });
    uds_http::switching_protocols()
}

async fn stream(State(svc): State<Service>, Path(id): Path<String>, mut req: Request) -> Response {
    let Some(up) = take_upgrade(&mut req) else {
        return HttpError::new(StatusCode::BAD_REQUEST, "this endpoint needs an upgrade")
            .into_response();
    };
    let sub = vm_subpath(req.uri());
    match svc.instance(&id).await {
        Ok((_, client)) => splice(up, client, &sub, None).await,
        Err(e) => e.into_response(),
    }
}

/// `POST /run`: a temporary session that lives exactly as long as the upgraded stream.
async fn run(State(svc): State<Service>, mut req: Request) -> Response {
    let Some(up) = take_upgrade(&mut req) else {
        return HttpError::new(StatusCode::BAD_REQUEST, "this endpoint needs an upgrade")
            .into_response();
    };
    let body = match axum::body::to_bytes(req.into_body(), BODY_LIMIT).await {
        Ok(b) => b,
        Err(e) => return HttpError::new(StatusCode::BAD_REQUEST, e.to_string()).into_response(),
    };
    tracing::debug!("run: request received");
    let run: RunRequest = match parse(&body) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let create = CreateRequest {
        ram_mb: run.ram_mb,
        cpus: run.cpus,
        env: run.env,
        persistent: Some(false),
        ..Default::default()
    };
    // Boot in its own task; if this handler is dropped (client gone) before it gets the
    // session, the task deletes it.
    let (tx, rx) = tokio::sync::oneshot::channel();
    let boot_svc = svc.clone();
    tokio::spawn(async move {
        let res = boot_svc.create(create).await;
        if let Err(Ok(info)) = tx.send(res) {
            if !boot_svc.is_persistent(&info.id).await {
                let _ = boot_svc.delete(&info.id).await;
            }
        }
    });
    let info = match rx.await {
        Ok(Ok(info)) => info,
        Ok(Err(e)) => return e.into_response(),
        Err(_) => {
            return HttpError::new(StatusCode::INTERNAL_SERVER_ERROR, "boot task failed")
                .into_response()
        }
    };
    tracing::debug!(id = %info.id, "run: session ready");
    let guard = DeleteOnDrop::new(svc.clone(), info.id.clone());
    let client = UdsClient::new(svc.home().instance_socket(&info.id));
    let path = match run.stream {
        StreamKind::Exec => "/exec/stream",
        StreamKind::Terminal => "/terminal",
    };
    splice(up, client, path, Some(guard)).await
}
