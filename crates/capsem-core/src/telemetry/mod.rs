//! A session's record: `sessions/<id>/session.db` (SQLite, WAL). Producers (the proxy, the DNS
//! answers, exec) hand events to [`Recorder::record`], which never blocks: a writer thread
//! drains the queue and commits in batches, so nothing on the network path waits on the disk.
//! [`summary`] reads a database back for `capsem info`.
//!
//! Tables: `net_events`, `dns_events`, `exec_events`, `model_calls` (see [`SCHEMA`]).

pub mod models;
pub mod prices;

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// File name under the session directory.
pub const DB_FILE: &str = "session.db";

/// Events waiting for the writer beyond this many are dropped (and counted in the log).
const QUEUE: usize = 65_536;
/// The writer commits at most this many events per transaction...
const BATCH: usize = 4096;
/// ...gathered for this long after the first one.
const GATHER: Duration = Duration::from_millis(50);

pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS net_events (
    id INTEGER PRIMARY KEY, ts_ms INTEGER NOT NULL, domain TEXT NOT NULL, port INTEGER NOT NULL,
    method TEXT NOT NULL, path TEXT NOT NULL, status INTEGER, bytes_up INTEGER NOT NULL,
    bytes_down INTEGER NOT NULL, duration_ms INTEGER NOT NULL, decision TEXT NOT NULL,
    rule TEXT NOT NULL, process TEXT);
