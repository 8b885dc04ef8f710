//! The OpenAI-compatible API through a real controller, worker and gateway on the test model.

use std::time::Duration;

use std::sync::OnceLock;

use herd_tests::cluster::{MODEL, controller, gateway, wait_for_workers, worker};
use herd_tests::test_model;
use herd_worker::engine::{Engine, GenerationParams, LoadOptions, Message, SamplingParams};
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
        ("logit_bias past the vocabulary", with("logit_bias", json!({"4000000": 5})), 400),
        ("stop_token_ids past the vocabulary", with("stop_token_ids", json!([4000000])), 400),
        ("min_tokens over max_tokens", with("min_tokens", json!(3)), 400),
        ("a json_schema without its schema", with("response_format", json!({"type": "json_schema"})), 400),
        ("a regex llguidance refuses", with("structured_outputs", json!({"regex": "(unclosed"})), 400),
        ("tools, not supported yet", with("tools", json!([{"type": "function", "function": {"name": "f"}}])), 400),
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

/// A chat request asking `content`, with `extra` fields set over `base`'s.
fn chat_body(content: &str, base: Value, extra: Value) -> Value {
    let mut body = json!({"model": MODEL, "messages": [{"role": "user", "content": content}]});
    for (k, v) in base.as_object().unwrap().iter().chain(extra.as_object().unwrap()) {
        body[k] = v.clone();
    }
    body
}

/// A controller, one worker on the test model and a gateway that has seen it.
async fn one_worker_cluster() -> (herd_tests::cluster::Proc, herd_tests::cluster::Proc, herd_tests::cluster::Proc) {
    let ctl = controller("127.0.0.1:0", "5s");
    let w = worker(&ctl, &[]);
    let gw = gateway(&ctl);
    wait_for_workers(&gw, 1, Duration::from_secs(120)).await;
    (ctl, w, gw)
}

/// The test model in-process, for the token ids of answers the gateway gives as text.
fn engine() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| Engine::load(&LoadOptions::new(test_model()), &mut |_, _| {}).expect("load test model"))
}

/// The greedy answer's token ids and text, and why it ended, computed in-process.
fn greedy_ids(question: &str, max_tokens: usize) -> (Vec<u32>, String, &'static str) {
    let ids = engine().encode_chat(&[Message::new("user", question)]).unwrap();
    let params =
        GenerationParams { sampling: SamplingParams::greedy(), max_tokens: Some(max_tokens), ..Default::default() };
    let done = engine().generate(&ids, &params, &mut |_| {}).unwrap();
    (done.token_ids, done.text, done.finish_reason.as_str())
}

