//! The OpenAI completions and chat completions protocols: reading a request body, and the
//! JSON of responses and stream chunks (vLLM's shapes, plus `token_ids` in every choice and
//! a whole answer's `logits_digest`).

use kvrelay::transfer::PdTarget;
use kvrelay_engine::{ChatMessage, ChatTemplate, FinishReason, RequestOutput, Tokenizer};
use serde_json::{json, Map, Value};

use crate::http::HttpError;

/// vLLM's default when a request gives no `max_tokens`.
const DEFAULT_MAX_TOKENS: usize = 16;

/// Sampling fields the engine does not implement, each with the value that leaves greedy
/// sampling unchanged (vLLM's defaults, and temperature 0): any other value is refused
/// rather than silently ignored.
const GREEDY_DEFAULTS: [(&str, f64); 8] = [
    ("temperature", 0.0),
    ("top_p", 1.0),
    ("best_of", 1.0),
    ("min_p", 0.0),
    ("presence_penalty", 0.0),
    ("frequency_penalty", 0.0),
    ("repetition_penalty", 1.0),
    ("min_tokens", 0.0),
];

/// `kv_transfer_params` key under which `kvrelay proxy` passes a PD prefill the client's
/// own `max_tokens`/`max_completion_tokens` (the prefill itself runs with 1), so that the
/// prefiller checks the context length the decoder will need.
pub const DECODE_REQUEST: &str = "decode_request";

/// Which OpenAI endpoint a request came through: it decides the fields read and the JSON
/// shapes answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Api {
    /// `/v1/completions`: a prompt in, `text` out.
    Completions,
    /// `/v1/chat/completions`: messages rendered by the chat template in, a `message` out.
    ChatCompletions,
}

impl Api {
    /// The prefix of the ids the server gives requests.
    pub fn id_prefix(self) -> &'static str {
        match self {
            Api::Completions => "cmpl",
            Api::ChatCompletions => "chatcmpl",
        }
    }
}

/// A validated `/v1/completions` or `/v1/chat/completions` request.
#[derive(Debug)]
pub struct CompletionRequest {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub ignore_eos: bool,
    pub stream: bool,
    pub include_usage: bool,
    /// `kv_transfer_params.disagg_spec.req_id`: the id a PD proxy knows this prefill by.
    pub pd_request_id: Option<String>,
    /// The request's `kv_transfer_params`, checked (a `disagg_spec` receiver is well formed)
    /// and handed to the connector.
    pub kv_transfer_params: Option<Value>,
}

/// What the server checks requests against.
pub struct ModelInfo<'a> {
    pub served_name: &'a str,
    pub tokenizer: &'a Tokenizer,
    pub chat_template: Option<&'a ChatTemplate>,
    pub max_model_len: usize,
}

