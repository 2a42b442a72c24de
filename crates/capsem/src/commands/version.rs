//! `capsem version`: this binary's version and, when it runs, the service's.

use capsem_core::api::{VersionResponse, API_VERSION};

use crate::client::Target;

pub async fn run(target: &Target, json: bool) -> anyhow::Result<i32> {
    let service = if target.is_running().await {
        target
            .client()
            .get::<VersionResponse>("/version")
            .await
            .ok()
    } else {
        None
    };
    if json {
        let v = serde_json::json!({
            "version": env!("CARGO_PKG_VERSION"),
            "api_version": API_VERSION,
            "protocol_version": capsem_proto::PROTOCOL_VERSION,
            "service": service,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(0);
    }
    println!("capsem {}", env!("CARGO_PKG_VERSION"));
    println!(
        "  api {API_VERSION}, guest protocol {}",
        capsem_proto::PROTOCOL_VERSION
    );
    match service {
        Some(s) => println!("  service {} (running)", s.version),
        None => println!("  service not running"),
    }
    Ok(0)
}
