//! `kvrelay serve` and `kvrelay proxy` as real processes on loopback: answers equal the
//! reference engine run in-process token for token, errors are OpenAI-style 4xx/5xx, chat
//! completions render a checkpoint's chat template, and a 1p1d flow through the proxy
//! shares KV through LMCache's local-disk tier.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use kvrelay_engine::{
    load_model, Engine, EngineConfig, LlamaConfig, Model, RequestOutput, SamplingParams, Tokenizer,
    TINY_RANDOM,
};
use serde_json::{json, Value};

const MAX_MODEL_LEN: usize = 1024;

/// A `kvrelay` process, killed when dropped.
struct Proc {
    child: Child,
    url: String,
    /// What it printed before it listened.
    startup: Vec<String>,
}

impl Proc {
    /// Starts `kvrelay <args>` and waits (bounded) until it prints its address.
    fn start(args: &[&str], envs: &[(&str, &str)]) -> Proc {
        let mut child = Command::new(env!("CARGO_BIN_EXE_kvrelay"))
            .args(args)
            .envs(envs.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start kvrelay");
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            // Keep draining so the child never blocks on a full pipe.
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[kvrelay] {line}");
                let _ = tx.send(line);
            }
        });
        let mut seen = Vec::new();
        let url = loop {
            match rx.recv_timeout(Duration::from_secs(120)) {
                Ok(line) => match line.split_once("listening on ") {
                    Some((_, url)) => break url.trim().to_string(),
                    None => seen.push(line),
                },
                Err(e) => {
                    let _ = child.kill();
                    panic!("kvrelay {args:?} never listened ({e}); it said {seen:?}");
                }
            }
        };
        Proc {
            child,
            url,
            startup: seen,
        }
    }

    fn serve(extra: &[&str], envs: &[(&str, &str)]) -> Proc {
        let max_model_len = MAX_MODEL_LEN.to_string();
        let mut args = vec!["serve", "--host", "127.0.0.1"];
        if !extra.contains(&"--model") {
            args.extend(["--model", TINY_RANDOM]);
        }
        if !extra.contains(&"--port") {
            args.extend(["--port", "0"]);
        }
        if !extra.contains(&"--max-model-len") {
            args.extend(["--max-model-len", &max_model_len]);
        }
        args.extend_from_slice(extra);
        Proc::start(&args, envs)
    }

    /// `kvrelay proxy` on loopback over one prefiller and one decoder port.
    fn proxy(prefiller_port: &str, decoder_port: &str, extra: &[&str]) -> Proc {
        let mut args = vec![
            "proxy",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--prefiller-host",
            "127.0.0.1",
            "--prefiller-port",
            prefiller_port,
            "--decoder-host",
            "127.0.0.1",
            "--decoder-port",
            decoder_port,
        ];
        args.extend_from_slice(extra);
        Proc::start(&args, &[])
    }

    fn port(&self) -> String {
        self.url
            .rsplit(':')
            .next()
            .expect("url has a port")
            .to_string()
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(300))
        .build()
}

/// POSTs JSON; returns the status and the JSON body, whatever the status.
fn post(url: &str, body: &Value) -> (u16, Value) {
    post_raw(url, &body.to_string())
}

fn post_raw(url: &str, body: &str) -> (u16, Value) {
    let response = match agent()
        .post(url)
        .set("Content-Type", "application/json")
        .send_string(body)
    {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("POST {url}: {e}"),
    };
    let status = response.status();
    let text = response.into_string().expect("body");
    (status, serde_json::from_str(&text).expect("a JSON body"))
}

fn get(url: &str) -> (u16, String) {
    let response = match agent().get(url).call() {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("GET {url}: {e}"),
    };
    (response.status(), response.into_string().expect("body"))
}

/// A streamed completion: its events' JSON, in order; the stream must end with `[DONE]`.
fn post_stream(url: &str, body: &Value) -> Vec<Value> {
    let response = agent()
        .post(url)
        .set("Content-Type", "application/json")
        .send_string(&body.to_string())
        .unwrap_or_else(|e| panic!("POST {url}: {e}"));
    assert_eq!(response.content_type(), "text/event-stream");
    let mut text = String::new();
    response
        .into_reader()
        .read_to_string(&mut text)
        .expect("stream body");
    let data: Vec<&str> = text
        .split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|e| e.strip_prefix("data: ").expect("an SSE data event"))
        .collect();
    assert_eq!(data.last(), Some(&"[DONE]"), "{text}");
    data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).expect("a JSON event"))
        .collect()
}

/// The token ids of a streamed completion, and its finish reason.
fn streamed_tokens(events: &[Value]) -> (Vec<u32>, String) {
    let mut tokens = Vec::new();
    let mut reason = None;
    for event in events {
        assert!(event.get("error").is_none(), "stream error: {event}");
        for choice in event["choices"].as_array().expect("choices") {
            tokens.extend(token_ids(&choice["token_ids"]));
            if let Some(r) = choice["finish_reason"].as_str() {
                reason = Some(r.to_string());
            }
        }
    }
    (tokens, reason.expect("a finish reason"))
}

fn token_ids(value: &Value) -> Vec<u32> {
    value
        .as_array()
        .expect("token ids")
        .iter()
        .map(|t| t.as_u64().expect("a token id") as u32)
        .collect()
}

/// What the reference engine generates in-process for each prompt.
fn expected_outputs(prompts: &[Vec<u32>], max_tokens: usize) -> Vec<RequestOutput> {
    let (model, _) = load_model(TINY_RANDOM, MAX_MODEL_LEN).expect("tiny-random");
    let config = EngineConfig {
        max_model_len: MAX_MODEL_LEN,
        ..EngineConfig::default()
    };
    let mut engine = Engine::new(model, config).expect("engine");
    engine
        .generate(prompts, SamplingParams::greedy(max_tokens))
        .expect("generate")
}

/// The token ids the reference engine generates in-process for each prompt.
fn expected(prompts: &[Vec<u32>], max_tokens: usize) -> Vec<Vec<u32>> {
    expected_outputs(prompts, max_tokens)
        .into_iter()
        .map(|o| o.output_token_ids)
        .collect()
}

fn text_prompt(i: usize) -> String {
    format!("Request {i}: explain the significance of KV cache in language models. ").repeat(3)
}

fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no metric {name} in\n{text}"))
}

fn error_message(body: &Value) -> &str {
    body["error"]["message"]
        .as_str()
        .expect("an OpenAI error body")
}

#[test]
fn completions_equal_the_engine_streaming_and_not() {
    let server = Proc::serve(&[], &[]);
    let url = format!("{}/v1/completions", server.url);
    let text = text_prompt(0);
    let text_ids = Tokenizer::Bytes.encode(&text).unwrap();
    let id_prompt: Vec<u32> = (0..40).map(|i| (i * 7 % 250) as u32).collect();
    let outputs = expected_outputs(&[text_ids.clone(), id_prompt.clone()], 12);
    let want: Vec<Vec<u32>> = outputs.iter().map(|o| o.output_token_ids.clone()).collect();

    let (status, body) = post(
        &url,
        &json!({"model": TINY_RANDOM, "prompt": text, "max_tokens": 12, "temperature": 0}),
    );
    assert_eq!(status, 200, "{body}");
    let choice = &body["choices"][0];
    assert_eq!(token_ids(&choice["token_ids"]), want[0]);
    assert_eq!(choice["text"], Tokenizer::Bytes.decode(&want[0]).unwrap());
    assert_eq!(choice["finish_reason"], "length");
    assert_eq!(body["usage"]["prompt_tokens"], text_ids.len());
    assert_eq!(body["usage"]["completion_tokens"], 12);
    assert_eq!(body["object"], "text_completion");

    // A whole answer carries the engine's digest of its logits.
    assert_eq!(body["logits_digest"], outputs[0].logits_digest);

    let (status, body) = post(&url, &json!({"prompt": id_prompt, "max_tokens": 12}));
    assert_eq!(status, 200, "{body}");
    assert_eq!(token_ids(&body["choices"][0]["token_ids"]), want[1]);
    assert_eq!(body["logits_digest"], outputs[1].logits_digest);
    assert_ne!(outputs[0].logits_digest, outputs[1].logits_digest);

    for (prompt, want) in [(json!(text), &want[0]), (json!(id_prompt), &want[1])] {
        let events = post_stream(
            &url,
            &json!({"prompt": prompt, "max_tokens": 12, "stream": true,
                    "stream_options": {"include_usage": true}}),
        );
        let (tokens, reason) = streamed_tokens(&events);
        assert_eq!(&tokens, want);
        assert_eq!(reason, "length");
        // One event per sampled token at least, then the usage chunk.
        assert!(events.len() > 12, "{events:?}");
        assert_eq!(events.last().unwrap()["usage"]["completion_tokens"], 12);
    }

    // kv_transfer_params is accepted and answered (null without a connector).
    let (status, body) = post(
        &url,
        &json!({"prompt": [256, 72], "max_tokens": 2, "kv_transfer_params": {"ret_first_tok": true}}),
    );
    assert_eq!(status, 200, "{body}");
    assert!(body.as_object().unwrap().contains_key("kv_transfer_params"));
}

