//! `capsem create [NAME]`: boot a session in the background and print its id.

use capsem_core::api::{CreateRequest, SessionInfo};

use crate::cli::CreateArgs;
use crate::client::Target;

pub async fn run(target: &Target, a: CreateArgs) -> anyhow::Result<i32> {
    let req = CreateRequest {
        persistent: Some(a.name.is_some()),
        name: a.name,
        ram_mb: a.ram.map(super::ram_mb).transpose()?,
        cpus: super::cpus(a.cpu)?,
        env: super::env_map(&a.env)?,
        from: a.from,
    };
    let client = target.connect().await?;
    let pb = crate::progress::spinner(if req.from.is_some() {
        "cloning and booting session"
    } else {
        "booting session"
    });
    let res = client.post::<_, SessionInfo>("/vms/create", &req).await;
    pb.finish_and_clear();
    let info = res?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&info)?);
    } else {
        println!("{}", info.id);
    }
    Ok(0)
}
