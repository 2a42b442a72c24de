//! A minimal QMP client (QEMU Machine Protocol, JSON lines over the control socket): the
//! greeting and capability negotiation, then one command at a time; asynchronous events that
//! arrive in between are skipped.

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("cannot reach QEMU's control socket {0}")]
    Connect(String, #[source] std::io::Error),
    #[error("QEMU's control socket failed")]
    Io(#[from] std::io::Error),
    #[error("QEMU closed its control socket")]
    Closed,
    #[error("QEMU sent something that is not QMP: {0}")]
    Garbled(String),
    #[error("QEMU refused {command}: {message}")]
    Refused { command: String, message: String },
}

pub struct Qmp {
    reader: BufReader<tokio::net::unix::OwnedReadHalf>,
    writer: tokio::net::unix::OwnedWriteHalf,
}

impl Qmp {
    /// Connect (retrying for up to `wait` while QEMU creates the socket) and negotiate.
    pub async fn connect(path: &Path, wait: Duration) -> Result<Qmp, QmpError> {
        let end = tokio::time::Instant::now() + wait;
        let stream = loop {
            match crate::sock::connect(path).await {
                Ok(s) => break s,
                Err(e) if tokio::time::Instant::now() >= end => {
                    return Err(QmpError::Connect(path.display().to_string(), e))
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        let (r, w) = stream.into_split();
        let mut q = Qmp {
            reader: BufReader::new(r),
            writer: w,
        };
        let greeting = q.read().await?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Garbled(greeting.to_string()));
        }
        q.execute("qmp_capabilities", Value::Null).await?;
        Ok(q)
    }

    async fn read(&mut self) -> Result<Value, QmpError> {
        let mut line = String::new();
        if self.reader.read_line(&mut line).await? == 0 {
            return Err(QmpError::Closed);
        }
        serde_json::from_str(&line).map_err(|_| QmpError::Garbled(line.trim().to_string()))
    }

    /// Run `command` with `args` (`Value::Null` for none) and return its `return` value.
    pub async fn execute(&mut self, command: &str, args: Value) -> Result<Value, QmpError> {
        let mut msg = json!({ "execute": command });
        if !args.is_null() {
            msg["arguments"] = args;
        }
        let mut text = msg.to_string();
        text.push('\n');
        self.writer.write_all(text.as_bytes()).await?;
        loop {
            let v = self.read().await?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(QmpError::Refused {
                    command: command.to_string(),
                    message: e["desc"].as_str().unwrap_or("unknown error").to_string(),
                });
            }
            // An event ({"event": ...}): not ours, keep reading.
        }
    }

    /// `query-status`'s `status` (`running`, `paused`, `inmigrate`, `postmigrate`, …).
    pub async fn status(&mut self) -> Result<String, QmpError> {
        let r = self.execute("query-status", Value::Null).await?;
        Ok(r["status"].as_str().unwrap_or("").to_string())
    }
}
