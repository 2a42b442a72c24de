//! The persistence commands: `persist SESSION NAME` (keep a session, also a temporary one
//! mid-run, under a name), `suspend SESSION` and `resume SESSION`.

use capsem_core::api::{PersistRequest, SessionInfo};

use crate::cli::PersistArgs;
use crate::client::Target;

pub async fn run(target: &Target, a: PersistArgs) -> anyhow::Result<i32> {
    let info: SessionInfo = target
        .connect()
        .await?
        .post(
            &format!("/vms/{}/persist", super::seg(&a.session)),
            &PersistRequest { name: a.name },
        )
        .await?;
    println!(
        "{} is persistent as {}",
        info.id,
        info.name.as_deref().unwrap_or("?")
    );
    Ok(0)
}

pub async fn suspend(target: &Target, session: &str) -> anyhow::Result<i32> {
    let client = target.connect().await?;
    let pb = crate::progress::spinner("saving the VM to disk");
    let r: anyhow::Result<SessionInfo> = client
        .post(
            &format!("/vms/{}/suspend", super::seg(session)),
            &serde_json::json!({}),
        )
        .await
        .map_err(Into::into);
    pb.finish_and_clear();
    let info = r?;
    println!("suspended {}", info.name.as_deref().unwrap_or(&info.id));
    Ok(0)
}

pub async fn resume(target: &Target, session: &str) -> anyhow::Result<i32> {
    let client = target.connect().await?;
    let pb = crate::progress::spinner("resuming");
    let r: anyhow::Result<SessionInfo> = client
        .post(
            &format!("/vms/{}/resume", super::seg(session)),
            &serde_json::json!({}),
        )
        .await
        .map_err(Into::into);
    pb.finish_and_clear();
    let info = r?;
    println!(
        "{} is {}",
        info.name.as_deref().unwrap_or(&info.id),
        info.status.as_str()
    );
    Ok(0)
}
