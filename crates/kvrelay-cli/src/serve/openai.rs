//! The OpenAI completions protocol: reading a request body, and the JSON of responses and
//! stream chunks (vLLM's shapes, plus `token_ids` in every choice).

use kvrelay::transfer::PdTarget;
use kvrelay_engine::{FinishReason, RequestOutput, Tokenizer};
use serde_json::{json, Map, Value};

use crate::http::HttpError;

/// vLLM's default when a request gives no `max_tokens`.
const DEFAULT_MAX_TOKENS: usize = 16;

/// A validated `/v1/completions` request.
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

    /// Reads and checks a completion request body.
    pub fn completion_request(
        &self,
        body: &Map<String, Value>,
    ) -> Result<CompletionRequest, HttpError> {
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
        let prompt = self.prompt_tokens(body.get("prompt"))?;
        let max_tokens = match body.get("max_tokens") {
            None | Some(Value::Null) => DEFAULT_MAX_TOKENS,
            Some(v) => v
                .as_u64()
                .filter(|&n| n >= 1)
                .and_then(|n| usize::try_from(n).ok())
                .ok_or_else(|| HttpError::bad_request("`max_tokens` must be a positive integer"))?,
        };
        match body.get("temperature") {
            None | Some(Value::Null) => {}
            Some(Value::Number(t)) if t.as_f64() == Some(0.0) => {}
            Some(Value::Number(t)) => {
                return Err(HttpError::bad_request(format!(
                    "`temperature` {t} is not supported: the engine samples greedily, so only temperature 0 is accepted"
                )))
            }
            Some(_) => return Err(HttpError::bad_request("`temperature` must be a number")),
        }
        match body.get("n") {
            None | Some(Value::Null) => {}
            Some(n) if n.as_u64() == Some(1) => {}
            Some(_) => return Err(HttpError::bad_request("only `n` = 1 is supported")),
        }
        if flag(body, "echo")? {
            return Err(HttpError::bad_request("`echo` is not supported"));
        }
        if !matches!(body.get("logprobs"), None | Some(Value::Null)) {
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
        let include_usage = match body.get("stream_options") {
            None | Some(Value::Null) => false,
            Some(Value::Object(options)) => flag(options, "include_usage")?,
            Some(_) => return Err(HttpError::bad_request("`stream_options` must be an object")),
        };
        let total = prompt.len() + max_tokens;
        if prompt.len() >= self.max_model_len || total > self.max_model_len {
            return Err(HttpError::bad_request(format!(
                "this model's maximum context length is {} tokens; the request needs {total} ({} in the prompt, {max_tokens} in the completion)",
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

/// An optional boolean field.
fn flag(body: &Map<String, Value>, name: &str) -> Result<bool, HttpError> {
    match body.get(name) {
        None | Some(Value::Null) => Ok(false),
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
    }
}

/// The fields every completion response and chunk carries.
pub struct Envelope<'a> {
    pub id: &'a str,
    pub created: u64,
    pub model: &'a str,
}

impl Envelope<'_> {
    fn object(&self, choices: Value) -> Value {
        json!({
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        })
    }

    /// The whole answer of a non-streaming request.
    pub fn completion(&self, output: &RequestOutput, text: String) -> Value {
        let mut body = self.object(json!([{
            "index": 0,
            "text": text,
            "token_ids": output.output_token_ids,
            "logprobs": null,
            "finish_reason": finish_reason(&output.finish_reason),
            "stop_reason": null,
        }]));
        body["usage"] = usage(output);
        body["kv_transfer_params"] = output.kv_transfer_params.clone().unwrap_or(Value::Null);
        body
    }

    /// A stream chunk with new tokens.
    pub fn chunk(&self, text: String, token_ids: &[u32]) -> Value {
        self.object(json!([{
            "index": 0,
            "text": text,
            "token_ids": token_ids,
            "logprobs": null,
            "finish_reason": null,
            "stop_reason": null,
        }]))
    }

    /// The stream chunk that ends the choice.
    pub fn last_chunk(&self, output: &RequestOutput, text: String) -> Value {
        let mut body = self.object(json!([{
            "index": 0,
            "text": text,
            "token_ids": [],
            "logprobs": null,
            "finish_reason": finish_reason(&output.finish_reason),
            "stop_reason": null,
        }]));
        body["kv_transfer_params"] = output.kv_transfer_params.clone().unwrap_or(Value::Null);
        body
    }

    /// The `stream_options.include_usage` chunk.
    pub fn usage_chunk(&self, output: &RequestOutput) -> Value {
        let mut body = self.object(json!([]));
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
