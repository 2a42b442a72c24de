//! `capsem purge [--all]`: delete temporary sessions (all sessions with `--all`, after asking).

use std::io::{BufRead, Write};

use anyhow::bail;
use capsem_core::api::{PurgeRequest, PurgeResponse};

use crate::cli::PurgeArgs;
use crate::client::Target;

pub async fn run(target: &Target, a: PurgeArgs) -> anyhow::Result<i32> {
    if a.all && !a.yes {
        if !crate::term::is_tty(0) {
            bail!("purge --all destroys persistent sessions too: pass -y to confirm");
        }
        eprint!("Destroy ALL sessions, including persistent ones? [y/N] ");
        std::io::stderr().flush()?;
        let mut answer = String::new();
        std::io::stdin().lock().read_line(&mut answer)?;
        if !matches!(answer.trim(), "y" | "Y" | "yes") {
            eprintln!("aborted");
            return Ok(1);
        }
    }
    let r: PurgeResponse = target
        .connect()
        .await?
        .post("/purge", &PurgeRequest { all: a.all })
        .await?;
    for id in &r.deleted {
        println!("deleted {id}");
    }
    eprintln!("purged {} session(s)", r.deleted.len());
    Ok(0)
}