impl ModelInfo<'_> {
    /// A prompt given as text or as token ids (also as a one-element list of either).
    pub fn prompt_tokens(&self, prompt: Option<&Value>) -> Result<Vec<u32>, HttpError> {
        let prompt = match prompt {
            Some(Value::Array(items)) if items.len() == 1 && !items[0].is_number() => &items[0],
            Some(p) => p,
            None => return Err(HttpError::bad_request("`prompt` is required")),
        };
        let tokens = match prompt {
            // Not even a BOS token of its own: an empty text is a client's mistake.
            Value::String(text) if text.is_empty() => Vec::new(),
            Value::String(text) => self
                .tokenizer
                .encode(text)
                .map_err(|e| HttpError::bad_request(format!("`prompt`: {e}")))?,
            Value::Array(items) => items
                .iter()
                .map(|v| v.as_u64().and_then(|t| u32::try_from(t).ok()))
                .collect::<Option<Vec<u32>>>()
                .ok_or_else(|| {
                    HttpError::bad_request(
                        "`prompt` must be a string or a list of token ids (non-negative integers); batched prompts are not supported",
                    )
                })?,
            _ => {
                return Err(HttpError::bad_request(
                    "`prompt` must be a string or a list of token ids",
                ))
            }
        };
        if tokens.is_empty() {
            return Err(HttpError::bad_request("`prompt` is empty"));
        }
        Ok(tokens)
    }

    /// The prompt of a chat request: its `messages` rendered by the chat template, then
    /// tokenized without adding special tokens (the template wrote them).
    pub fn chat_prompt_tokens(&self, body: &Map<String, Value>) -> Result<Vec<u32>, HttpError> {
        let template = self.chat_template.ok_or_else(|| {
            HttpError::bad_request(format!(
                "chat completions need a chat template, and `{}` has none (no chat_template.jinja, no `chat_template` in tokenizer_config.json); send a prompt to /v1/completions",
                self.served_name
            ))
        })?;
        let messages = chat_messages(body.get("messages"))?;
        let add_generation_prompt = flag_or(body, "add_generation_prompt", true)?;
        let text = template
            .render(&messages, add_generation_prompt)
            .map_err(|e| HttpError::bad_request(e.to_string()))?;
        let tokens = self
            .tokenizer
            .encode_without_special_tokens(&text)
            .map_err(|e| HttpError::bad_request(format!("the rendered chat prompt: {e}")))?;
        if tokens.is_empty() {
            return Err(HttpError::bad_request(
                "the chat template rendered the messages as an empty prompt",
            ));
        }
        Ok(tokens)
    }

    /// Reads and checks a `/v1/completions` request body.
    pub fn completion_request(
        &self,
        body: &Map<String, Value>,
    ) -> Result<CompletionRequest, HttpError> {
        self.check_model(body)?;
        let prompt = self.prompt_tokens(body.get("prompt"))?;
        self.generation_request(Api::Completions, body, prompt)
    }

    /// Reads and checks a `/v1/chat/completions` request body.
    pub fn chat_request(&self, body: &Map<String, Value>) -> Result<CompletionRequest, HttpError> {
        self.check_model(body)?;
        let prompt = self.chat_prompt_tokens(body)?;
        match body.get("tools") {
            None | Some(Value::Null) => {}
            Some(Value::Array(tools)) if tools.is_empty() => {}
            Some(_) => return Err(HttpError::bad_request("`tools` are not supported")),
        }
        self.generation_request(Api::ChatCompletions, body, prompt)
    }

    /// `model`, when given, must name the served model.
    fn check_model(&self, body: &Map<String, Value>) -> Result<(), HttpError> {
        match body.get("model") {
            None | Some(Value::Null) => {}
            Some(Value::String(name)) if name == self.served_name => {}
            Some(Value::String(name)) => {
                return Err(HttpError::new(
                    404,
                    format!(
                        "the model `{name}` does not exist; this server serves `{}`",
                        self.served_name
                    ),
                ))
            }
            Some(_) => return Err(HttpError::bad_request("`model` must be a string")),
        }
        Ok(())
    }

    /// The completion's token limit in `body`, for a prompt of `prompt_len` tokens.
    fn max_tokens(
        &self,
        api: Api,
        body: &Map<String, Value>,
        prompt_len: usize,
    ) -> Result<usize, HttpError> {
        // vLLM: a completion defaults to 16 tokens; a chat completion to the rest of the
        // context, and its `max_completion_tokens` replaces the older `max_tokens`.
        let (field, default) = match api {
            Api::Completions => ("max_tokens", DEFAULT_MAX_TOKENS),
            Api::ChatCompletions => {
                let field = match body.get("max_completion_tokens") {
                    None | Some(Value::Null) => "max_tokens",
                    Some(_) => "max_completion_tokens",
                };
                (field, self.max_model_len.saturating_sub(prompt_len))
            }
        };
        match body.get(field) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => v
                .as_u64()
                .filter(|&n| n >= 1)
                .and_then(|n| usize::try_from(n).ok())
                .ok_or_else(|| {
                    HttpError::bad_request(format!("`{field}` must be a positive integer"))
                }),
        }
    }

    /// The checks and options both endpoints share, over the request's `prompt` tokens.
    fn generation_request(
        &self,
        api: Api,
        body: &Map<String, Value>,
        prompt: Vec<u32>,
    ) -> Result<CompletionRequest, HttpError> {
        let max_tokens = self.max_tokens(api, body, prompt.len())?;
        for (field, greedy) in GREEDY_DEFAULTS {
            match body.get(field) {
                None | Some(Value::Null) => {}
                Some(Value::Number(v)) if v.as_f64() == Some(greedy) => {}
                Some(Value::Number(v)) => {
                    return Err(HttpError::bad_request(format!(
                        "`{field}` {v} is not supported: the engine samples greedily, so only {field} {greedy} is accepted"
                    )))
                }
                Some(_) => {
                    return Err(HttpError::bad_request(format!(
                        "`{field}` must be a number"
                    )))
                }
            }
        }
        match body.get("n") {
            None | Some(Value::Null) => {}
            Some(n) if n.as_u64() == Some(1) => {}
            Some(_) => return Err(HttpError::bad_request("only `n` = 1 is supported")),
        }
        if flag(body, "echo")? {
            return Err(HttpError::bad_request("`echo` is not supported"));
        }
        // A completion's `logprobs` is a count; a chat completion's a flag, with the count
        // in `top_logprobs`.
        let wants_logprobs = match api {
            Api::Completions => !matches!(body.get("logprobs"), None | Some(Value::Null)),
            Api::ChatCompletions => {
                flag(body, "logprobs")?
                    || body
                        .get("top_logprobs")
                        .is_some_and(|top| !top.is_null() && top.as_u64() != Some(0))
            }
        };
        if wants_logprobs {
            return Err(HttpError::bad_request("`logprobs` is not supported"));
        }
        match body.get("stop") {
            None | Some(Value::Null) => {}
            Some(Value::Array(stops)) if stops.is_empty() => {}
            Some(_) => return Err(HttpError::bad_request("`stop` strings are not supported")),
        }
        let kv_transfer_params = body.get("kv_transfer_params").filter(|p| !p.is_null());
        PdTarget::from_kv_transfer_params(kv_transfer_params)
            .map_err(|e| HttpError::bad_request(format!("`kv_transfer_params`: {e}")))?;
        let pd_request_id = match kv_transfer_params {
            None => None,
            Some(Value::Object(params)) => match &params.get("disagg_spec").map(|s| &s["req_id"]) {
                None | Some(Value::Null) => None,
                Some(Value::String(id)) if !id.is_empty() && id.len() <= 200 => Some(id.clone()),
                Some(_) => {
                    return Err(HttpError::bad_request(
                        "`kv_transfer_params.disagg_spec.req_id` must be a non-empty string of at most 200 bytes",
                    ))
                }
            },
            Some(_) => {
                return Err(HttpError::bad_request(
                    "`kv_transfer_params` must be an object",
                ))
            }
        };
        // A PD prefill runs with `max_tokens` 1; the proxy passes the client's limits so that
        // a request the decoder would refuse is refused before its prefill is spent.
        let decode_max_tokens = match kv_transfer_params.and_then(|p| p.get(DECODE_REQUEST)) {
            None | Some(Value::Null) => max_tokens,
            Some(Value::Object(limits)) => self.max_tokens(api, limits, prompt.len())?,
            Some(_) => {
                return Err(HttpError::bad_request(format!(
                    "`kv_transfer_params.{DECODE_REQUEST}` must be an object"
                )))
            }
        };
        let include_usage = match body.get("stream_options") {
            None | Some(Value::Null) => false,
            Some(Value::Object(options)) => flag(options, "include_usage")?,
            Some(_) => return Err(HttpError::bad_request("`stream_options` must be an object")),
        };
        let completion = max_tokens.max(decode_max_tokens);
        let total = prompt.len() + completion;
        if prompt.len() >= self.max_model_len || total > self.max_model_len {
            return Err(HttpError::bad_request(format!(
                "this model's maximum context length is {} tokens; the request needs {total} ({} in the prompt, {completion} in the completion)",
                self.max_model_len,
                prompt.len()
            )));
        }
        Ok(CompletionRequest {
            prompt,
            max_tokens,
            ignore_eos: flag(body, "ignore_eos")?,
            stream: flag(body, "stream")?,
            include_usage,
            pd_request_id,
            kv_transfer_params: kv_transfer_params.cloned(),
        })
    }
}