#[tokio::test(flavor = "multi_thread")]
async fn logit_bias_stop_token_ids_and_min_tokens_change_the_answer() {
    let (_ctl, _w, gw) = one_worker_cluster().await;
    let url = format!("{}/v1/chat/completions", gw.url());
    let ask = |question: &str, extra: Value| {
        let body = chat_body(question, json!({"temperature": 0, "max_tokens": 40}), extra);
        let url = url.clone();
        async move {
            let (status, resp) = post(&url, &body).await;
            assert_eq!(status, 200, "{body}: {resp}");
            let choice = &resp["choices"][0];
            let text = choice["message"]["content"].as_str().unwrap().to_string();
            (
                text,
                choice["finish_reason"].as_str().unwrap().to_string(),
                resp["usage"]["completion_tokens"].as_u64().unwrap(),
            )
        }
    };
    let question = "Who wrote the play Hamlet?";
    let (ids, text, _) = greedy_ids(question, 40);
    assert_eq!(ask(question, json!({})).await.0, text, "the gateway answers as the engine does");

    // -100 on the greedy first token: the answer starts with another one.
    let (biased, _, _) = ask(question, json!({"logit_bias": {ids[0].to_string(): -100}})).await;
    let first = engine().tokenizer().decode(&ids[..1]).unwrap();
    assert!(!biased.starts_with(&first), "{first:?} is still first: {biased:?}");
    // A positive bias on another token puts it first (the answer to this prompt never starts
    // with a comma otherwise).
    let comma = engine().tokenizer().encode(",").unwrap()[0];
    let (pushed, _, _) = ask(question, json!({"logit_bias": {comma.to_string(): 100}})).await;
    assert!(pushed.starts_with(','), "{pushed:?}");

    // The second greedy token as a stop token: the answer is the first token alone.
    let (stopped, finish, tokens) = ask(question, json!({"stop_token_ids": [ids[1]]})).await;
    assert_eq!(
        (stopped.as_str(), finish.as_str(), tokens),
        (first.as_str(), "stop", 2),
        "the stop token is counted, not shown"
    );

    // A short answer that ends by EOS: min_tokens carries it on past that point.
    let short = "Answer with one word: what colour is the sky?";
    let (short_ids, _, why) = greedy_ids(short, 40);
    assert_eq!(why, "stop", "the short answer ends by itself: {short_ids:?}");
    let floor = short_ids.len() as u64 + 4;
    let (longer, finish, tokens) = ask(short, json!({"min_tokens": floor})).await;
    assert!(tokens >= floor, "{tokens} tokens < min_tokens {floor}: {longer:?}");
    assert!(finish == "stop" || tokens == 40, "{finish}");

    // A stop string kept in the answer, and left out by default.
    let (kept, finish, _) = ask(question, json!({"stop": "Shakespeare", "include_stop_str_in_output": true})).await;
    assert!(kept.ends_with("Shakespeare") && finish == "stop", "{kept:?}");
    let (cut, _, _) = ask(question, json!({"stop": "Shakespeare"})).await;
    assert_eq!(format!("{cut}Shakespeare"), kept);
    // top_k -1 is "off", as vLLM and FastChat send it.
    assert_eq!(ask(question, json!({"top_k": -1})).await.0, text);
}

