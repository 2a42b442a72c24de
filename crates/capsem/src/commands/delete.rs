//! `capsem delete SESSION`.

use capsem_core::api::DeleteResponse;

use crate::cli::DeleteArgs;
use crate::client::Target;

pub async fn run(target: &Target, a: DeleteArgs) -> anyhow::Result<i32> {
    let r: DeleteResponse = target
        .connect()
        .await?
        .call::<(), _>(
            capsem_core::uds_http::Method::DELETE,
            &format!("/vms/{}/delete", super::seg(&a.session)),
            None,
        )
        .await?;
    println!("deleted {}", r.id);
    Ok(0)
}