/// A chat request's `messages`: a non-empty list of `{role, content}`, the content a string
/// or a list of text parts, joined with newlines as vLLM does.
fn chat_messages(messages: Option<&Value>) -> Result<Vec<ChatMessage>, HttpError> {
    let messages = match messages {
        None | Some(Value::Null) => return Err(HttpError::bad_request("`messages` is required")),
        Some(Value::Array(messages)) if messages.is_empty() => {
            return Err(HttpError::bad_request("`messages` is empty"))
        }
        Some(Value::Array(messages)) => messages,
        Some(_) => {
            return Err(HttpError::bad_request(
                "`messages` must be a list of {\"role\", \"content\"} objects",
            ))
        }
    };
    messages
        .iter()
        .enumerate()
        .map(|(i, message)| {
            let role = message
                .get("role")
                .and_then(Value::as_str)
                .ok_or_else(|| {
                    HttpError::bad_request(format!("`messages[{i}].role` must be a string"))
                })?;
            let content = match message.get("content") {
                Some(Value::String(text)) => text.clone(),
                Some(Value::Array(parts)) => text_parts(parts).ok_or_else(|| {
                    HttpError::bad_request(format!(
                        "`messages[{i}].content` parts must be {{\"type\": \"text\", \"text\": ...}}: only text content is supported"
                    ))
                })?,
                _ => {
                    return Err(HttpError::bad_request(format!(
                        "`messages[{i}].content` must be a string or a list of text parts"
                    )))
                }
            };
            Ok(ChatMessage {
                role: role.to_string(),
                content,
            })
        })
        .collect()
}

