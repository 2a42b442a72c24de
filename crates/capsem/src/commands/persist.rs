//! The persistence commands: `persist SESSION NAME` (keep a session, also a temporary one
//! mid-run, under a name), `suspend SESSION`, `resume SESSION` and `restart SESSION`.

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
    lifecycle(target, session, "suspend", "saving the VM to disk", "").await
}

pub async fn resume(target: &Target, session: &str) -> anyhow::Result<i32> {
    lifecycle(target, session, "resume", "resuming", "").await
}

pub async fn restart(target: &Target, session: &str) -> anyhow::Result<i32> {
    lifecycle(target, session, "restart", "rebooting", " (rebooted)").await
}

/// Run one lifecycle verb and say where the session stands: `NAME is STATUS` and `note`.
async fn lifecycle(
    target: &Target,
    session: &str,
    action: &str,
    doing: &str,
    note: &str,
) -> anyhow::Result<i32> {
    let info = post_with_spinner(target, session, action, doing).await?;
    println!(
        "{} is {}{note}",
        info.name.as_deref().unwrap_or(&info.id),
        info.status.as_str()
    );
    Ok(0)
}

/// `POST /vms/<session>/<action>` with a spinner while the service works.
async fn post_with_spinner(
    target: &Target,
    session: &str,
    action: &str,
    doing: &str,
) -> anyhow::Result<SessionInfo> {
    let client = target.connect().await?;
    let pb = crate::progress::spinner(doing);
    let r = client
        .post(
            &format!("/vms/{}/{action}", super::seg(session)),
            &serde_json::json!({}),
        )
        .await;
    pb.finish_and_clear();
    Ok(r?)
}
