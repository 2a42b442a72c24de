//! Control port (5000): one [`ControlRequest`] in, one [`ControlResponse`] out. The handler
//! answers and reports a shutdown request back to its caller; it never powers anything off
//! itself (the caller knows whether this is a VM).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use capsem_proto::control::{ControlRequest, ControlResponse};
use capsem_proto::frame::{self, FrameError, MAX_FRAME};
use serde_bytes::ByteBuf;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

/// What the caller must do after the reply went out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Done,
    Shutdown { reboot: bool },
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control stream failed")]
    Frame(#[from] FrameError),
    #[error("closing the control stream failed")]
    Close(#[source] std::io::Error),
}

/// Serve one control stream. `in_vm`: this agent is the VM's (not a standalone test run), so
/// filesystems are synced before a shutdown request is acknowledged (`Done` means the data is
/// on disk), and an [`ControlRequest::Identity`] may change the machine's hostname, RNG and
/// clock (anywhere else it is refused).
pub async fn handle<S>(mut stream: S, in_vm: bool) -> Result<Outcome, ControlError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let Some(req) = frame::read_frame::<_, ControlRequest>(&mut stream).await? else {
        return Ok(Outcome::Done);
    };
    let (resp, outcome) = match req {
        ControlRequest::Echo { payload } => (ControlResponse::Echo { payload }, Outcome::Done),
        ControlRequest::ReadFile { path } => (read_file(&path), Outcome::Done),
        ControlRequest::WriteFile { path, data, mode } => {
            (write_file(&path, &data, mode), Outcome::Done)
        }
        ControlRequest::TrustCa { pem } => (trust_ca(&pem), Outcome::Done),
        ControlRequest::Identity {
            hostname,
            seed,
            unix_ns,
        } => {
            let resp = if in_vm {
                identity(&hostname, &seed, unix_ns)
            } else {
                error("cannot take an identity", "outside a VM", "refused")
            };
            (resp, Outcome::Done)
        }
        ControlRequest::Wait { us } => {
            let t = std::time::Instant::now();
            tokio::time::sleep(std::time::Duration::from_micros(us.into())).await;
            let us = t.elapsed().as_micros() as u64;
            (ControlResponse::Waited { us }, Outcome::Done)
        }
        ControlRequest::Shutdown { reboot } => {
            if in_vm {
                crate::power::sync();
            }
            (ControlResponse::Done, Outcome::Shutdown { reboot })
        }
    };
    frame::write_frame(&mut stream, &resp).await?;
    stream.shutdown().await.map_err(ControlError::Close)?;
    Ok(outcome)
}

fn error(what: &str, path: &str, e: impl std::fmt::Display) -> ControlResponse {
    ControlResponse::Error {
        message: format!("{what} {path}: {e}"),
    }
}

fn read_file(path: &str) -> ControlResponse {
    // Leave room for the frame's own header bytes.
    let limit = (MAX_FRAME - 64) as u64;
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => return error("cannot read", path, "is a directory"),
        Ok(m) if m.len() > limit => {
            return error(
                "cannot read",
                path,
                format!("{} bytes exceeds the {limit}-byte limit", m.len()),
            )
        }
        _ => {}
    }
    match std::fs::read(path) {
        Ok(data) if data.len() as u64 <= limit => ControlResponse::File {
            data: ByteBuf::from(data),
        },
        Ok(data) => error(
            "cannot read",
            path,
            format!("{} bytes exceeds the {limit}-byte limit", data.len()),
        ),
        Err(e) => error("cannot read", path, e),
    }
}

fn write_file(path: &str, data: &[u8], mode: Option<u32>) -> ControlResponse {
    let p = Path::new(path);
    if let Some(parent) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
        if let Err(e) = std::fs::create_dir_all(parent) {
            return error("cannot create the parent of", path, e);
        }
    }
    if let Err(e) = std::fs::write(p, data) {
        return error("cannot write", path, e);
    }
    if let Some(mode) = mode {
        if let Err(e) = std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)) {
            return error("cannot chmod", path, e);
        }
    }
    ControlResponse::Done
}

/// Take on a new session's identity after a restore (see [`ControlRequest::Identity`]).
fn identity(hostname: &str, seed: &[u8], unix_ns: u64) -> ControlResponse {
    if let Err(e) = crate::boot::entropy::reseed(seed) {
        return error("cannot reseed", "the kernel RNG", e);
    }
    if let Err(e) = nix::unistd::sethostname(hostname) {
        return error("cannot set", "the hostname", e);
    }
    let ts = libc::timespec {
        tv_sec: (unix_ns / 1_000_000_000) as _,
        tv_nsec: (unix_ns % 1_000_000_000) as _,
    };
    // SAFETY: clock_settime reads the timespec we own.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } != 0 {
        return error("cannot set", "the clock", std::io::Error::last_os_error());
    }
    ControlResponse::Done
}

/// Install `pem` as [`crate::env::CA_FILE`] and append it to the system bundle unless the
/// bundle already holds it (a resumed or restarted session gets the same request again).
fn trust_ca(pem: &str) -> ControlResponse {
    use std::io::Write;
    let pem = pem.trim_end().to_string() + "\n";
    if let ControlResponse::Error { message } =
        write_file(crate::env::CA_FILE, pem.as_bytes(), Some(0o644))
    {
        return ControlResponse::Error { message };
    }
    let bundle = crate::env::SYSTEM_BUNDLE;
    let current = std::fs::read_to_string(bundle).unwrap_or_default();
    if current.contains(pem.trim_end()) {
        return ControlResponse::Done;
    }
    let sep = if current.is_empty() || current.ends_with('\n') {
        ""
    } else {
        "\n"
    };
    let appended = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(bundle)
        .and_then(|mut f| f.write_all(format!("{sep}{pem}").as_bytes()));
    match appended {
        Ok(()) => ControlResponse::Done,
        Err(e) => error("cannot append the capsem CA to", bundle, e),
    }
}
