//! The per-VM API served by `capsem-process` on `run/instances/<id>.sock`. Only the service
//! calls it. Streaming routes upgrade the connection and then carry capsem-proto frames between
//! the caller and a guest stream; the first frame is rewritten to add the session's environment.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use capsem_proto::control::ControlRequest;
use capsem_proto::exec::{Command, ExecRequest};
use capsem_proto::frame;
use capsem_proto::port;
use capsem_proto::terminal::TerminalRequest;

use super::Instance;
use crate::api::{
    EchoBenchRequest, EchoBenchResponse, ExecResponse, FileReadRequest, FileReadResponse,
    FileWriteRequest,
};
use crate::channel::ChannelError;
use crate::uds_http::{self, take_upgrade, HttpError};

/// Default exec timeout of the JSON API, as the CLI's `exec`.
const DEFAULT_EXEC_TIMEOUT_SECS: u64 = 30;

pub(crate) fn router(inst: Arc<Instance>) -> Router {
    Router::new()
        .route("/info", get(info))
        .route("/exec", post(exec))
        .route("/exec/stream", post(exec_stream))
        .route("/terminal", post(terminal))
        .route("/files/read", post(read_file))
        .route("/files/write", post(write_file))
        .route("/bench/echo", post(echo_bench))
        .route("/kill", post(kill))
        .route("/suspend", post(suspend))
        .route("/freeze", post(freeze))
        .route("/shutdown", post(shutdown))
        .with_state(inst)
}

impl From<ChannelError> for HttpError {
    fn from(e: ChannelError) -> Self {
        let status = match e {
            ChannelError::Guest(_) => StatusCode::BAD_REQUEST,
            _ => StatusCode::BAD_GATEWAY,
        };
        HttpError::new(status, crate::error_chain(&e))
    }
}

type ApiResult<T> = Result<Json<T>, HttpError>;

async fn info(State(inst): State<Arc<Instance>>) -> Json<crate::api::VmInfo> {
    Json(inst.info.clone())
}

fn merged_env(
    inst: &Instance,
    extra: impl IntoIterator<Item = (String, String)>,
) -> Vec<(String, String)> {
    let mut env = inst.env.clone();
    env.extend(extra);
    env
}

async fn exec(
    State(inst): State<Arc<Instance>>,
    Json(req): Json<crate::api::ExecRequest>,
) -> ApiResult<ExecResponse> {
    let timeout = req.timeout_secs.unwrap_or(DEFAULT_EXEC_TIMEOUT_SECS);
    let started = std::time::Instant::now();
    let command = req.command.clone();
    let job = ExecRequest {
        command: Command::Shell(req.command),
        env: merged_env(&inst, req.env),
        cwd: None,
        stdin: false,
        timeout_ms: Some(timeout.saturating_mul(1000)),
    };
    // Backstop in case the guest stops answering: the guest enforces the real timeout.
    let out = tokio::time::timeout(
        Duration::from_secs(timeout.saturating_add(10)),
        inst.guest.exec(&job),
    )
    .await
    .map_err(|_| HttpError::new(StatusCode::GATEWAY_TIMEOUT, "the guest stopped answering"))??;
    let exit_code = if out.exit.timed_out {
        124
    } else {
        out.exit.status.shell_code()
    };
    inst.record_exec(&command, Some(exit_code), started.elapsed());
    Ok(Json(ExecResponse {
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        exit_code,
        timed_out: out.exit.timed_out,
        guest_spawn_us: out.exit.spawn_to_exit_us,
        process_us: started.elapsed().as_micros() as u64,
        truncated: out.truncated,
    }))
}

