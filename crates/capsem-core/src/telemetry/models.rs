//! Recognising model API calls and reading their usage from the response, JSON or SSE:
//! Anthropic Messages, OpenAI Chat Completions and Responses, Gemini generateContent and
//! streamGenerateContent. Token counts are normalised: `input` is uncached input, cache reads
//! and writes are counted apart, `output` includes reasoning ("thinking") tokens.

use serde_json::Value;

/// A model API the proxy recognises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    AnthropicMessages,
    OpenAiChat,
    OpenAiResponses,
    Gemini,
}

impl Api {
    pub fn provider(self) -> &'static str {
        match self {
            Api::AnthropicMessages => "anthropic",
            Api::OpenAiChat | Api::OpenAiResponses => "openai",
            Api::Gemini => "google",
        }
    }
}

/// The API a request goes to, by its (real, requested) host and path.
pub fn recognize(host: &str, method: &str, path: &str) -> Option<Api> {
    if !method.eq_ignore_ascii_case("POST") {
        return None;
    }
    let path = path.split('?').next().unwrap_or(path);
    match host {
        "api.anthropic.com" if path == "/v1/messages" => Some(Api::AnthropicMessages),
        "api.openai.com" if path == "/v1/chat/completions" => Some(Api::OpenAiChat),
        "api.openai.com" if path == "/v1/responses" => Some(Api::OpenAiResponses),
        "generativelanguage.googleapis.com"
            if path.contains("/models/")
                && (path.ends_with(":generateContent")
                    || path.ends_with(":streamGenerateContent")) =>
        {
            Some(Api::Gemini)
        }
        _ => None,
    }
}

/// Usage read from one response.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Usage {
    pub model: String,
    pub streamed: bool,
    pub input: u64,
    pub output: u64,
    pub cache_read: u64,
    pub cache_write: u64,
    pub stop_reason: Option<String>,
}

fn n(v: &Value, path: &[&str]) -> u64 {
    let mut cur = v;
    for k in path {
        match cur.get(k) {
            Some(x) => cur = x,
            None => return 0,
        }
    }
    cur.as_u64().unwrap_or(0)
}

fn s(v: &Value, path: &[&str]) -> Option<String> {
    let mut cur = v;
    for k in path {
        cur = cur.get(k)?;
    }
    cur.as_str().map(str::to_string)
}

/// Parse a response `body` of `api`. `request_path` supplies Gemini's model name when the
/// response lacks it. `None` when nothing usable is in the body.
pub fn parse(api: Api, request_path: &str, content_type: &str, body: &[u8]) -> Option<Usage> {
    let text = std::str::from_utf8(body).ok()?;
    let streamed = content_type.contains("text/event-stream");
    let events: Vec<Value> = if streamed {
        sse_data(text)
            .filter_map(|d| serde_json::from_str(d).ok())
            .collect()
    } else {
        vec![serde_json::from_str(text).ok()?]
    };
    let mut u = Usage {
        streamed,
        ..Usage::default()
    };
    for ev in &events {
        fold(api, ev, &mut u);
    }
    if u.model.is_empty() && api == Api::Gemini {
        u.model = gemini_model_from_path(request_path).unwrap_or_default();
    }
    if u.model.is_empty() && u.input == 0 && u.output == 0 {
        return None;
    }
    Some(u)
}

/// The `data:` payloads of an event stream (multi-line data joined), `[DONE]` left out.
fn sse_data(text: &str) -> impl Iterator<Item = &str> {
    text.split('\n').filter_map(|line| {
        let d = line
            .trim_end_matches('\r')
            .strip_prefix("data:")?
            .trim_start();
        (d != "[DONE]" && !d.is_empty()).then_some(d)
    })
}