/// The text of `{"type": "text", "text": ...}` parts, one per line; `None` if a part is not
/// text.
fn text_parts(parts: &[Value]) -> Option<String> {
    let texts = parts
        .iter()
        .map(|part| match (part.get("type"), part.get("text")) {
            (Some(Value::String(kind)), Some(Value::String(text))) if kind == "text" => {
                Some(text.as_str())
            }
            _ => None,
        })
        .collect::<Option<Vec<&str>>>()?;
    Some(texts.join("\n"))
}

/// An optional boolean field, false when absent.
fn flag(body: &Map<String, Value>, name: &str) -> Result<bool, HttpError> {
    flag_or(body, name, false)
}

/// An optional boolean field.
fn flag_or(body: &Map<String, Value>, name: &str, default: bool) -> Result<bool, HttpError> {
    match body.get(name) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(HttpError::bad_request(format!(
            "`{name}` must be a boolean"
        ))),
    }
}

pub fn finish_reason(reason: &FinishReason) -> &'static str {
    match reason {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
        FinishReason::Error(_) => "error",
        FinishReason::Aborted => "abort",
    }
}

/// The fields every response and stream chunk of one request carries.
pub struct Envelope<'a> {
    pub api: Api,
    pub id: &'a str,
    pub created: u64,
    pub model: &'a str,
}