/// Upgrade, read the caller's first frame, let `rewrite` adjust it, forward it to a new guest
/// stream on `port`, then splice both directions until either side ends.
fn splice_to_guest<T, F>(inst: Arc<Instance>, mut req: Request, port: u16, rewrite: F) -> Response
where
    T: serde::Serialize + serde::de::DeserializeOwned + Send + Sync + 'static,
    F: FnOnce(&Instance, T) -> T + Send + 'static,
{
    let Some(on_upgrade) = take_upgrade(&mut req) else {
        return HttpError::new(StatusCode::BAD_REQUEST, "this endpoint needs an upgrade")
            .into_response();
    };
    tokio::spawn(async move {
        let mut client = match on_upgrade.await {
            Ok(up) => hyper_util::rt::TokioIo::new(up),
            Err(e) => {
                tracing::debug!(error = %e, "upgrade failed");
                return;
            }
        };
        let first: T = match frame::expect_frame(&mut client, "the request").await {
            Ok(f) => f,
            Err(e) => {
                tracing::debug!(error = %e, "stream request unreadable");
                return;
            }
        };
        let first = rewrite(&inst, first);
        tracing::debug!(port, "guest stream: request received");
        let mut guest = match inst.guest.open(port).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "could not open a guest stream");
                return;
            }
        };
        if frame::write_frame(&mut guest, &first).await.is_err() {
            return;
        }
        let _ = tokio::io::copy_bidirectional(&mut client, &mut guest).await;
        tracing::debug!(port, "guest stream: ended");
    });
    uds_http::switching_protocols()
}

async fn exec_stream(State(inst): State<Arc<Instance>>, mut req: Request) -> Response {
    let Some(on_upgrade) = take_upgrade(&mut req) else {
        return HttpError::new(StatusCode::BAD_REQUEST, "this endpoint needs an upgrade")
            .into_response();
    };
    tokio::spawn(async move {
        let Ok(up) = on_upgrade.await else { return };
        let mut client = hyper_util::rt::TokioIo::new(up);
        let Ok(mut job) = frame::expect_frame::<_, ExecRequest>(&mut client, "the request").await
        else {
            return;
        };
        job.env = merged_env(&inst, std::mem::take(&mut job.env));
        let command = match &job.command {
            Command::Shell(s) => s.clone(),
            Command::Argv(a) => a.join(" "),
        };
        let Ok(mut guest) = inst.guest.open(port::EXEC).await else {
            return;
        };
        if frame::write_frame(&mut guest, &job).await.is_err() {
            return;
        }
        let started = std::time::Instant::now();
        let exit = relay_exec(client, guest).await;
        let code = exit.map(|e| {
            if e.timed_out {
                124
            } else {
                e.status.shell_code()
            }
        });
        inst.record_exec(&command, code, started.elapsed());
    });
    uds_http::switching_protocols()
}

/// Carry an exec stream both ways, reading the guest's frames just enough to see the `Exit`.
async fn relay_exec<C, G>(client: C, guest: G) -> Option<capsem_proto::exec::ExecExit>
where
    C: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    G: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use capsem_proto::exec::ExecEvent;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut cr, mut cw) = tokio::io::split(client);
    let (mut gr, mut gw) = tokio::io::split(guest);
    let up = async {
        let _ = tokio::io::copy(&mut cr, &mut gw).await;
        let _ = gw.shutdown().await;
    };
    let down = async {
        let mut exit = None;
        let mut buf = Vec::new();
        loop {
            let mut len = [0u8; 4];
            if gr.read_exact(&mut len).await.is_err() {
                break;
            }
            let n = u32::from_le_bytes(len) as usize;
            if n > frame::MAX_FRAME {
                break;
            }
            buf.resize(n, 0);
            if gr.read_exact(&mut buf).await.is_err() {
                break;
            }
            // Only the Exit frame is decoded (its variant index leads the payload).
            if buf.first() == Some(&capsem_proto::exec::EXIT_TAG) {
                if let Ok(ExecEvent::Exit(e)) = frame::decode::<ExecEvent>(&buf) {
                    exit = Some(e);
                }
            }
            if cw.write_all(&len).await.is_err() || cw.write_all(&buf).await.is_err() {
                break;
            }
        }
        let _ = cw.shutdown().await;
        exit
    };
    let ((), exit) = tokio::join!(up, down);
    exit
}

async fn terminal(State(inst): State<Arc<Instance>>, req: Request) -> Response {
    splice_to_guest(inst, req, port::TERMINAL, |inst, mut r: TerminalRequest| {
        r.env = merged_env(inst, std::mem::take(&mut r.env));
        r
    })
}