/// One POST on a kept-alive connection (no `Connection: close`): the answer's status and
/// body, read by its Content-Length so that the connection stays usable.
fn post_kept_alive(
    reader: &mut BufReader<std::net::TcpStream>,
    body: &str,
) -> std::io::Result<(u16, String)> {
    let request = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: kvrelay\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    reader.get_mut().write_all(request.as_bytes())?;
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let status = line.split_whitespace().nth(1).and_then(|s| s.parse().ok());
    let mut length = 0;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 || header.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().unwrap_or(0);
            }
        }
    }
    let mut answer = vec![0; length];
    reader.read_exact(&mut answer)?;
    Ok((
        status.unwrap_or(0),
        String::from_utf8_lossy(&answer).into_owned(),
    ))
}

/// Many keep-alive clients connecting at once are all answered while every connection
/// stays open. tiny_http (the server before) queued some of them behind the pool threads
/// that the first connections held for their whole life, and their requests hung until
/// another client disconnected.
#[test]
fn keep_alive_clients_connecting_at_once_are_all_answered() {
    const CLIENTS: usize = 16;
    let server = Proc::serve(&[], &[]);
    let address = server.url.trim_start_matches("http://").to_string();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let (answers, answered) = mpsc::channel();
    let mut go_on = Vec::new();
    for i in 0..CLIENTS {
        let (answers, address) = (answers.clone(), address.clone());
        let (go, ready) = mpsc::channel::<()>();
        go_on.push(go);
        std::thread::spawn(move || {
            let stream = std::net::TcpStream::connect(&address).expect("connect");
            stream
                .set_read_timeout(Some(Duration::from_secs(60)))
                .unwrap();
            let mut reader = BufReader::new(stream);
            let body = json!({"prompt": [256, 72 + i], "max_tokens": 2}).to_string();
            for round in 0..2 {
                // Both answers come on this one connection, which stays open meanwhile.
                let answer = post_kept_alive(&mut reader, &body).map_err(|e| e.to_string());
                let _ = answers.send((round, answer));
                if round == 0 && ready.recv_timeout(Duration::from_secs(60)).is_err() {
                    return;
                }
            }
        });
    }
    for round in 0..2 {
        for _ in 0..CLIENTS {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let (r, answer) = answered.recv_timeout(left).unwrap_or_else(|_| {
                panic!("round {round}: not every kept-alive client was answered within 30 s")
            });
            assert_eq!(r, round);
            let (status, body) = answer.unwrap_or_else(|e| panic!("round {round}: {e}"));
            assert_eq!(status, 200, "{body}");
        }
        // Only once every client got its first answer do they send their second.
        for go in &go_on {
            let _ = go.send(());
        }
    }
}

#[test]
fn tokenize_health_models_and_metrics() {
    let server = Proc::serve(&[], &[]);
    assert_eq!(get(&format!("{}/health", server.url)).0, 200);

    let (status, body) = post(
        &format!("{}/tokenize", server.url),
        &json!({"prompt": "KV"}),
    );
    assert_eq!(status, 200);
    assert_eq!(body["tokens"], json!([256, 75, 86]));
    assert_eq!(body["count"], 3);
    assert_eq!(body["max_model_len"], MAX_MODEL_LEN);

    let (status, body) = post(
        &format!("{}/detokenize", server.url),
        &json!({"tokens": [75, 86]}),
    );
    assert_eq!((status, body["prompt"].as_str()), (200, Some("KV")));

    let (status, models) = get(&format!("{}/v1/models", server.url));
    assert_eq!(status, 200);
    let models: Value = serde_json::from_str(&models).unwrap();
    assert_eq!(models["data"][0]["id"], TINY_RANDOM);

    let prompts = [vec![256, 1, 2, 3], vec![256, 4, 5, 6, 7]];
    for prompt in &prompts {
        let (status, _) = post(
            &format!("{}/v1/completions", server.url),
            &json!({"prompt": prompt, "max_tokens": 5, "ignore_eos": true}),
        );
        assert_eq!(status, 200);
    }
    let (status, text) = get(&format!("{}/metrics", server.url));
    assert_eq!(status, 200);
    assert_eq!(metric(&text, "kvrelay_requests_finished_total"), 2);
    assert_eq!(metric(&text, "kvrelay_prompt_tokens_total"), 9);
    assert_eq!(metric(&text, "kvrelay_generation_tokens_total"), 10);
    assert_eq!(metric(&text, "kvrelay_connector_hit_tokens_total"), 0);
    assert_eq!(metric(&text, "kvrelay_requests_in_flight"), 0);
    assert!(text.contains("# TYPE kvrelay_connector_load_seconds histogram"));
    assert!(text.contains("kvrelay_connector_load_seconds_bucket{le=\"+Inf\"} 0"));
}

#[test]
fn bad_requests_get_openai_errors() {
    let server = Proc::serve(&["--max-model-len", "64"], &[]);
    let url = format!("{}/v1/completions", server.url);
    let long: Vec<u32> = vec![65; 80];
    let cases: Vec<(&str, String, u16, &str)> = vec![
        (
            "invalid JSON",
            "{\"prompt\": ".into(),
            400,
            "not valid JSON",
        ),
        ("not an object", "[1, 2]".into(), 400, "JSON object"),
        (
            "no prompt",
            json!({"max_tokens": 3}).to_string(),
            400,
            "`prompt` is required",
        ),
        (
            "empty prompt",
            json!({"prompt": []}).to_string(),
            400,
            "empty",
        ),
        (
            "bad prompt",
            json!({"prompt": [1, -2]}).to_string(),
            400,
            "token ids",
        ),
        (
            "batched",
            json!({"prompt": ["a", "b"]}).to_string(),
            400,
            "batched",
        ),
        (
            "temperature",
            json!({"prompt": "a", "temperature": 0.8}).to_string(),
            400,
            "temperature 0",
        ),
        (
            "max_tokens",
            json!({"prompt": "a", "max_tokens": 0}).to_string(),
            400,
            "max_tokens",
        ),
        (
            "max_tokens type",
            json!({"prompt": "a", "max_tokens": "9"}).to_string(),
            400,
            "max_tokens",
        ),
        (
            "stream type",
            json!({"prompt": "a", "stream": "yes"}).to_string(),
            400,
            "`stream`",
        ),
        (
            "too long",
            json!({"prompt": long}).to_string(),
            400,
            "maximum context length",
        ),
        (
            "too long with output",
            json!({"prompt": [1, 2], "max_tokens": 63}).to_string(),
            400,
            "maximum context length",
        ),
        (
            "vocabulary",
            json!({"prompt": [1, 999999]}).to_string(),
            400,
            "vocabulary",
        ),
        (
            "model",
            json!({"prompt": "a", "model": "gpt-4"}).to_string(),
            404,
            "does not exist",
        ),
    ];
    for (what, body, status, message) in cases {
        let (got, answer) = post_raw(&url, &body);
        assert_eq!(got, status, "{what}: {answer}");
        assert!(error_message(&answer).contains(message), "{what}: {answer}");
        assert_eq!(answer["error"]["code"], status, "{what}");
    }
    let (status, answer) = post(
        &format!("{}/v1/chat/completions", server.url),
        &json!({"messages": [{"role": "user", "content": "hi"}]}),
    );
    assert_eq!(status, 400);
    assert!(error_message(&answer).contains("chat template"));
    let (status, answer) = post(&format!("{}/nowhere", server.url), &json!({}));
    assert_eq!(status, 404, "{answer}");
    // The server still works after all of that.
    let (status, _) = post(&url, &json!({"prompt": "ok", "max_tokens": 2}));
    assert_eq!(status, 200);
    let (_, metrics) = get(&format!("{}/metrics", server.url));
    assert_eq!(metric(&metrics, "kvrelay_request_errors_total"), 1);
}

/// A Llama-3-style chat template: BOS, a header per message, an assistant header to
/// generate after, and a refusal of roles it does not know.
const LLAMA3_STYLE_TEMPLATE: &str = r#"{{- bos_token }}
{%- for message in messages %}
    {%- if message['role'] not in ['system', 'user', 'assistant'] %}
        {{- raise_exception('Unknown role: ' + message['role']) }}
    {%- endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"#;

/// The embedded model written as a checkpoint directory (no tokenizer.json: the byte
/// tokenizer) with `tokenizer_config` beside it.
fn checkpoint_with_tokenizer_config(tokenizer_config: &Value) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    Model::tiny_random(16)
        .weights()
        .save(&LlamaConfig::tiny_random(), dir.path())
        .unwrap();
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        tokenizer_config.to_string(),
    )
    .unwrap();
    dir
}