impl Envelope<'_> {
    fn object(&self, streamed: bool, choices: Value) -> Value {
        let object = match (self.api, streamed) {
            (Api::Completions, _) => "text_completion",
            (Api::ChatCompletions, false) => "chat.completion",
            (Api::ChatCompletions, true) => "chat.completion.chunk",
        };
        json!({
            "id": self.id,
            "object": object,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        })
    }

    /// The one choice: `text` and its `token_ids`, as a completion's `text`, a chat
    /// completion's assistant `message`, or a chat chunk's `delta`.
    fn choice(
        &self,
        streamed: bool,
        text: String,
        token_ids: &[u32],
        finish_reason: Option<&str>,
    ) -> Value {
        let mut choice = json!({
            "index": 0,
            "token_ids": token_ids,
            "logprobs": null,
            "finish_reason": finish_reason,
            "stop_reason": null,
        });
        match (self.api, streamed) {
            (Api::Completions, _) => choice["text"] = json!(text),
            (Api::ChatCompletions, false) => {
                choice["message"] = json!({"role": "assistant", "content": text})
            }
            (Api::ChatCompletions, true) => choice["delta"] = json!({"content": text}),
        }
        choice
    }

    /// The whole answer of a non-streaming request.
    pub fn completion(&self, output: &RequestOutput, text: String) -> Value {
        let reason = finish_reason(&output.finish_reason);
        let choice = self.choice(false, text, &output.output_token_ids, Some(reason));
        let mut body = self.object(false, json!([choice]));
        body["usage"] = usage(output);
        body["kv_transfer_params"] = output.kv_transfer_params.clone().unwrap_or(Value::Null);
        // kvrelay's own field: the engine's xxh3 over the logits of every sampled position,
        // so two servers can be shown to compute bit-identical logits (launch.sh TP=N).
        body["logits_digest"] = json!(output.logits_digest);
        body
    }

    /// The chunk that opens a chat stream: the assistant's role, before any token.
    pub fn role_chunk(&self) -> Option<Value> {
        if self.api != Api::ChatCompletions {
            return None;
        }
        let mut choice = self.choice(true, String::new(), &[], None);
        choice["delta"]["role"] = json!("assistant");
        Some(self.object(true, json!([choice])))
    }

    /// A stream chunk with new tokens.
    pub fn chunk(&self, text: String, token_ids: &[u32]) -> Value {
        self.object(true, json!([self.choice(true, text, token_ids, None)]))
    }

    /// The stream chunk that ends the choice.
    pub fn last_chunk(&self, output: &RequestOutput, text: String) -> Value {
        let reason = finish_reason(&output.finish_reason);
        let mut body = self.object(true, json!([self.choice(true, text, &[], Some(reason))]));
        body["kv_transfer_params"] = output.kv_transfer_params.clone().unwrap_or(Value::Null);
        body
    }

    /// The `stream_options.include_usage` chunk.
    pub fn usage_chunk(&self, output: &RequestOutput) -> Value {
        let mut body = self.object(true, json!([]));
        body["usage"] = usage(output);
        body
    }
}

fn usage(output: &RequestOutput) -> Value {
    json!({
        "prompt_tokens": output.prompt_token_count,
        "completion_tokens": output.output_token_count,
        "total_tokens": output.prompt_token_count + output.output_token_count,
    })
}

/// Turns a growing token sequence into text pieces: a piece is sent once its text is
/// stable (it does not end in an incomplete character), so the pieces join to the text of
/// the whole sequence whenever decoding is prefix-stable.
pub struct Detokenizer<'a> {
    tokenizer: &'a Tokenizer,
    ids: Vec<u32>,
    sent: String,
}

impl<'a> Detokenizer<'a> {
    pub fn new(tokenizer: &'a Tokenizer) -> Self {
        Detokenizer {
            tokenizer,
            ids: Vec::new(),
            sent: String::new(),
        }
    }

    /// The new text after appending `ids`.
    pub fn push(&mut self, ids: &[u32]) -> String {
        self.ids.extend_from_slice(ids);
        let text = self.tokenizer.decode(&self.ids).unwrap_or_default();
        if text.ends_with(char::REPLACEMENT_CHARACTER) {
            return String::new();
        }
        self.take_suffix(text)
    }

    /// The text not sent yet, once no more tokens come.
    pub fn finish(&mut self) -> String {
        let text = self.tokenizer.decode(&self.ids).unwrap_or_default();
        self.take_suffix(text)
    }

    fn take_suffix(&mut self, text: String) -> String {
        match text.strip_prefix(self.sent.as_str()) {
            Some(rest) => {
                let rest = rest.to_string();
                self.sent = text;
                rest
            }
            None => String::new(),
        }
    }
}
