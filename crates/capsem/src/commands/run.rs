//! `capsem run CMD`: a fresh temporary session for one command. The service destroys the
//! session when the stream ends — also when this process is killed.

use capsem_core::api::{RunRequest, StreamKind};

use crate::cli::RunArgs;
use crate::client::Target;

pub async fn run(target: &Target, a: RunArgs) -> anyhow::Result<i32> {
    let env: Vec<(String, String)> = super::env_map(&a.env)?.into_iter().collect();
    let req = RunRequest {
        ram_mb: Some(super::ram_mb(a.ram)?),
        cpus: super::cpus(a.cpu)?,
        env: env.iter().cloned().collect(),
        stream: StreamKind::Exec,
    };
    let client = target.connect().await?;
    let pb = crate::progress::spinner("booting temporary session");
    let io = client.upgrade("/run", &req).await;
    pb.finish_and_clear();
    crate::stream::exec(io?, a.command, vec![], a.timeout).await
}
