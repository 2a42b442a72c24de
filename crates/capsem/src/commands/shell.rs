//! `capsem shell [SESSION]`: an interactive terminal in a session, or in a temporary one that is
//! destroyed when the shell exits.

use capsem_core::api::{RunRequest, StreamKind, StreamRequest};

use crate::cli::ShellArgs;
use crate::client::Target;

pub async fn run(target: &Target, a: ShellArgs) -> anyhow::Result<i32> {
    let env = super::env_map(&a.env)?;
    let client = target.connect().await?;
    let io = match &a.session {
        Some(s) => {
            client
                .upgrade(
                    &format!("/vms/{}/terminal", super::seg(s)),
                    &StreamRequest {},
                )
                .await?
        }
        None => {
            let pb = crate::progress::spinner("booting temporary session");
            let req = RunRequest {
                env: env.clone(),
                stream: StreamKind::Terminal,
                ..Default::default()
            };
            let io = client.upgrade("/run", &req).await;
            pb.finish_and_clear();
            io?
        }
    };
    let env = if a.session.is_some() {
        env.into_iter().collect()
    } else {
        vec![]
    };
    crate::stream::terminal(io, env).await
}