/// `kvrelay serve` over a checkpoint with [`LLAMA3_STYLE_TEMPLATE`].
fn chat_server() -> (tempfile::TempDir, Proc) {
    let dir = checkpoint_with_tokenizer_config(&json!({
        "chat_template": LLAMA3_STYLE_TEMPLATE,
        "bos_token": {"__type": "AddedToken", "content": "<|begin_of_text|>"},
        "eos_token": "<|eot_id|>",
    }));
    let model = dir.path().to_str().unwrap().to_string();
    let server = Proc::serve(&["--model", &model, "--served-model-name", "chat"], &[]);
    (dir, server)
}

fn chat_messages(user: Value) -> Value {
    json!([
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": user},
    ])
}

#[test]
fn chat_completions_render_the_template_and_equal_completions_of_the_prompt() {
    let (_dir, server) = chat_server();
    let chat_url = format!("{}/v1/chat/completions", server.url);
    let messages = chat_messages(json!("  What is a KV cache? "));

    // /tokenize renders the template as transformers would, and adds no second BOS.
    let rendered =
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>\
                    <|start_header_id|>user<|end_header_id|>\n\nWhat is a KV cache?<|eot_id|>\
                    <|start_header_id|>assistant<|end_header_id|>\n\n";
    let (status, body) = post(
        &format!("{}/tokenize", server.url),
        &json!({"messages": messages}),
    );
    assert_eq!(status, 200, "{body}");
    let prompt = token_ids(&body["tokens"]);
    assert_eq!(
        prompt,
        Tokenizer::Bytes
            .encode_without_special_tokens(rendered)
            .unwrap()
    );
    assert_eq!(body["count"], prompt.len());

    // The chat completion generates what a completion of the rendered prompt does.
    let (status, completion) = post(
        &format!("{}/v1/completions", server.url),
        &json!({"prompt": prompt, "max_tokens": 8, "ignore_eos": true}),
    );
    assert_eq!(status, 200, "{completion}");
    let want = token_ids(&completion["choices"][0]["token_ids"]);
    assert_eq!(want.len(), 8);
    let (status, chat) = post(
        &chat_url,
        &json!({"model": "chat", "messages": messages, "max_tokens": 8, "ignore_eos": true,
                "temperature": 0, "kv_transfer_params": {"ret_first_tok": true}}),
    );
    assert_eq!(status, 200, "{chat}");
    assert_eq!(chat["object"], "chat.completion");
    assert!(
        chat["id"].as_str().unwrap().starts_with("chatcmpl-"),
        "{chat}"
    );
    let choice = &chat["choices"][0];
    assert_eq!(token_ids(&choice["token_ids"]), want);
    assert_eq!(choice["message"]["role"], "assistant");
    assert_eq!(
        choice["message"]["content"],
        completion["choices"][0]["text"]
    );
    assert_eq!(choice["finish_reason"], "length");
    assert_eq!(chat["usage"]["prompt_tokens"], prompt.len());
    assert_eq!(chat["usage"]["completion_tokens"], 8);
    assert!(chat.as_object().unwrap().contains_key("kv_transfer_params"));

    // max_completion_tokens is the newer name of max_tokens, and wins over it.
    let (status, newer) = post(
        &chat_url,
        &json!({"messages": messages, "max_completion_tokens": 8, "max_tokens": 2,
                "ignore_eos": true}),
    );
    assert_eq!(status, 200, "{newer}");
    assert_eq!(token_ids(&newer["choices"][0]["token_ids"]), want);

    // Text parts are joined with newlines, as vLLM does: the same prompt, the same answer.
    let parts = chat_messages(json!([
        {"type": "text", "text": "  What is"},
        {"type": "text", "text": "a KV cache? "},
    ]));
    let joined = chat_messages(json!("  What is\na KV cache? "));
    let answers: Vec<(Value, Vec<u32>)> = [parts, joined]
        .iter()
        .map(|messages| {
            let (status, tokenized) = post(
                &format!("{}/tokenize", server.url),
                &json!({"messages": messages}),
            );
            assert_eq!(status, 200, "{tokenized}");
            let (status, body) = post(
                &chat_url,
                &json!({"messages": messages, "max_tokens": 4, "ignore_eos": true}),
            );
            assert_eq!(status, 200, "{body}");
            (
                tokenized["tokens"].clone(),
                token_ids(&body["choices"][0]["token_ids"]),
            )
        })
        .collect();
    assert_eq!(answers[0], answers[1]);

    // Streamed: the role first, then content deltas that add up to the same answer.
    let events = post_stream(
        &chat_url,
        &json!({"messages": messages, "max_tokens": 8, "ignore_eos": true, "stream": true,
                "stream_options": {"include_usage": true}}),
    );
    assert!(events
        .iter()
        .all(|e| e["object"] == "chat.completion.chunk"));
    assert_eq!(
        events[0]["choices"][0]["delta"],
        json!({"role": "assistant", "content": ""})
    );
    let (tokens, reason) = streamed_tokens(&events);
    assert_eq!(tokens, want);
    assert_eq!(reason, "length");
    let content: String = events
        .iter()
        .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(content, choice["message"]["content"].as_str().unwrap());
    let usage = &events.last().unwrap()["usage"];
    assert_eq!(usage["completion_tokens"], 8);
    assert_eq!(usage["prompt_tokens"], prompt.len());

    // Chat requests count in the same metrics as completions: 1 completion, 5 chats.
    let (_, metrics) = get(&format!("{}/metrics", server.url));
    assert_eq!(metric(&metrics, "kvrelay_requests_finished_total"), 6);
    assert_eq!(
        metric(&metrics, "kvrelay_generation_tokens_total"),
        8 + 8 + 8 + 4 + 4 + 8
    );
}

#[test]
fn chat_requests_the_template_refuses_or_that_are_malformed_get_400s() {
    let (_dir, server) = chat_server();
    let url = format!("{}/v1/chat/completions", server.url);
    let user = json!([{"role": "user", "content": "hi"}]);
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "raise_exception",
            json!({"messages": [{"role": "tool", "content": "42"}]}),
            "Unknown role: tool",
        ),
        (
            "no messages",
            json!({"max_tokens": 3}),
            "`messages` is required",
        ),
        (
            "empty messages",
            json!({"messages": []}),
            "`messages` is empty",
        ),
        (
            "messages type",
            json!({"messages": "hi"}),
            "`messages` must be",
        ),
        (
            "no role",
            json!({"messages": [{"content": "hi"}]}),
            "messages[0].role",
        ),
        (
            "image part",
            json!({"messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "x"}}]}]}),
            "only text content",
        ),
        (
            "temperature",
            json!({"messages": user, "temperature": 0.7}),
            "temperature 0",
        ),
        ("n", json!({"messages": user, "n": 2}), "`n`"),
        (
            "logprobs",
            json!({"messages": user, "logprobs": true}),
            "logprobs",
        ),
        ("stop", json!({"messages": user, "stop": ["\n"]}), "`stop`"),
        (
            "max_completion_tokens",
            json!({"messages": user, "max_completion_tokens": 0}),
            "`max_completion_tokens` must be a positive integer",
        ),
        (
            "stream type",
            json!({"messages": user, "stream": "yes"}),
            "`stream`",
        ),
        (
            "kv_transfer_params",
            json!({"messages": user, "kv_transfer_params": {"disagg_spec": {"req_id": 7}}}),
            "req_id",
        ),
        (
            "too long",
            json!({"messages": user, "max_tokens": MAX_MODEL_LEN}),
            "maximum context length",
        ),
    ];
    for (what, body, message) in cases {
        let (status, answer) = post(&url, &body);
        assert_eq!(status, 400, "{what}: {answer}");
        assert!(error_message(&answer).contains(message), "{what}: {answer}");
    }
    let (status, answer) = post(
        &format!("{}/tokenize", server.url),
        &json!({"messages": [{"role": "tool", "content": "42"}]}),
    );
    assert_eq!(status, 400, "{answer}");
    assert!(
        error_message(&answer).contains("Unknown role: tool"),
        "{answer}"
    );
    // `logprobs: false` is a chat request's default, not a request for logprobs.
    let (status, answer) = post(
        &url,
        &json!({"messages": user, "logprobs": false, "max_tokens": 2}),
    );
    assert_eq!(status, 200, "{answer}");
}