#[tokio::test(flavor = "multi_thread")]
async fn tokenize_and_detokenize_round_trip_through_a_worker() {
    let ctl = controller("127.0.0.1:0", "5s");
    let _w = worker(&ctl, &[]);
    let gw = gateway(&ctl);
    wait_for_workers(&gw, 1, Duration::from_secs(120)).await;
    let (tokenize, detokenize) = (format!("{}/tokenize", gw.url()), format!("{}/detokenize", gw.url()));

    let text = "Who wrote the play Hamlet?";
    let (status, resp) = post(&tokenize, &json!({"model": MODEL, "prompt": text})).await;
    assert_eq!(status, 200, "{resp}");
    let ids: Vec<u32> = serde_json::from_value(resp["tokens"].clone()).unwrap();
    assert_eq!(ids, engine().tokenizer().encode(text).unwrap(), "the worker's own encoding");
    assert_eq!((resp["count"].as_u64(), resp["max_model_len"].as_u64()), (Some(ids.len() as u64), Some(8192)));
    let (status, resp) = post(&detokenize, &json!({"model": MODEL, "tokens": ids})).await;
    assert_eq!((status, resp["prompt"].as_str()), (200, Some(text)), "{resp}");

    // A conversation is counted as a chat completion would send it: template and all.
    let messages = json!([{"role": "user", "content": text}]);
    let (status, resp) = post(&tokenize, &json!({"model": MODEL, "messages": messages})).await;
    assert_eq!(status, 200, "{resp}");
    let chat_ids = engine().encode_chat(&[Message::new("user", text)]).unwrap();
    assert_eq!(resp["tokens"], json!(chat_ids));
    let (_, resp) = post(&detokenize, &json!({"model": MODEL, "tokens": chat_ids})).await;
    assert!(resp["prompt"].as_str().unwrap().contains("<|im_start|>user"), "special tokens written out: {resp}");

    for (url, body, want, param) in [
        (&tokenize, json!({"model": MODEL}), 400, "prompt"),
        (&tokenize, json!({"model": MODEL, "prompt": "a", "messages": messages}), 400, "prompt"),
        (&tokenize, json!({"model": MODEL, "messages": [{"role": "wizard", "content": "a"}]}), 400, "messages[0].role"),
        (&tokenize, json!({"model": "nope", "prompt": "a"}), 404, "model"),
        (&detokenize, json!({"model": MODEL, "tokens": [1, -1]}), 400, "tokens[1]"),
        (&detokenize, json!({"model": MODEL, "tokens": [4000000]}), 400, ""),
        (&detokenize, json!({"model": MODEL, "tokens": vec![1; 8193]}), 400, ""),
    ] {
        let (status, resp) = post(url, &body).await;
        assert_eq!(status, want, "{body}: {resp}");
        if !param.is_empty() {
            assert_eq!(resp["error"]["param"], param, "{body}: {resp}");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn constrained_answers_are_json_of_their_schema_or_match_their_regex() {
    let (_ctl, _w, gw) = one_worker_cluster().await;
    let url = format!("{}/v1/chat/completions", gw.url());
    let ask = |content: &str, extra: Value| chat_body(content, json!({"max_tokens": 300}), extra);
    let answer = |resp: &Value| {
        let choice = &resp["choices"][0];
        assert_eq!(choice["finish_reason"], "stop", "the constraint ends the answer: {resp}");
        choice["message"]["content"].as_str().unwrap().to_string()
    };

    let schema = json!({"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 30},
        "color": {"enum": ["black", "white", "orange"]},
        "toys": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 3}},
        "required": ["name", "age", "color", "toys"], "additionalProperties": false});
    let format = json!({"type": "json_schema", "json_schema": {"name": "cat", "schema": schema, "strict": true}});
    for seed in 0..3 {
        let body = ask("Describe a cat as JSON.", json!({"response_format": format, "seed": seed, "temperature": 1}));
        let (status, resp) = post(&url, &body).await;
        assert_eq!(status, 200, "{resp}");
        let text = answer(&resp);
        let cat: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text:?}"));
        let keys: std::collections::BTreeSet<&str> = cat.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(keys, ["age", "color", "name", "toys"].into(), "{text}");
        assert!(cat["name"].as_str().is_some_and(|n| n.chars().count() <= 20), "{text}");
        assert!(cat["age"].as_i64().is_some_and(|a| (0..=30).contains(&a)), "{text}");
        assert!(["black", "white", "orange"].contains(&cat["color"].as_str().unwrap()), "{text}");
        let toys = cat["toys"].as_array().unwrap();
        assert!(toys.len() <= 3 && toys.iter().all(|t| t.as_str().is_some_and(|t| t.chars().count() <= 10)), "{text}");
        // Streamed, the same seed gives the same JSON.
        let mut streaming = body.clone();
        streaming["stream"] = json!(true);
        assert_eq!(stream_text(&url, &streaming).await.0, text);
    }

    let (status, resp) = post(
        &url,
        &ask(
            "Who wrote Hamlet? Reply with a JSON object with one key, \"author\".",
            json!({"response_format": {"type": "json_object"}, "temperature": 0}),
        ),
    )
    .await;
    assert_eq!(status, 200, "{resp}");
    let text = answer(&resp);
    assert!(serde_json::from_str::<Value>(&text).is_ok_and(|v| v.is_object()), "{text:?}");

    let (status, resp) =
        post(&url, &ask("What is your phone number?", json!({"structured_outputs": {"regex": "[0-9]{3}-[0-9]{4}"}})))
            .await;
    assert_eq!(status, 200, "{resp}");
    let phone = answer(&resp);
    let digits: Vec<&str> = phone.split('-').collect();
    assert!(digits.len() == 2 && digits[0].len() == 3 && digits[1].len() == 4, "{phone:?}");
    assert!(digits.iter().all(|d| d.bytes().all(|b| b.is_ascii_digit())), "{phone:?}");
    // A complete constraint ends the answer even before min_tokens: it allows nothing more.
    let body = ask(
        "What is your phone number?",
        json!({"structured_outputs": {"regex": "[0-9]{3}-[0-9]{4}"}, "min_tokens": 30}),
    );
    let (status, resp) = post(&url, &body).await;
    assert_eq!(status, 200, "{resp}");
    assert_eq!(answer(&resp).len(), 8, "{resp}");
}
