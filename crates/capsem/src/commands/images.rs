//! Fork images: `fork SESSION NAME [-d TEXT]`, `image list`, `image delete NAME [--force]`.

use capsem_core::api::{ForkRequest, ImageInfo, ImageListResponse};

use crate::cli::{ForkArgs, ImageDeleteArgs};
use crate::client::Target;

pub async fn fork(target: &Target, a: ForkArgs) -> anyhow::Result<i32> {
    let client = target.connect().await?;
    let pb = crate::progress::spinner("copying the disk");
    let r = client
        .post::<_, ImageInfo>(
            &format!("/vms/{}/fork", super::seg(&a.session)),
            &ForkRequest {
                name: a.name,
                description: a.description,
            },
        )
        .await;
    pb.finish_and_clear();
    let info = r?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&info)?);
    } else {
        println!(
            "forked {} into image {} ({} ms); boot it with `capsem resume {}` or `capsem create --from {}`",
            info.image.source,
            info.image.name,
            info.took_ms.unwrap_or(0),
            info.image.name,
            info.image.name
        );
    }
    Ok(0)
}

pub async fn list(target: &Target, json: bool) -> anyhow::Result<i32> {
    let r: ImageListResponse = target.connect().await?.get("/images/list").await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!("{}", render(&r.images));
    }
    Ok(0)
}

pub async fn delete(target: &Target, a: ImageDeleteArgs) -> anyhow::Result<i32> {
    let path = format!(
        "/images/{}{}",
        super::seg(&a.name),
        if a.force { "?force=true" } else { "" }
    );
    let r: ImageInfo = target
        .connect()
        .await?
        .call::<(), _>(capsem_core::uds_http::Method::DELETE, &path, None)
        .await?;
    println!("deleted image {}", r.image.name);
    Ok(0)
}

fn render(images: &[ImageInfo]) -> String {
    let mut rows = vec![[
        "NAME".to_string(),
        "SOURCE".into(),
        "SIZE".into(),
        "USED BY".into(),
        "DESCRIPTION".into(),
    ]];
    for i in images {
        rows.push([
            i.image.name.clone(),
            i.image.source.clone(),
            format!("{:.1}M", i.size_bytes as f64 / (1024.0 * 1024.0)),
            if i.used_by.is_empty() {
                "-".into()
            } else {
                i.used_by.join(",")
            },
            i.image.description.clone(),
        ]);
    }
    super::table(&rows)
}