#[test]
fn a_model_without_a_chat_template_answers_chat_requests_400() {
    // A checkpoint whose tokenizer config has no template, and the embedded model.
    let dir = checkpoint_with_tokenizer_config(&json!({"bos_token": "<s>"}));
    let model = dir.path().to_str().unwrap().to_string();
    for server in [
        Proc::serve(&["--model", &model], &[]),
        Proc::serve(&[], &[]),
    ] {
        let messages = json!([{"role": "user", "content": "hi"}]);
        for path in ["/v1/chat/completions", "/tokenize"] {
            let (status, answer) = post(
                &format!("{}{path}", server.url),
                &json!({"messages": messages}),
            );
            assert_eq!(status, 400, "{path}: {answer}");
            assert!(
                error_message(&answer).contains("chat template"),
                "{path}: {answer}"
            );
        }
    }
}

#[test]
fn a_chat_template_that_does_not_compile_stops_serve_at_start() {
    let dir = checkpoint_with_tokenizer_config(&json!({
        "chat_template": "{% for message in messages %}{{ message['content'] }}",
    }));
    let output = Command::new(env!("CARGO_BIN_EXE_kvrelay"))
        .args(["serve", "--host", "127.0.0.1", "--port", "0", "--model"])
        .arg(dir.path())
        .output()
        .expect("run kvrelay serve");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("tokenizer_config.json") && stderr.contains("does not compile"),
        "{stderr}"
    );
}

#[test]
fn a_tensor_parallel_size_that_does_not_divide_the_kv_heads_stops_serve_at_start() {
    let output = Command::new(env!("CARGO_BIN_EXE_kvrelay"))
        .args(["serve", "--host", "127.0.0.1", "--port", "0"])
        .args(["--model", "tiny-random", "--tensor-parallel-size", "4"])
        .output()
        .expect("run kvrelay serve");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--tensor-parallel-size")
            && stderr.contains("tensor_parallel_size 4 does not divide the model's 2 KV heads"),
        "{stderr}"
    );
}

#[test]
fn a_full_queue_answers_503() {
    let server = Proc::serve(&["--max-pending-requests", "1"], &[]);
    let url = format!("{}/v1/completions", server.url);
    // The first request streams 900 tokens; once its first event arrived it holds the
    // only pending slot until it finishes.
    let response = agent()
        .post(&url)
        .send_string(
            &json!({"prompt": [256, 1], "max_tokens": 900, "ignore_eos": true, "stream": true})
                .to_string(),
        )
        .expect("first request");
    let mut reader = BufReader::new(response.into_reader());
    let mut first = String::new();
    reader.read_line(&mut first).expect("first event");
    assert!(first.starts_with("data: "), "{first}");
    let (status, body) = post(&url, &json!({"prompt": "a", "max_tokens": 2}));
    assert_eq!(status, 503, "{body}");
    assert!(error_message(&body).contains("pending"));
    let mut rest = String::new();
    reader
        .read_to_string(&mut rest)
        .expect("rest of the stream");
    assert!(rest.trim_end().ends_with("data: [DONE]"));
    let (status, body) = post(&url, &json!({"prompt": "a", "max_tokens": 2}));
    assert_eq!(status, 200, "{body}");
}

/// How the prefiller's KV reaches the decoder.
#[derive(Clone, Copy, Debug)]
enum Sharing {
    /// An LMCache local-disk tier both processes use.
    Disk,
    /// LMCache PD: the prefiller pushes KV into the decoder's PD buffer (this many bytes)
    /// over this `transfer_channel`, with this `pd_backend_mode`, and notifies the proxy.
    Pd(&'static str, u64, &'static str),
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A prefiller and a decoder sharing KV as `sharing` says, and a proxy over them.
struct Disagg {
    _dir: tempfile::TempDir,
    prefiller: Proc,
    decoder: Proc,
    proxy: Proc,
    decoder_yaml: String,
    prefiller_yaml: String,
    /// The decoder's PD init and alloc ports, as proxy flags.
    pd_ports: [String; 2],
}

/// The seed's decoder `--kv-transfer-config`.
const CONSUMER: &str = r#"{"kv_connector":"LMCacheAscendConnectorV1Dynamic","kv_role":"kv_consumer", "kv_connector_module_path":"lmcache_ascend.integration.vllm.lmcache_ascend_connector_v1","kv_connector_extra_config": {"discard_partial_chunks": false, "lmcache_rpc_port": "consumer1", "skip_last_n_tokens": 1}}"#;

/// The seed's prefiller `--kv-transfer-config`.
const PRODUCER: &str = r#"{"kv_connector":"LMCacheAscendConnectorV1Dynamic","kv_role":"kv_producer", "kv_connector_module_path":"lmcache_ascend.integration.vllm.lmcache_ascend_connector_v1","kv_connector_extra_config": {"discard_partial_chunks": false, "lmcache_rpc_port": "producer1"}}"#;

/// `kvrelay serve` as the seed starts it, with `kv_transfer_config` and the LMCache YAML
/// at `yaml`, plus `extra` flags.
fn seed_server(kv_transfer_config: &str, yaml: &str, extra: &[&str]) -> Proc {
    let mut flags = vec![
        "--enforce-eager",
        "--no-enable-prefix-caching",
        "--kv-transfer-config",
        kv_transfer_config,
    ];
    if !extra.contains(&"--block-size") {
        flags.extend(["--block-size", "16"]);
    }
    flags.extend_from_slice(extra);
    Proc::serve(
        &flags,
        &[("LMCACHE_CONFIG_FILE", yaml), ("PYTHONHASHSEED", "0")],
    )
}

impl Disagg {
    fn start(sharing: Sharing) -> Disagg {
        Disagg::start_with(sharing, &[])
    }

    /// [`Disagg::start`] with `serve_flags` for both servers.
    fn start_with(sharing: Sharing, serve_flags: &[&str]) -> Disagg {
        let dir = tempfile::tempdir().unwrap();
        let common = "chunk_size: 64\nlocal_cpu: false\npre_caching_hash_algorithm: sha256_cbor\nsave_unfull_chunk: true\n";
        let (init, alloc, notify) = (free_port(), free_port(), free_port());
        let yaml = |name: &str, pd_role: &str| {
            let tier = match sharing {
                Sharing::Disk => format!(
                    "local_disk: \"file://{}/\"\nmax_local_disk_size: 1\n",
                    dir.path().join("disk").display()
                ),
                Sharing::Pd(channel, buffer, mode) => format!(
                    "enable_pd: true\npd_role: {pd_role}\npd_buffer_size: {buffer}\npd_buffer_device: cpu\n\
                     pd_backend_mode: {mode}\n\
                     pd_peer_host: 127.0.0.1\npd_peer_init_port: [{init}]\npd_peer_alloc_port: [{alloc}]\n\
                     pd_proxy_host: 127.0.0.1\npd_proxy_port: {notify}\ntransfer_channel: {channel}\n"
                ),
            };
            let path = dir.path().join(name);
            std::fs::write(&path, format!("{common}{tier}")).unwrap();
            path.to_str().unwrap().to_string()
        };
        let (sender_yaml, receiver_yaml) = (
            yaml("prefiller.yaml", "sender"),
            yaml("decoder.yaml", "receiver"),
        );
        // The decoder first: its PD buffer must listen before the prefiller sends.
        let decoder = seed_server(CONSUMER, &receiver_yaml, serve_flags);
        let prefiller = seed_server(PRODUCER, &sender_yaml, serve_flags);
        let (init, alloc, notify) = (init.to_string(), alloc.to_string(), notify.to_string());
        let mut proxy_flags = vec![
            "--num-prefillers",
            "1",
            "--decoder-init-port",
            &init,
            "--decoder-alloc-port",
            &alloc,
            "--num-decoders",
            "1",
            "--timeout-sec",
            "30",
            "--connect-timeout-sec",
            "5",
        ];
        if let Sharing::Pd(..) = sharing {
            proxy_flags.extend(["--proxy-host", "127.0.0.1", "--proxy-port", &notify]);
        }
        let proxy = Proc::proxy(&prefiller.port(), &decoder.port(), &proxy_flags);
        Disagg {
            _dir: dir,
            prefiller,
            decoder,
            proxy,
            decoder_yaml: receiver_yaml,
            prefiller_yaml: sender_yaml,
            pd_ports: [init, alloc],
        }
    }

    /// Kills the decoder and starts it again on the same ports.
    fn restart_decoder(&mut self) {
        let port = self.decoder.port();
        self.decoder.kill();
        self.decoder = seed_server(CONSUMER, &self.decoder_yaml, &["--port", &port]);
    }

