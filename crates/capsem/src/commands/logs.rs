//! `capsem logs SESSION [--tail N]`: the serial console, then the process log.

use capsem_core::api::LogsResponse;

use crate::cli::LogsArgs;
use crate::client::Target;

pub async fn run(target: &Target, a: LogsArgs) -> anyhow::Result<i32> {
    let mut path = format!("/vms/{}/logs", super::seg(&a.session));
    if let Some(n) = a.tail {
        path.push_str(&format!("?tail={n}"));
    }
    let logs: LogsResponse = target.connect().await?.get(&path).await?;
    println!("==> serial console <==");
    print!("{}", logs.serial);
    println!("==> process log <==");
    print!("{}", logs.process);
    Ok(0)
}