fn fold(api: Api, ev: &Value, u: &mut Usage) {
    match api {
        Api::AnthropicMessages => {
            // JSON body, or the stream's message_start / message_delta events.
            let msg = match ev.get("type").and_then(Value::as_str) {
                Some("message_start") => ev.get("message").unwrap_or(ev),
                _ => ev,
            };
            if let Some(m) = s(msg, &["model"]) {
                u.model = m;
            }
            if let Some(usage) = msg.get("usage") {
                let set = |field: &str, into: &mut u64| {
                    if let Some(v) = usage.get(field).and_then(Value::as_u64) {
                        *into = v;
                    }
                };
                set("input_tokens", &mut u.input);
                set("output_tokens", &mut u.output);
                set("cache_read_input_tokens", &mut u.cache_read);
                set("cache_creation_input_tokens", &mut u.cache_write);
            }
            if let Some(r) = s(msg, &["stop_reason"]).or_else(|| s(ev, &["delta", "stop_reason"])) {
                u.stop_reason = Some(r);
            }
        }
        Api::OpenAiChat => {
            if let Some(m) = s(ev, &["model"]) {
                u.model = m;
            }
            if let Some(r) = ev
                .get("choices")
                .and_then(|c| c.get(0))
                .and_then(|c| c.get("finish_reason"))
                .and_then(Value::as_str)
            {
                u.stop_reason = Some(r.to_string());
            }
            if let Some(usage) = ev.get("usage").filter(|v| v.is_object()) {
                let cached = n(usage, &["prompt_tokens_details", "cached_tokens"]);
                u.cache_read = cached;
                u.input = n(usage, &["prompt_tokens"]).saturating_sub(cached);
                u.output = n(usage, &["completion_tokens"]);
            }
        }
        Api::OpenAiResponses => {
            // JSON body is the response; the stream carries it in response.* events.
            let resp = ev.get("response").unwrap_or(ev);
            if let Some(m) = s(resp, &["model"]) {
                u.model = m;
            }
            if let Some(st) = s(resp, &["status"]) {
                u.stop_reason = Some(s(resp, &["incomplete_details", "reason"]).unwrap_or(st));
            }
            if let Some(usage) = resp.get("usage").filter(|v| v.is_object()) {
                let cached = n(usage, &["input_tokens_details", "cached_tokens"]);
                u.cache_read = cached;
                u.input = n(usage, &["input_tokens"]).saturating_sub(cached);
                u.output = n(usage, &["output_tokens"]);
            }
        }
        Api::Gemini => {
            if let Some(m) = s(ev, &["modelVersion"]) {
                u.model = m;
            }
            if let Some(r) = ev
                .get("candidates")
                .and_then(|c| c.get(0))
                .and_then(|c| c.get("finishReason"))
                .and_then(Value::as_str)
            {
                u.stop_reason = Some(r.to_string());
            }
            if let Some(usage) = ev.get("usageMetadata") {
                let cached = n(usage, &["cachedContentTokenCount"]);
                u.cache_read = cached;
                u.input = n(usage, &["promptTokenCount"]).saturating_sub(cached);
                u.output = n(usage, &["candidatesTokenCount"])
                    .saturating_add(n(usage, &["thoughtsTokenCount"]));
            }
        }
    }
}

/// `/v1beta/models/gemini-2.5-flash:generateContent` → `gemini-2.5-flash`.
fn gemini_model_from_path(path: &str) -> Option<String> {
    let after = path.split("/models/").nth(1)?;
    Some(after.split(':').next()?.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_the_four_apis_by_host_and_path() {
        assert_eq!(
            recognize("api.anthropic.com", "POST", "/v1/messages"),
            Some(Api::AnthropicMessages)
        );
        assert_eq!(
            recognize("api.openai.com", "POST", "/v1/chat/completions"),
            Some(Api::OpenAiChat)
        );
        assert_eq!(
            recognize("api.openai.com", "POST", "/v1/responses"),
            Some(Api::OpenAiResponses)
        );
        assert_eq!(
            recognize(
                "generativelanguage.googleapis.com",
                "POST",
                "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"
            ),
            Some(Api::Gemini)
        );
        assert_eq!(recognize("api.openai.com", "GET", "/v1/models"), None);
        assert_eq!(recognize("example.com", "POST", "/v1/messages"), None);
    }

    #[test]
    fn gemini_model_falls_back_to_the_path() {
        let body = br#"{"usageMetadata":{"promptTokenCount":5,"candidatesTokenCount":2}}"#;
        let u = parse(
            Api::Gemini,
            "/v1beta/models/gemini-2.0-flash:generateContent",
            "application/json",
            body,
        )
        .unwrap();
        assert_eq!(u.model, "gemini-2.0-flash");
        assert_eq!((u.input, u.output), (5, 2));
        assert!(parse(Api::OpenAiChat, "/", "application/json", b"not json").is_none());
    }
}