    /// Kills the prefiller and starts it again on the same port.
    fn restart_prefiller(&mut self) {
        let port = self.prefiller.port();
        self.prefiller.kill();
        self.prefiller = seed_server(PRODUCER, &self.prefiller_yaml, &["--port", &port]);
    }
}

#[test]
fn disaggregated_prefill_through_the_proxy_equals_colocated() {
    check_disaggregated(Sharing::Disk);
}

#[test]
fn pd_over_tcp_through_the_proxy_equals_colocated() {
    check_disaggregated(Sharing::Pd("tcp", 50_000_000, "async"));
}

#[test]
fn pd_over_shm_through_the_proxy_equals_colocated() {
    check_disaggregated(Sharing::Pd("shm", 50_000_000, "sync"));
}

#[test]
fn the_same_request_succeeds_once_a_killed_decoder_or_prefiller_is_back() {
    let mut pd = Disagg::start(Sharing::Pd("tcp", 50_000_000, "async"));
    let url = format!("{}/v1/completions", pd.proxy.url);
    let prompt = text_prompt(3);
    let want = expected(&[Tokenizer::Bytes.encode(&prompt).unwrap()], 6);
    let request = json!({"prompt": prompt, "max_tokens": 6});
    let (status, body) = post(&url, &request);
    assert_eq!(status, 200, "{body}");
    assert_eq!(token_ids(&body["choices"][0]["token_ids"]), want[0]);
    pd.decoder.kill();
    let (status, body) = post(&url, &request);
    assert_eq!(status, 502, "{body}");
    pd.restart_decoder();
    // The proxy found the decoder gone before prefilling, so the prefiller's sender still
    // holds its connection to the old decoder: it reconnects instead of failing on it.
    let (status, body) = post(&url, &request);
    assert_eq!(status, 200, "{body}");
    assert_eq!(token_ids(&body["choices"][0]["token_ids"]), want[0]);
    pd.prefiller.kill();
    let (status, body) = post(&url, &request);
    assert_eq!(status, 502, "{body}");
    assert!(error_message(&body).contains("prefiller"), "{body}");
    pd.restart_prefiller();
    let (status, body) = post(&url, &request);
    assert_eq!(status, 200, "{body}");
    assert_eq!(token_ids(&body["choices"][0]["token_ids"]), want[0]);
    // Both requests since the decoder came back loaded the prompt's whole chunks.
    let (_, metrics) = get(&format!("{}/metrics", pd.decoder.url));
    let prompt_tokens = Tokenizer::Bytes.encode(&prompt).unwrap().len();
    assert_eq!(
        metric(&metrics, "kvrelay_connector_hit_tokens_total"),
        2 * ((prompt_tokens as u64 - 1) / 64 * 64),
        "{metrics}"
    );
    // 64-token chunks of the tiny model are 64 KiB pages.
    assert_eq!(
        metric(&metrics, "kvrelay_pd_buffer_pages"),
        50_000_000 / (64 * 1024)
    );
}

/// One prefiller, two decoders on one host (their own PD ports): the prefiller's config
/// names no PD peer, so each request's KV can only reach a decoder through the receiver the
/// proxy put in its `disagg_spec`, and it must be the decoder the proxy then calls. The
/// second decoder pages its KV in another block size and layout than the prefiller.
#[test]
fn pd_kv_goes_to_the_decoder_the_proxy_picked() {
    let dir = tempfile::tempdir().unwrap();
    let notify = free_port().to_string();
    let yaml = |name: &str, role: &str| {
        let path = dir.path().join(name);
        let text = format!(
            "chunk_size: 64\nlocal_cpu: false\npre_caching_hash_algorithm: sha256_cbor\n\
             save_unfull_chunk: true\nenable_pd: true\npd_buffer_size: 50000000\n\
             pd_buffer_device: cpu\ntransfer_channel: tcp\npd_proxy_host: 127.0.0.1\n\
             pd_proxy_port: {notify}\n{role}"
        );
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_string()
    };
    let ports: Vec<(u16, u16)> = (0..2).map(|_| (free_port(), free_port())).collect();
    let decoders: Vec<Proc> = ports
        .iter()
        .enumerate()
        .map(|(i, (init, alloc))| {
            let role = format!(
                "pd_role: receiver\npd_peer_host: 127.0.0.1\npd_peer_init_port: [{init}]\npd_peer_alloc_port: [{alloc}]\n"
            );
            let paging: &[&str] = match i {
                0 => &[],
                _ => &["--block-size", "32", "--layout", "flash_infer_hnd"],
            };
            seed_server(CONSUMER, &yaml(&format!("decoder{i}.yaml"), &role), paging)
        })
        .collect();
    let prefiller = seed_server(PRODUCER, &yaml("prefiller.yaml", "pd_role: sender\n"), &[]);
    let list = |pick: fn(&(u16, u16)) -> u16| {
        ports
            .iter()
            .map(|p| pick(p).to_string())
            .collect::<Vec<_>>()
            .join(",")
    };
    let (init, alloc) = (list(|p| p.0), list(|p| p.1));
    let decoder_ports = format!("{},{}", decoders[0].port(), decoders[1].port());
    let proxy = Proc::proxy(
        &prefiller.port(),
        &decoder_ports,
        &[
            "--num-decoders",
            "2",
            "--decoder-tp-size",
            "1",
            "--decoder-init-port",
            &init,
            "--decoder-alloc-port",
            &alloc,
            "--proxy-host",
            "127.0.0.1",
            "--proxy-port",
            &notify,
            "--timeout-sec",
            "30",
        ],
    );
    let url = format!("{}/v1/completions", proxy.url);
    let prompts: Vec<String> = (0..4).map(|i| text_prompt(i).repeat(2)).collect();
    let ids: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| Tokenizer::Bytes.encode(p).unwrap())
        .collect();
    let want = expected(&ids, 6);
    // One at a time, so round-robin gives requests 0 and 2 to decoder 0, 1 and 3 to 1.
    for (prompt, want) in prompts.iter().zip(&want) {
        let (status, body) = post(&url, &json!({"prompt": prompt, "max_tokens": 6}));
        assert_eq!(status, 200, "{body}");
        assert_eq!(&token_ids(&body["choices"][0]["token_ids"]), want);
    }
    let full_chunks = |p: &Vec<u32>| ((p.len() - 1) / 64 * 64) as u64;
    for (d, decoder) in decoders.iter().enumerate() {
        let (_, metrics) = get(&format!("{}/metrics", decoder.url));
        assert_eq!(
            metric(&metrics, "kvrelay_connector_hit_tokens_total"),
            full_chunks(&ids[d]) + full_chunks(&ids[d + 2]),
            "decoder {d}: {metrics}"
        );
    }
    // A disagg_spec naming a receiver only in part is the client's error.
    let prefill_url = format!("{}/v1/completions", prefiller.url);
    let (status, body) = post(
        &prefill_url,
        &json!({"prompt": "a", "kv_transfer_params": {"disagg_spec": {"req_id": "x", "receiver_host": "127.0.0.1"}}}),
    );
    assert_eq!(status, 400, "{body}");
    assert!(
        error_message(&body).contains("receiver_init_port"),
        "{body}"
    );
}

/// A chat request through the proxy: both servers render the same template, so the
/// decoder loads the prompt the prefiller computed and answers as one server would.
#[test]
fn pd_chat_through_the_proxy_equals_one_server() {
    let (dir, colocated) = chat_server();
    let model = dir.path().to_str().unwrap();
    let pd = Disagg::start_with(
        Sharing::Pd("tcp", 50_000_000, "async"),
        &["--model", model, "--served-model-name", "chat"],
    );
    let messages = chat_messages(json!(text_prompt(5)));
    let request = json!({"messages": messages, "max_tokens": 8});
    let (status, want) = post(&format!("{}/v1/chat/completions", colocated.url), &request);
    assert_eq!(status, 200, "{want}");
    let url = format!("{}/v1/chat/completions", pd.proxy.url);
    let (status, got) = post(&url, &request);
    assert_eq!(status, 200, "{got}");
    assert_eq!(got["object"], "chat.completion");
    assert_eq!(
        got["choices"][0]["token_ids"],
        want["choices"][0]["token_ids"]
    );
    assert_eq!(
        got["choices"][0]["message"]["content"],
        want["choices"][0]["message"]["content"]
    );
    let mut streamed = request.clone();
    streamed["stream"] = json!(true);
    let events = post_stream(&url, &streamed);
    let content: String = events
        .iter()
        .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(
        Some(content.as_str()),
        want["choices"][0]["message"]["content"].as_str()
    );
    let (_, metrics) = get(&format!("{}/metrics", pd.decoder.url));
    let prompt_tokens = want["usage"]["prompt_tokens"].as_u64().unwrap();
    assert_eq!(
        metric(&metrics, "kvrelay_connector_hit_tokens_total"),
        2 * ((prompt_tokens - 1) / 64 * 64),
        "{metrics}"
    );
}

