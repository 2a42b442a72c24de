//! `capsem list`: NAME STATUS RAM CPUS UPTIME (or ids only with `-q`).

use capsem_core::api::ListResponse;

use crate::cli::ListArgs;
use crate::client::Target;

pub async fn run(target: &Target, a: ListArgs) -> anyhow::Result<i32> {
    let list: ListResponse = target.connect().await?.get("/vms/list").await?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(0);
    }
    if a.quiet {
        for s in &list.sandboxes {
            println!("{}", s.id);
        }
        return Ok(0);
    }
    println!("{}", render(&list));
    Ok(0)
}

fn render(list: &ListResponse) -> String {
    let mut rows = vec![[
        "ID".to_string(),
        "NAME".into(),
        "STATUS".into(),
        "RAM".into(),
        "CPUS".into(),
        "UPTIME".into(),
    ]];
    for s in &list.sandboxes {
        rows.push([
            s.id.clone(),
            s.name.clone().unwrap_or_else(|| "-".into()),
            s.status.as_str().to_string(),
            format!("{}G", s.ram_mb as f64 / 1024.0),
            s.cpus.to_string(),
            super::human_secs(s.uptime_secs),
        ]);
    }
    super::table(&rows)
}
