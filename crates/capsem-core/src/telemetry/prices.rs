//! The model price table (`data/prices.toml`, compiled in) and the cost of a call.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use serde::Deserialize;

#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
pub struct Price {
    pub input: f64,
    pub output: f64,
    pub cache_read: f64,
    pub cache_write: f64,
}

#[derive(Debug, Deserialize)]
pub struct Table {
    pub source: String,
    pub date: String,
    pub models: BTreeMap<String, Price>,
}

/// The compiled-in table.
pub fn table() -> &'static Table {
    static T: OnceLock<Table> = OnceLock::new();
    T.get_or_init(|| {
        toml::from_str(include_str!("../../data/prices.toml")).expect("data/prices.toml parses")
    })
}

/// The price of `model`: the entry whose key is the longest prefix of the name.
pub fn price(model: &str) -> Option<Price> {
    let model = model.strip_prefix("models/").unwrap_or(model);
    table()
        .models
        .iter()
        .filter(|(k, _)| model.starts_with(k.as_str()))
        .max_by_key(|(k, _)| k.len())
        .map(|(_, p)| *p)
}

/// Cost in USD of a call to `model`; `None` for a model the table does not know.
pub fn cost(
    model: &str,
    input: u64,
    output: u64,
    cache_read: u64,
    cache_write: u64,
) -> Option<f64> {
    let p = price(model)?;
    Some(
        (input as f64 * p.input
            + output as f64 * p.output
            + cache_read as f64 * p.cache_read
            + cache_write as f64 * p.cache_write)
            / 1_000_000.0,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longest_prefix_wins_and_unknown_models_have_no_price() {
        assert!(!table().source.is_empty() && !table().date.is_empty());
        assert_eq!(price("gpt-4o-mini-2024-07-18").unwrap().input, 0.15);
        assert_eq!(price("gpt-4o-2024-08-06").unwrap().input, 2.50);
        assert_eq!(price("claude-sonnet-4-5-20250929").unwrap().output, 15.0);
        assert_eq!(price("models/gemini-2.5-flash").unwrap().output, 2.50);
        assert!(price("llama-3").is_none());
        let c = cost(
            "claude-sonnet-4-20250514",
            1_000_000,
            1_000_000,
            1_000_000,
            1_000_000,
        )
        .unwrap();
        assert!((c - (3.0 + 15.0 + 0.30 + 3.75)).abs() < 1e-9);
    }
}