#[test]
fn a_pd_buffer_smaller_than_the_request_is_a_clear_error_not_a_hang() {
    // Sync: the prefiller's own answer fails. Async: its sender thread tells the proxy.
    // Either way a 502 with the reason, not the 504 of the proxy's 30 s timeout.
    for mode in ["sync", "async"] {
        // Two 64-token pages; the prompt needs more.
        let pd = Disagg::start(Sharing::Pd("tcp", 2 * 64 * 1024, mode));
        let url = format!("{}/v1/completions", pd.proxy.url);
        let prompt = text_prompt(0).repeat(4);
        assert!(prompt.len() > 3 * 64);
        let (status, body) = post(&url, &json!({"prompt": prompt, "max_tokens": 4}));
        assert_eq!(status, 502, "{mode}: {body}");
        assert!(error_message(&body).contains("PD buffer"), "{mode}: {body}");
        // A request that fits still goes through.
        let (status, body) = post(&url, &json!({"prompt": "short", "max_tokens": 4}));
        assert_eq!(status, 200, "{mode}: {body}");
    }
}

fn check_disaggregated(sharing: Sharing) {
    let mut pd = Disagg::start(sharing);
    let url = format!("{}/v1/completions", pd.proxy.url);
    let prompts: Vec<String> = (0..34).map(text_prompt).collect();
    let ids: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| Tokenizer::Bytes.encode(p).unwrap())
        .collect();
    let want = expected(&ids, 10);

    let (status, body) = post(&url, &json!({"prompt": prompts[0], "max_tokens": 10}));
    assert_eq!(status, 200, "{body}");
    assert_eq!(token_ids(&body["choices"][0]["token_ids"]), want[0]);
    let events = post_stream(
        &url,
        &json!({"prompt": prompts[1], "max_tokens": 10, "stream": true}),
    );
    assert_eq!(streamed_tokens(&events).0, want[1]);

    // The decoder loaded the prompts' whole chunks instead of computing them.
    let (_, metrics) = get(&format!("{}/metrics", pd.decoder.url));
    let hits = metric(&metrics, "kvrelay_connector_hit_tokens_total");
    let full_chunks = |p: &Vec<u32>| ((p.len() - 1) / 64 * 64) as u64;
    assert_eq!(
        hits,
        full_chunks(&ids[0]) + full_chunks(&ids[1]),
        "{metrics}"
    );
    assert!(metric(&metrics, "kvrelay_connector_loaded_bytes_total") > 0);
    let (_, metrics) = get(&format!("{}/metrics", pd.prefiller.url));
    assert!(metric(&metrics, "kvrelay_connector_saved_bytes_total") > 0);
    // The prefiller generated one token per request.
    assert_eq!(metric(&metrics, "kvrelay_generation_tokens_total"), 2);
    // LMCache's own proxy asks the prefiller for that token in kv_transfer_params.
    let (status, body) = post(
        &format!("{}/v1/completions", pd.prefiller.url),
        &json!({"prompt": prompts[0], "max_tokens": 1, "kv_transfer_params": {"ret_first_tok": true}}),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["kv_transfer_params"]["first_tok"],
        json!(want[0][0]),
        "{body}"
    );

    // 32 concurrent requests, streamed and not, all finish with their own tokens.
    std::thread::scope(|s| {
        let handles: Vec<_> = (2..prompts.len())
            .map(|i| {
                let (url, prompt) = (&url, &prompts[i]);
                s.spawn(move || {
                    let stream = i % 2 == 0;
                    let request = json!({"prompt": prompt, "max_tokens": 10, "stream": stream});
                    if stream {
                        streamed_tokens(&post_stream(url, &request)).0
                    } else {
                        let (status, body) = post(url, &request);
                        assert_eq!(status, 200, "{body}");
                        token_ids(&body["choices"][0]["token_ids"])
                    }
                })
            })
            .collect();
        for (i, handle) in (2..).zip(handles) {
            assert_eq!(handle.join().unwrap(), want[i], "request {i}");
        }
    });

    // Bad requests come back as the servers' own 400s.
    let (status, body) = post(&url, &json!({"prompt": "a", "temperature": 1.0}));
    assert_eq!(status, 400, "{body}");
    assert!(error_message(&body).contains("temperature"));

    // Without a decoder the proxy answers 502 instead of waiting.
    pd.decoder.kill();
    for stream in [false, true] {
        let (status, body) = post(
            &url,
            &json!({"prompt": prompts[0], "max_tokens": 4, "stream": stream}),
        );
        assert_eq!(status, 502, "{body}");
        assert!(error_message(&body).contains("decoder"), "{body}");
    }
    // Without a prefiller, too (the decoder back: a dead decoder is found before the
    // prefill).
    pd.restart_decoder();
    pd.prefiller.kill();
    let (status, body) = post(&url, &json!({"prompt": prompts[0], "max_tokens": 4}));
    assert_eq!(status, 502, "{body}");
    assert!(error_message(&body).contains("prefiller"), "{body}");
}

#[test]
fn a_silent_upstream_gets_the_client_a_504() {
    // Connections to it complete (the kernel's backlog) but nothing ever answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port().to_string();
    let proxy = Proc::proxy(&port, &port, &["--timeout-sec", "1"]);
    let (status, body) = post(
        &format!("{}/v1/completions", proxy.url),
        &json!({"prompt": "a", "max_tokens": 2}),
    );
    assert_eq!(status, 504, "{body}");
    assert!(error_message(&body).contains("timed out"), "{body}");
}

/// POSTs JSON; returns the status, the `Retry-After` header and the JSON body.
fn post_with_retry_after(url: &str, body: &Value) -> (u16, Option<String>, Value) {
    let response = match agent()
        .post(url)
        .set("Content-Type", "application/json")
        .send_string(&body.to_string())
    {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("POST {url}: {e}"),
    };
    let retry_after = response.header("Retry-After").map(str::to_string);
    let status = response.status();
    let text = response.into_string().expect("body");
    (
        status,
        retry_after,
        serde_json::from_str(&text).expect("a JSON body"),
    )
}

/// A stand-in upstream on loopback: `answer` gets each request's method, path and JSON
/// body (null when none) and says the status and JSON to answer. It speaks just enough
/// HTTP/1.1 for the proxy's client: one request per connection, sized by Content-Length.
fn fake_upstream(
    answer: impl Fn(&str, &str, Value) -> (u16, Value) + Send + 'static,
) -> (String, String) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a fake upstream");
    let port = listener.local_addr().expect("its address").port();
    std::thread::spawn(move || {
        for stream in listener.incoming().map_while(Result::ok) {
            let mut reader = BufReader::new(stream);
            let mut request_line = String::new();
            if reader.read_line(&mut request_line).is_err() {
                continue;
            }
            let mut length = 0;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line.trim().is_empty() {
                    break;
                }
                if let Some((name, value)) = line.split_once(':') {
                    if name.eq_ignore_ascii_case("content-length") {
                        length = value.trim().parse().unwrap_or(0);
                    }
                }
            }
            let mut body = vec![0u8; length];
            if reader.read_exact(&mut body).is_err() {
                continue;
            }
            let mut words = request_line.split_whitespace();
            let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
            let body = serde_json::from_slice(&body).unwrap_or(Value::Null);
            let (status, reply) = answer(method, path, body);
            let reply = reply.to_string();
            let _ = write!(
                reader.get_mut(),
                "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{reply}",
                reply.len()
            );
        }
    });
    (format!("http://127.0.0.1:{port}"), port.to_string())
}

/// A fake prefiller: it answers every prefill 200 and hands its PD request id to the
/// test.
fn fake_prefiller() -> (String, mpsc::Receiver<String>) {
    let (ids, prefilled) = mpsc::channel();
    let ids = std::sync::Mutex::new(ids);
    let (_, port) = fake_upstream(move |_, _, body| {
        let id = body["kv_transfer_params"]["disagg_spec"]["req_id"]
            .as_str()
            .expect("a prefill names its PD request")
            .to_string();
        let _ = ids.lock().unwrap().send(id);
        (200, json!({"choices": [{"text": "x"}]}))
    });
    (port, prefilled)
}

/// A KV-ready notification (unauthenticated: no secret) for `request_id` from `rank`,
/// failed with `failure` when not empty.
fn notification(request_id: &str, rank: u32, failure: &str) -> Vec<u8> {
    kvrelay::transfer::frame::Message::Notify {
        request_id: request_id.into(),
        rank,
        failure: failure.into(),
        mac: [0; 32],
    }
    .encode()
}