async fn read_file(
    State(inst): State<Arc<Instance>>,
    Json(req): Json<FileReadRequest>,
) -> ApiResult<FileReadResponse> {
    let data = inst.guest.read_file(&req.path).await?;
    let content = String::from_utf8(data).map_err(|_| {
        HttpError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "{} is not UTF-8 text; read it with exec (base64) instead",
                req.path
            ),
        )
    })?;
    Ok(Json(FileReadResponse { content }))
}

async fn write_file(
    State(inst): State<Arc<Instance>>,
    Json(req): Json<FileWriteRequest>,
) -> ApiResult<serde_json::Value> {
    inst.guest
        .write_file(&req.path, req.content.into_bytes(), None)
        .await?;
    Ok(Json(serde_json::json!({ "ok": true })))
}

async fn echo_bench(
    State(inst): State<Arc<Instance>>,
    Json(req): Json<EchoBenchRequest>,
) -> ApiResult<EchoBenchResponse> {
    let count = req.count.min(100_000);
    let size = (req.size as usize).min(capsem_proto::frame::CHUNK);
    // tokio's timer counts whole milliseconds: a gap under 1 ms sleeps about 1 ms.
    let gap = Duration::from_micros(req.gap_us.min(1_000_000).into());
    let reply_after = Duration::from_micros(req.reply_after_us.min(1_000_000).into());
    // No more than a minute of quiet and waiting in all.
    let idle = gap + reply_after;
    let count = if idle.is_zero() {
        count
    } else {
        count.min((60_000_000 / idle.as_micros()).max(1) as u32)
    };
    let mut samples_us = Vec::with_capacity(count as usize);
    for _ in 0..count {
        if !gap.is_zero() {
            tokio::time::sleep(gap).await;
        }
        let d = if reply_after.is_zero() {
            inst.guest.echo(vec![0x5a; size]).await?
        } else {
            let (round_trip, waited) = inst.guest.echo_after(reply_after).await?;
            round_trip.saturating_sub(waited)
        };
        samples_us.push(d.as_micros() as u64);
    }
    Ok(Json(EchoBenchResponse { samples_us }))
}

/// Save the VM to disk and end (the process exits when QEMU does).
async fn suspend(State(inst): State<Arc<Instance>>) -> ApiResult<crate::api::SuspendResponse> {
    let started = std::time::Instant::now();
    // In a task of its own: a caller that goes away must not leave the VM paused half way.
    let run = inst.clone();
    let saved = tokio::spawn(async move { super::suspend(&run).await })
        .await
        .unwrap_or_else(|e| Err(format!("the suspend task failed: {e}")));
    match saved {
        Ok(state_bytes) => {
            inst.stop.notify_one();
            Ok(Json(crate::api::SuspendResponse {
                state_bytes,
                took_ms: started.elapsed().as_millis() as u64,
            }))
        }
        Err(message) => Err(HttpError::new(StatusCode::INTERNAL_SERVER_ERROR, message)),
    }
}

/// Freeze the disk's current top layer (for a fork or clone) while the VM runs on.
async fn freeze(State(inst): State<Arc<Instance>>) -> ApiResult<crate::api::FreezeResponse> {
    let started = std::time::Instant::now();
    // In a task of its own: a caller that goes away must not leave the VM paused.
    let frozen = tokio::spawn(async move { super::freeze(&inst).await })
        .await
        .unwrap_or_else(|e| Err(format!("the copy task failed: {e}")))
        .map_err(|m| HttpError::new(StatusCode::INTERNAL_SERVER_ERROR, m))?;
    Ok(Json(crate::api::FreezeResponse {
        frozen,
        took_ms: started.elapsed().as_millis() as u64,
    }))
}

async fn kill(State(inst): State<Arc<Instance>>) -> Json<serde_json::Value> {
    inst.stop.notify_one();
    Json(serde_json::json!({ "ok": true }))
}

async fn shutdown(State(inst): State<Arc<Instance>>) -> Json<serde_json::Value> {
    inst.graceful.store(true, Ordering::SeqCst);
    let _ = inst
        .guest
        .control(&ControlRequest::Shutdown { reboot: false })
        .await;
    inst.stop.notify_one();
    Json(serde_json::json!({ "ok": true }))
}