CREATE TABLE IF NOT EXISTS dns_events (
    id INTEGER PRIMARY KEY, ts_ms INTEGER NOT NULL, name TEXT NOT NULL, decision TEXT NOT NULL,
    rule TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS exec_events (
    id INTEGER PRIMARY KEY, ts_ms INTEGER NOT NULL, command TEXT NOT NULL, exit_code INTEGER,
    duration_ms INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS model_calls (
    id INTEGER PRIMARY KEY, ts_ms INTEGER NOT NULL, provider TEXT NOT NULL, model TEXT NOT NULL,
    streamed INTEGER NOT NULL, input_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL,
    cache_read_tokens INTEGER NOT NULL, cache_write_tokens INTEGER NOT NULL,
    cost_usd REAL, stop_reason TEXT, duration_ms INTEGER NOT NULL);
";

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("cannot open the session record {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("cannot read the session record {path}")]
    Query {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct NetEvent {
    pub domain: String,
    pub port: u16,
    pub method: String,
    pub path: String,
    pub status: Option<u16>,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub duration: Duration,
    pub decision: String,
    pub rule: String,
    pub process: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DnsEvent {
    pub name: String,
    pub decision: String,
    pub rule: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ExecEvent {
    pub command: String,
    pub exit_code: Option<i32>,
    pub duration: Duration,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelCall {
    pub provider: String,
    pub model: String,
    pub streamed: bool,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cache_read_tokens: u64,
    pub cache_write_tokens: u64,
    /// `None` when the price table does not know the model.
    pub cost_usd: Option<f64>,
    pub stop_reason: Option<String>,
    pub duration_ms: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Net(NetEvent),
    Dns(DnsEvent),
    Exec(ExecEvent),
    Model(ModelCall),
}

/// Cheap, cloneable handle to a session's record.
#[derive(Clone)]
pub struct Recorder {
    tx: mpsc::SyncSender<(u64, Event)>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Recorder {
    /// Open (creating) the database at `path` (mode 0600) and start its writer thread. The
    /// thread ends, after writing what is queued, when the last `Recorder` is dropped.
    pub fn open(path: &Path) -> Result<Recorder, TelemetryError> {
        let err = |source| TelemetryError::Open {
            path: path.to_path_buf(),
            source,
        };
        let db = open_db(path).map_err(err)?;
        let (tx, rx) = mpsc::sync_channel::<(u64, Event)>(QUEUE);
        std::thread::Builder::new()
            .name("telemetry".into())
            .spawn(move || writer(db, rx))
            .map_err(|e| err(rusqlite::Error::ToSqlConversionFailure(Box::new(e))))?;
        Ok(Recorder { tx })
    }

    /// Queue `ev`; never waits. A full queue drops the event with a warning.
    pub fn record(&self, ev: Event) {
        if let Err(mpsc::TrySendError::Full(_)) = self.tx.try_send((now_ms(), ev)) {
            tracing::warn!("telemetry queue full; an event was dropped");
        }
    }
}

fn open_db(path: &Path) -> rusqlite::Result<rusqlite::Connection> {
    if !path.exists() {
        // Create it private before SQLite opens it.
        let _ = crate::paths::write_private(path, b"");
    }
    let db = rusqlite::Connection::open(path)?;
    db.pragma_update(None, "journal_mode", "WAL")?;
    db.pragma_update(None, "synchronous", "NORMAL")?;
    db.execute_batch(SCHEMA)?;
    Ok(db)
}

fn writer(mut db: rusqlite::Connection, rx: mpsc::Receiver<(u64, Event)>) {
    while let Ok(first) = rx.recv() {
        // Let events gather for GATHER after the first one: one wake-up and one commit per
        // batch, not per event.
        std::thread::sleep(GATHER);
        let mut batch = vec![first];
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(e) => batch.push(e),
                Err(_) => break,
            }
        }
        if let Err(e) = write_batch(&mut db, &batch) {
            tracing::warn!(error = %e, n = batch.len(), "telemetry batch not written");
        }
    }
}

fn write_batch(db: &mut rusqlite::Connection, batch: &[(u64, Event)]) -> rusqlite::Result<()> {
    use rusqlite::params;
    let tx = db.transaction()?;
    // Requests are most of a batch: their statement is looked up once, not once a row.
    let mut net = None;
    for (ts, ev) in batch {
        match ev {
            Event::Net(n) => {
                let stmt = match &mut net {
                    Some(s) => s,
                    None => net.insert(tx.prepare_cached(
                        "INSERT INTO net_events (ts_ms, domain, port, method, path, status,
                         bytes_up, bytes_down, duration_ms, decision, rule, process)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
                    )?),
                };
                stmt.execute(params![
                    ts,
                    n.domain,
                    n.port,
                    n.method,
                    n.path,
                    n.status,
                    n.bytes_up,
                    n.bytes_down,
                    n.duration.as_millis() as u64,
                    n.decision,
                    n.rule,
                    n.process
                ])?;
            }
            Event::Dns(d) => {
                tx.prepare_cached(
                    "INSERT INTO dns_events (ts_ms, name, decision, rule) VALUES (?1, ?2, ?3, ?4)",
                )?
                .execute(params![ts, d.name, d.decision, d.rule])?;
            }
            Event::Exec(e) => {
                tx.prepare_cached(
                    "INSERT INTO exec_events (ts_ms, command, exit_code, duration_ms)
                     VALUES (?1, ?2, ?3, ?4)",
                )?
                .execute(params![
                    ts,
                    e.command,
                    e.exit_code,
                    e.duration.as_millis() as u64
                ])?;
            }
            Event::Model(m) => {
                tx.prepare_cached(
                    "INSERT INTO model_calls (ts_ms, provider, model, streamed, input_tokens,
                     output_tokens, cache_read_tokens, cache_write_tokens, cost_usd, stop_reason,
                     duration_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
                )?
                .execute(params![
                    ts,
                    m.provider,
                    m.model,
                    m.streamed,
                    m.input_tokens,
                    m.output_tokens,
                    m.cache_read_tokens,
                    m.cache_write_tokens,
                    m.cost_usd,
                    m.stop_reason,
                    m.duration_ms
                ])?;
            }
        }
    }
    drop(net);
    tx.commit()
}

/// What `capsem info` shows of a session's record.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub requests_allowed: u64,
    pub requests_denied: u64,
    pub dns_allowed: u64,
    pub dns_denied: u64,
    /// Most requested domains, with their request counts (at most 5).
    pub top_domains: Vec<(String, u64)>,
    pub model_calls: Vec<ModelCall>,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cache_read_tokens: u64,
    pub cache_write_tokens: u64,
    pub cost_usd: f64,
}

/// Read the summary of the database at `path` (an absent database is an empty record).
pub fn summary(path: &Path) -> Result<Summary, TelemetryError> {
    if !path.exists() {
        return Ok(Summary::default());
    }
    let q = |source| TelemetryError::Query {
        path: path.to_path_buf(),
        source,
    };
    let db = rusqlite::Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(q)?;
    let count = |sql: &str| -> rusqlite::Result<u64> { db.query_row(sql, [], |r| r.get(0)) };
    // A session whose record is still being created has no tables yet.
    if count("SELECT COUNT(*) FROM sqlite_master WHERE name = 'model_calls'").map_err(q)? == 0 {
        return Ok(Summary::default());
    }
    let mut s = Summary {
        requests_allowed: count("SELECT COUNT(*) FROM net_events WHERE decision = 'allow'")
            .map_err(q)?,
        requests_denied: count("SELECT COUNT(*) FROM net_events WHERE decision = 'deny'")
            .map_err(q)?,
        dns_allowed: count("SELECT COUNT(*) FROM dns_events WHERE decision = 'allow'")
            .map_err(q)?,
        dns_denied: count("SELECT COUNT(*) FROM dns_events WHERE decision = 'deny'").map_err(q)?,
        ..Summary::default()
    };
    let mut st = db
        .prepare(
            "SELECT domain, COUNT(*) AS n FROM net_events GROUP BY domain
             ORDER BY n DESC, domain LIMIT 5",
        )
        .map_err(q)?;
    s.top_domains = st
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .map_err(q)?
        .collect::<rusqlite::Result<_>>()
        .map_err(q)?;
    let mut st = db
        .prepare(
            "SELECT provider, model, streamed, input_tokens, output_tokens, cache_read_tokens,
             cache_write_tokens, cost_usd, stop_reason, duration_ms FROM model_calls ORDER BY id",
        )
        .map_err(q)?;
    s.model_calls = st
        .query_map([], |r| {
            Ok(ModelCall {
                provider: r.get(0)?,
                model: r.get(1)?,
                streamed: r.get(2)?,
                input_tokens: r.get(3)?,
                output_tokens: r.get(4)?,
                cache_read_tokens: r.get(5)?,
                cache_write_tokens: r.get(6)?,
                cost_usd: r.get(7)?,
                stop_reason: r.get(8)?,
                duration_ms: r.get(9)?,
            })
        })
        .map_err(q)?
        .collect::<rusqlite::Result<_>>()
        .map_err(q)?;
    for m in &s.model_calls {
        s.input_tokens += m.input_tokens;
        s.output_tokens += m.output_tokens;
        s.cache_read_tokens += m.cache_read_tokens;
        s.cache_write_tokens += m.cache_write_tokens;
        s.cost_usd += m.cost_usd.unwrap_or(0.0);
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_written_in_batches_and_summarised() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(DB_FILE);
        let rec = Recorder::open(&path).unwrap();
        let net = |domain: &str, decision: &str| {
            Event::Net(NetEvent {
                domain: domain.into(),
                port: 443,
                method: "GET".into(),
                path: "/".into(),
                status: Some(200),
                bytes_up: 10,
                bytes_down: 20,
                duration: Duration::from_millis(5),
                decision: decision.into(),
                rule: "allow a".into(),
                process: None,
            })
        };
        for _ in 0..3 {
            rec.record(net("a.example", "allow"));
        }
        rec.record(net("b.example", "deny"));
        rec.record(Event::Dns(DnsEvent {
            name: "b.example".into(),
            decision: "deny".into(),
            rule: "block b.example".into(),
        }));
        rec.record(Event::Model(ModelCall {
            provider: "anthropic".into(),
            model: "claude-x".into(),
            streamed: true,
            input_tokens: 100,
            output_tokens: 50,
            cache_read_tokens: 7,
            cache_write_tokens: 3,
            cost_usd: Some(0.25),
            stop_reason: Some("end_turn".into()),
            duration_ms: 9,
        }));
        drop(rec);
        // The writer drains its queue after the last handle is gone.
        let mut s = Summary::default();
        for _ in 0..100 {
            s = summary(&path).unwrap();
            if s.model_calls.len() == 1 {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!((s.requests_allowed, s.requests_denied), (3, 1));
        assert_eq!((s.dns_allowed, s.dns_denied), (0, 1));
        assert_eq!(
            s.top_domains,
            vec![("a.example".to_string(), 3), ("b.example".to_string(), 1)]
        );
        assert_eq!(
            (s.input_tokens, s.output_tokens, s.cache_read_tokens),
            (100, 50, 7)
        );
        assert!((s.cost_usd - 0.25).abs() < 1e-9);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(
            summary(&dir.path().join("none.db")).unwrap(),
            Summary::default()
        );
    }
}