/// The proxy takes a notification only for a request it issued and still waits on, from a
/// rank of the decoder, once per rank; a flood of made-up ids changes nothing for real
/// requests, and no error names the PD request id.
#[test]
fn kv_ready_notifications_count_only_for_issued_requests_and_each_rank_once() {
    use std::io::Write;
    let (prefiller_port, prefilled) = fake_prefiller();
    let (decoded, decodes) = mpsc::channel();
    let decoded = std::sync::Mutex::new(decoded);
    let (_, decoder_port) = fake_upstream(move |method, path, body| match (method, path) {
        ("GET", "/load") => (200, json!({"in_flight": 0, "max_pending": 8})),
        _ => {
            let _ = decoded
                .lock()
                .unwrap()
                .send(body["kv_transfer_params"].clone());
            (
                200,
                json!({"id": "cmpl-1", "choices": [{"text": "decoded"}]}),
            )
        }
    });
    let notify_port = free_port();
    let proxy = Proc::proxy(
        &prefiller_port,
        &decoder_port,
        &[
            // Two decoder ranks (nothing listens there: the fake prefiller sends no KV).
            "--decoder-init-port",
            "7301,7302",
            "--decoder-alloc-port",
            "7401,7402",
            "--proxy-host",
            "127.0.0.1",
            "--proxy-port",
            &notify_port.to_string(),
            "--timeout-sec",
            "60",
        ],
    );
    let url = format!("{}/v1/completions", proxy.url);
    let complete = |prompt: &str| {
        let url = url.clone();
        let body = json!({"prompt": prompt, "max_tokens": 3});
        std::thread::spawn(move || post(&url, &body))
    };
    let next_id = || {
        prefilled
            .recv_timeout(Duration::from_secs(60))
            .expect("a prefill")
    };
    let first = complete("first");
    let first_id = next_id();
    let second = complete("second");
    let second_id = next_id();
    assert_ne!(first_id, second_id);
    // 128 random bits, not a counter.
    let random = first_id
        .strip_prefix("kvrelay-proxy-")
        .expect("the proxy's id");
    assert_eq!(random.len(), 32, "{first_id}");
    assert!(random.chars().all(|c| c.is_ascii_hexdigit()), "{first_id}");

    // One connection, read in order: a flood of made-up ids (more than the old board
    // held), ids the proxy never issued, a rank the decoder does not have, a replayed
    // rank (ready, then failed), a failure from a rank out of range; then the second
    // request's two ranks, so that once it is answered all the rest was read.
    let mut frames = Vec::new();
    for i in 0..70_000 {
        frames.extend(notification(&format!("made-up-{i}"), 0, ""));
    }
    frames.extend(notification(
        "kvrelay-proxy-00000000000000000000000000000000",
        0,
        "",
    ));
    frames.extend(notification(&first_id, 99, ""));
    frames.extend(notification(&first_id, 0, ""));
    frames.extend(notification(&first_id, 0, ""));
    frames.extend(notification(&first_id, 0, "forged: replayed rank"));
    frames.extend(notification(&first_id, 2, "forged: no such rank"));
    frames.extend(notification(&second_id, 1, ""));
    frames.extend(notification(&second_id, 0, ""));
    let mut sender = std::net::TcpStream::connect(("127.0.0.1", notify_port)).unwrap();
    sender.write_all(&frames).unwrap();
    let (status, body) = second.join().unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        decodes.recv_timeout(Duration::from_secs(5)).unwrap(),
        json!({"disagg_spec": {"req_id": second_id}}),
        "the decoder's engine request carries the PD id, and nothing else of the prefill's"
    );
    // The first request has one rank ready: no decode yet, and no failure.
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !first.is_finished(),
        "a replayed or foreign rank made it ready or failed"
    );
    assert!(decodes.try_recv().is_err());
    sender.write_all(&notification(&first_id, 1, "")).unwrap();
    let (status, body) = first.join().unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["choices"][0]["text"], "decoded");
    assert_eq!(
        decodes.recv_timeout(Duration::from_secs(5)).unwrap()["disagg_spec"]["req_id"],
        json!(first_id)
    );

    // A failure from a rank that has not reported fails the request at once, with a
    // message that does not name its id.
    let third = complete("third");
    let third_id = next_id();
    sender
        .write_all(&notification(
            &third_id,
            1,
            &format!("no pages for {third_id}"),
        ))
        .unwrap();
    let (status, body) = third.join().unwrap();
    assert_eq!(status, 502, "{body}");
    let message = error_message(&body);
    assert!(message.contains("KV"), "{body}");
    assert!(!message.contains(&third_id), "{body}");
    assert!(!message.contains("kvrelay-proxy-"), "{body}");
}

/// A full decoder costs no prefill: the proxy asks its `GET /load` first and answers 503
/// with `Retry-After`, as the decoder itself does. A decoder that only says so when
/// called (no `/load`, as vLLM) gets its 503 passed through, not turned into a 502.
#[test]
fn a_full_decoder_is_a_503_with_retry_after_and_no_prefill() {
    let prefiller = Proc::serve(&[], &[]);
    let decoder = Proc::serve(&["--max-pending-requests", "1"], &[]);
    let proxy = Proc::proxy(&prefiller.port(), &decoder.port(), &[]);
    // A long stream holds the decoder's only slot.
    let response = agent()
        .post(&format!("{}/v1/completions", decoder.url))
        .send_string(
            &json!({"prompt": [256, 1], "max_tokens": 900, "ignore_eos": true, "stream": true})
                .to_string(),
        )
        .expect("the long request");
    let mut reader = BufReader::new(response.into_reader());
    let mut first = String::new();
    reader.read_line(&mut first).expect("first event");
    let (status, load) = get(&format!("{}/load", decoder.url));
    assert_eq!(status, 200, "{load}");
    let load: Value = serde_json::from_str(&load).unwrap();
    assert_eq!(load, json!({"in_flight": 1, "max_pending": 1}));
    // Only PD request ids can be aborted from outside: not the stream's own id.
    let (status, body) = post(
        &format!("{}/abort_requests", decoder.url),
        &json!({"request_ids": ["cmpl-0", "cmpl-1"]}),
    );
    assert_eq!((status, &body), (200, &json!({"aborted": []})));

    let request = json!({"prompt": "a", "max_tokens": 2});
    let (status, retry_after, body) =
        post_with_retry_after(&format!("{}/v1/completions", decoder.url), &request);
    assert_eq!(status, 503, "{body}");
    assert_eq!(retry_after.as_deref(), Some("1"));
    let (status, retry_after, body) =
        post_with_retry_after(&format!("{}/v1/completions", proxy.url), &request);
    assert_eq!(status, 503, "{body}");
    assert_eq!(retry_after.as_deref(), Some("1"));
    assert!(error_message(&body).contains("decoder is full"), "{body}");
    let (_, metrics) = get(&format!("{}/metrics", prefiller.url));
    for counter in [
        "kvrelay_requests_finished_total",
        "kvrelay_request_errors_total",
        "kvrelay_requests_rejected_total",
        "kvrelay_prompt_tokens_total",
    ] {
        assert_eq!(metric(&metrics, counter), 0, "{counter}: {metrics}");
    }
    // The stream was not aborted.
    let mut rest = String::new();
    reader
        .read_to_string(&mut rest)
        .expect("rest of the stream");
    assert!(rest.trim_end().ends_with("data: [DONE]"));
    assert!(!rest.contains("error"), "{rest}");

    let (_, busy_port) = fake_upstream(|_, path, _| match path {
        "/load" => (404, json!({"error": "no route"})),
        _ => (503, json!({"error": {"message": "no free slot"}})),
    });
    let proxy = Proc::proxy(&prefiller.port(), &busy_port, &[]);
    let (status, retry_after, body) =
        post_with_retry_after(&format!("{}/v1/completions", proxy.url), &request);
    assert_eq!(status, 503, "{body}");
    assert_eq!(retry_after.as_deref(), Some("1"));
    assert_eq!(error_message(&body), "no free slot");
}

