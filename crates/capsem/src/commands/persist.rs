//! `capsem persist SESSION NAME`: keep a session (also a temporary one, mid-run) under a name.

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
