//! `capsem exec SESSION CMD`: run a command in a running session, streaming its output.

use capsem_core::api::StreamRequest;

use crate::cli::ExecArgs;
use crate::client::Target;

pub async fn run(target: &Target, a: ExecArgs) -> anyhow::Result<i32> {
    let env = super::env_map(&a.env)?.into_iter().collect();
    let client = target.connect().await?;
    let io = client
        .upgrade(
            &format!("/vms/{}/exec/stream", super::seg(&a.session)),
            &StreamRequest {},
        )
        .await?;
    crate::stream::exec(io, a.command, env, a.timeout).await
}