/// Polls `server`'s metric `name` (up to 10 s) until `wanted` holds; returns its value.
fn wait_for_metric(server: &Proc, name: &str, wanted: impl Fn(u64) -> bool) -> u64 {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_, metrics) = get(&format!("{}/metrics", server.url));
        let value = metric(&metrics, name);
        if wanted(value) {
            return value;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{name} stayed at {value}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A request given up on stops costing the decoder: a proxy timeout while waiting for
/// the KV frees the pages the prefiller pushed, a proxy timeout while decoding or a client
/// that leaves a stream aborts the engine request, and a PD request the decoder refuses
/// frees its pages at once (not after the buffer's 300 s TTL).
#[test]
fn an_abandoned_pd_request_frees_engine_time_and_pd_pages() {
    // Decodes this long outlast the proxy's 2 s on any machine (700 tokens took 1.6 s on an
    // idle one), so only an abort can end them early.
    const LONG_DECODE: u64 = 15_000;
    let max_model_len = (LONG_DECODE + 1_024).to_string();
    // Sync sends: the KV is in the decoder's buffer when the prefiller answers.
    let pd = Disagg::start_with(
        Sharing::Pd("tcp", 50_000_000, "sync"),
        &["--max-model-len", &max_model_len],
    );
    let [init, alloc] = &pd.pd_ports;
    let short_proxy = |notifications: Option<&str>| {
        let mut flags = vec![
            "--decoder-init-port",
            init,
            "--decoder-alloc-port",
            alloc,
            "--timeout-sec",
            "2",
        ];
        if let Some(port) = notifications {
            flags.extend(["--proxy-host", "127.0.0.1", "--proxy-port", port]);
        }
        Proc::proxy(&pd.prefiller.port(), &pd.decoder.port(), &flags)
    };
    let used_pages = "kvrelay_pd_buffer_used_pages";
    let prompt = text_prompt(7);

    // Its senders notify the first proxy, so this one never hears the KV is ready.
    let unnotified = short_proxy(Some(&free_port().to_string()));
    let url = format!("{}/v1/completions", unnotified.url);
    let request = json!({"prompt": prompt, "max_tokens": 4});
    let waiting = std::thread::spawn(move || post(&url, &request));
    wait_for_metric(&pd.decoder, used_pages, |pages| pages > 0);
    let (status, body) = waiting.join().unwrap();
    assert_eq!(status, 504, "{body}");
    assert!(!error_message(&body).contains("kvrelay-proxy-"), "{body}");
    wait_for_metric(&pd.decoder, used_pages, |pages| pages == 0);

    // A decode longer than the proxy waits: the decoder's request is aborted.
    let impatient = short_proxy(None);
    let (status, body) = post(
        &format!("{}/v1/completions", impatient.url),
        &json!({"prompt": prompt, "max_tokens": LONG_DECODE, "ignore_eos": true}),
    );
    assert_eq!(status, 504, "{body}");
    wait_for_metric(&pd.decoder, "kvrelay_requests_in_flight", |n| n == 0);
    let generated = wait_for_metric(&pd.decoder, "kvrelay_generation_tokens_total", |_| true);
    assert!(
        generated < LONG_DECODE,
        "the decode ran to the end: {generated} tokens"
    );
    assert_eq!(wait_for_metric(&pd.decoder, used_pages, |_| true), 0);

    // A client that leaves a stream: the proxy and the decoder both stop.
    let response = agent()
        .post(&format!("{}/v1/completions", pd.proxy.url))
        .send_string(
            &json!({"prompt": prompt, "max_tokens": LONG_DECODE, "ignore_eos": true, "stream": true})
                .to_string(),
        )
        .expect("the stream");
    let mut reader = BufReader::new(response.into_reader());
    let mut first = String::new();
    reader.read_line(&mut first).expect("first event");
    assert!(first.starts_with("data: "), "{first}");
    drop(reader);
    wait_for_metric(&pd.decoder, "kvrelay_requests_in_flight", |n| n == 0);
    let streamed = wait_for_metric(&pd.decoder, "kvrelay_generation_tokens_total", |_| true);
    assert!(
        streamed - generated < LONG_DECODE,
        "the stream ran to the end: {} tokens",
        streamed - generated
    );
    assert_eq!(wait_for_metric(&pd.decoder, used_pages, |_| true), 0);

    // KV pushed for a PD request the decoder then refuses (here: a sampling option it does
    // not have) is freed with the refusal.
    let disagg_spec = json!({
        "req_id": "refused-pd-request",
        "receiver_host": "127.0.0.1",
        "receiver_init_port": [init.parse::<u16>().unwrap()],
        "receiver_alloc_port": [alloc.parse::<u16>().unwrap()],
    });
    let (status, body) = post(
        &format!("{}/v1/completions", pd.prefiller.url),
        &json!({"prompt": prompt, "max_tokens": 1, "kv_transfer_params": {"disagg_spec": disagg_spec}}),
    );
    assert_eq!(status, 200, "{body}");
    assert!(wait_for_metric(&pd.decoder, used_pages, |_| true) > 0);
    let (status, body) = post(
        &format!("{}/v1/completions", pd.decoder.url),
        &json!({"prompt": prompt, "top_p": 0.5,
                "kv_transfer_params": {"disagg_spec": {"req_id": "refused-pd-request"}}}),
    );
    assert_eq!(status, 400, "{body}");
    assert!(error_message(&body).contains("top_p"), "{body}");
    wait_for_metric(&pd.decoder, used_pages, |pages| pages == 0);
}

/// Through the proxy a client gets what one server would say: the same 400s (about its own
/// `max_tokens`, not the prefill's 1), answered before any prefill reaches an engine, the
/// same 405s, and the server's own response id, never the proxy's PD request id.
#[test]
fn the_proxy_answers_bad_requests_as_serve_does_without_a_prefill() {
    let prefiller = Proc::serve(&[], &[]);
    let decoder = Proc::serve(&[], &[]);
    let proxy = Proc::proxy(&prefiller.port(), &decoder.port(), &[]);
    let long_prompt: Vec<u32> = vec![65; 30];
    let refused = [
        json!({"prompt": ""}),
        json!({"prompt": [""]}),
        json!({"prompt": [[1, 2], [3, 4]]}),
        json!({"prompt": [[]]}),
        json!({"prompt": long_prompt, "max_tokens": 1000}),
        json!({"prompt": long_prompt, "max_tokens": MAX_MODEL_LEN}),
        json!({"prompt": "a", "max_tokens": 0}),
        json!({"prompt": "a", "top_p": 0.5}),
        json!({"prompt": "a", "best_of": 2}),
        json!({"prompt": "a", "temperature": 0.7}),
        json!({"prompt": "a", "presence_penalty": 1}),
    ];
    for request in &refused {
        let (status, direct) = post(&format!("{}/v1/completions", decoder.url), request);
        assert_eq!(status, 400, "{request}: {direct}");
        let (status, proxied) = post(&format!("{}/v1/completions", proxy.url), request);
        assert_eq!(status, 400, "{request}: {proxied}");
        assert_eq!(error_message(&proxied), error_message(&direct), "{request}");
    }
    let (_, direct) = post(
        &format!("{}/v1/completions", decoder.url),
        &json!({"prompt": long_prompt, "max_tokens": 1000}),
    );
    assert!(
        error_message(&direct).contains("1000 in the completion"),
        "{direct}"
    );
    let (_, metrics) = get(&format!("{}/metrics", prefiller.url));
    assert_eq!(
        metric(&metrics, "kvrelay_prompt_tokens_total"),
        0,
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, "kvrelay_request_errors_total"),
        0,
        "{metrics}"
    );

    for path in ["/v1/completions", "/v1/chat/completions"] {
        for server in [&decoder, &proxy] {
            let (status, body) = get(&format!("{}{path}", server.url));
            assert_eq!(status, 405, "GET {path}: {body}");
        }
    }

    // The greedy defaults of the sampling fields, and a batch of one, are served.
    let accepted =
        json!({"prompt": [[1, 2]], "max_tokens": 3, "top_p": 1.0, "best_of": 1, "temperature": 0});
    let (status, direct) = post(&format!("{}/v1/completions", decoder.url), &accepted);
    assert_eq!(status, 200, "{direct}");
    let (status, proxied) = post(&format!("{}/v1/completions", proxy.url), &accepted);
    assert_eq!(status, 200, "{proxied}");
    assert_eq!(
        proxied["choices"][0]["token_ids"],
        direct["choices"][0]["token_ids"]
    );
    let id = proxied["id"].as_str().expect("an id");
    assert!(id.starts_with("cmpl-"), "{proxied}");
    let events = post_stream(
        &format!("{}/v1/completions", proxy.url),
        &json!({"prompt": "a", "max_tokens": 3, "stream": true}),
    );
    for event in &events {
        let id = event["id"].as_str().expect("an id");
        assert!(id.starts_with("cmpl-"), "{event}");
    }
}

#[test]
fn the_proxy_warns_of_unauthenticated_notifications_reachable_from_other_hosts() {
    let warned = |host: &str, secret: &[&str]| {
        let port = free_port().to_string();
        let mut flags = vec!["--proxy-host", host, "--proxy-port", &port];
        flags.extend_from_slice(secret);
        let proxy = Proc::proxy("1", "2", &flags);
        proxy
            .startup
            .iter()
            .any(|line| line.contains("WARNING") && line.contains("--pd-shared-secret"))
    };
    assert!(warned("0.0.0.0", &[]));
    assert!(!warned("0.0.0.0", &["--pd-shared-secret", "s3cret"]));
    assert!(!warned("127.0.0.1", &[]));
}
