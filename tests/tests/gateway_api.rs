//! The OpenAI-compatible API through a real controller, worker and gateway on the test model.

use std::time::Duration;

use herd_tests::cluster::{MODEL, controller, gateway, wait_for_workers, worker};
use serde_json::{Value, json};

async fn post(url: &str, body: &Value) -> (u16, Value) {
    let resp = reqwest::Client::new().post(url).json(body).send().await.expect("gateway answers");
    let status = resp.status().as_u16();
    (status, resp.json().await.expect("a JSON body"))
}

/// The concatenated content deltas of an SSE chat stream, and its raw events.
async fn stream_text(url: &str, body: &Value) -> (String, Vec<String>) {
    let resp = reqwest::Client::new().post(url).json(body).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert!(resp.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    let raw = resp.text().await.unwrap();
    let events: Vec<String> = raw.lines().filter_map(|l| l.strip_prefix("data: ")).map(str::to_string).collect();
    let text = events
        .iter()
        .filter(|e| *e != "[DONE]")
        .map(|e| serde_json::from_str::<Value>(e).unwrap())
        .filter_map(|e| e["choices"][0]["delta"]["content"].as_str().map(str::to_string))
        .collect();
    (text, events)
}

#[tokio::test(flavor = "multi_thread")]
async fn chat_completions_answer_hamlet_and_stream_the_same_text() {
    let ctl = controller("127.0.0.1:0", "5s");
    let _w = worker(&ctl, &[]);
    let gw = gateway(&ctl);
    wait_for_workers(&gw, 1, Duration::from_secs(120)).await;
    let url = format!("{}/v1/chat/completions", gw.url());
    let question = json!([{"role": "user", "content": "Who wrote the play Hamlet?"}]);

    let body = json!({"model": MODEL, "messages": question, "temperature": 0, "max_tokens": 24});
    let (status, resp) = post(&url, &body).await;
    assert_eq!(status, 200, "{resp}");
    let text = resp["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    assert!(text.contains("Shakespeare"), "answer: {text}");
    assert_eq!(resp["object"], "chat.completion");
    assert_eq!(resp["choices"][0]["message"]["role"], "assistant");
    let usage = &resp["usage"];
    assert!(usage["prompt_tokens"].as_u64().unwrap() > 10);
    assert_eq!(
        usage["total_tokens"].as_u64().unwrap(),
        usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
    );

    let mut streaming = body.clone();
    streaming["stream"] = json!(true);
    streaming["stream_options"] = json!({"include_usage": true});
    let (streamed, events) = stream_text(&url, &streaming).await;
    assert_eq!(streamed, text, "greedy streaming and non-streaming differ");
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let parsed: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    assert_eq!(parsed[0]["choices"][0]["delta"]["role"], "assistant", "the first chunk carries the role");
    let finish = parsed.iter().find(|e| !e["choices"][0]["finish_reason"].is_null()).expect("a finish chunk");
    assert!(["stop", "length"].contains(&finish["choices"][0]["finish_reason"].as_str().unwrap()));
    let last = parsed.last().unwrap();
    assert_eq!(last["choices"], json!([]), "the usage chunk has no choices");
    // The same prompt again: the worker's prefix cache serves all of it but its last token.
    let mut usage = resp["usage"].clone();
    usage["prompt_tokens_details"]["cached_tokens"] = json!(usage["prompt_tokens"].as_u64().unwrap() - 1);
    assert_eq!(last["usage"], usage);

    let two = json!({"model": MODEL, "messages": question, "n": 2, "max_tokens": 8, "seed": 3});
    let (status, resp) = post(&url, &two).await;
    assert_eq!(status, 200, "{resp}");
    let choices = resp["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 2);
    assert_eq!((choices[0]["index"].as_u64(), choices[1]["index"].as_u64()), (Some(0), Some(1)));

    let mut two_stream = two.clone();
    two_stream["stream"] = json!(true);
    let (_, events) = stream_text(&url, &two_stream).await;
    let indices: std::collections::BTreeSet<u64> = events
        .iter()
        .filter(|e| *e != "[DONE]")
        .map(|e| serde_json::from_str::<Value>(e).unwrap()["choices"][0]["index"].as_u64().unwrap())
        .collect();
    assert_eq!(indices.into_iter().collect::<Vec<_>>(), vec![0, 1], "streaming n=2 gives both choices");

    let (status, resp) = post(
        &format!("{}/v1/completions", gw.url()),
        &json!({"model": MODEL, "prompt": ["The capital of France is", "1, 2, 3,"], "max_tokens": 4, "temperature": 0}),
    )
    .await;
    assert_eq!(status, 200, "{resp}");
    assert_eq!(resp["object"], "text_completion");
    assert_eq!(resp["choices"].as_array().unwrap().len(), 2);

    let models: Value = reqwest::get(format!("{}/v1/models", gw.url())).await.unwrap().json().await.unwrap();
    assert_eq!(models["data"][0]["id"], MODEL);
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_requests_get_documented_errors() {
    let ctl = controller("127.0.0.1:0", "5s");
    let _w = worker(&ctl, &[]);
    let gw = gateway(&ctl);
    wait_for_workers(&gw, 1, Duration::from_secs(120)).await;
    let url = format!("{}/v1/chat/completions", gw.url());
    let hi = json!([{"role": "user", "content": "hi"}]);
    let with = |k: &str, v: Value| {
        let mut b = json!({"model": MODEL, "messages": hi, "max_tokens": 2});
        b[k] = v;
        b.to_string().into_bytes()
    };
    let long_prompt = "hello ".repeat(9000);
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("bad JSON", b"{\"model\": ".to_vec(), 400),
        ("not an object", b"[1, 2]".to_vec(), 400),
        ("invalid UTF-8", b"{\"model\": \"\xff\xfe\"}".to_vec(), 400),
        ("missing model", json!({"messages": hi}).to_string().into_bytes(), 400),
        ("missing messages", json!({"model": MODEL}).to_string().into_bytes(), 400),
        ("empty messages", with("messages", json!([])), 400),
        ("messages not a list", with("messages", json!("hi")), 400),
        ("unknown role", with("messages", json!([{"role": "wizard", "content": "hi"}])), 400),
        ("content a number", with("messages", json!([{"role": "user", "content": 5}])), 400),
        ("model a number", with("model", json!(7)), 400),
        ("negative max_tokens", with("max_tokens", json!(-1)), 400),
        ("zero max_tokens", with("max_tokens", json!(0)), 400),
        ("huge max_tokens", with("max_tokens", json!(10_000_000_000u64)), 400),
        ("max_tokens over context", with("max_tokens", json!(100_000)), 400),
        ("max_tokens a string", with("max_tokens", json!("ten")), 400),
        ("temperature 5", with("temperature", json!(5)), 400),
        ("top_p 2", with("top_p", json!(2)), 400),
        ("n 0", with("n", json!(0)), 400),
        ("ten stop strings", with("stop", json!(["a", "b", "c", "d", "e", "f", "g", "h", "i", "j"])), 400),
        ("stop a number", with("stop", json!(3)), 400),
        ("presence_penalty 3", with("presence_penalty", json!(3)), 400),
        ("top_logprobs 50", with("top_logprobs", json!(50)), 400),
        ("unknown model", with("model", json!("no-such-model")), 404),
        ("prompt over the context", with("messages", json!([{"role": "user", "content": long_prompt}])), 400),
        (
            "prompt of more bytes than any context",
            {
                let mut b =
                    json!({"model": MODEL, "messages": [{"role": "user", "content": "hello ".repeat(100_000)}]});
                b["n"] = json!(16);
                b.to_string().into_bytes()
            },
            400,
        ),
        ("10 MB body", with("messages", json!([{"role": "user", "content": "x".repeat(10 << 20)}])), 413),
    ];
    assert!(cases.len() >= 20);
    let client = reqwest::Client::new();
    for (name, body, want) in cases {
        let resp = client
            .post(&url)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        assert_eq!(status, want, "{name}: {text}");
        let err: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("{name}: not JSON: {text}"));
        let msg = err["error"]["message"].as_str().unwrap_or_else(|| panic!("{name}: no error.message: {text}"));
        assert!(!msg.is_empty() && err["error"]["type"].is_string(), "{name}: {text}");
        if name == "prompt over the context" {
            assert!(msg.contains("8192"), "{name}: the message gives the numbers: {msg}");
        }
        if name == "prompt of more bytes than any context" {
            // Refused before tokenizing (once per choice): the message counts bytes, not tokens.
            assert!(msg.contains("600000 bytes") && msg.contains("8192"), "{name}: {msg}");
            assert_eq!(err["error"]["code"], "context_length_exceeded", "{name}: {text}");
        }
    }
}
