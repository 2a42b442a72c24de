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
    // The console is the guest's to write: on a terminal its control characters are shown,
    // not obeyed (`--raw` or a pipe gets the bytes as they are).
    use std::io::IsTerminal;
    let show = |text: &str| {
        if a.raw || !std::io::stdout().is_terminal() {
            print!("{text}");
        } else {
            print!("{}", crate::term::inert(text));
        }
    };
    println!("==> serial console <==");
    show(&logs.serial);
    println!("==> process log <==");
    show(&logs.process);
    Ok(0)
}
