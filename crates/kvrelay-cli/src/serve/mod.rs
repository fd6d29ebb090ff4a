//! `kvrelay serve`: an OpenAI-compatible HTTP server over the reference engine, with the
//! vLLM flags the PD scripts pass (`--kv-transfer-config`, `LMCACHE_CONFIG_FILE`).
//!
//! One thread owns and steps the engine ([`engine_loop`]); HTTP handler threads parse
//! requests, submit them through a bounded queue and relay the engine's events.

mod engine_loop;
mod metrics;
mod openai;

use std::process::ExitCode;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::Args;
use kvrelay::config::{KvTransferConfig, LmcacheConfig};
use kvrelay::layout::LayoutKind;
use kvrelay::KvDtype;
use kvrelay_engine::{
    load_chat_template, load_model, ChatTemplate, Engine, EngineConfig, KvPlacement, RequestOutput,
    SamplingParams, Tokenizer,
};
use serde_json::{json, Value};

use crate::http::{
    lock, read_json_object, respond_bytes, respond_error, respond_json, ChunkedResponse, HttpError,
    Limits, Listener, Method, Request,
};
use engine_loop::{cancel_pd_pages, AbortScope, EngineHandle, Event, RequestEvents, Shared};
pub use openai::DECODE_REQUEST;
use openai::{Api, CompletionRequest, Detokenizer, Envelope, ModelInfo};

/// Most request ids one `POST /abort_requests` may name.
const MAX_ABORT_IDS: usize = 1024;

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0")]
    host: String,
    /// Port to listen on (0: any free port; the address is printed once ready).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// `tiny-random` (embedded) or a Hugging Face Llama checkpoint directory.
    #[arg(long, default_value = kvrelay_engine::TINY_RANDOM)]
    model: String,
    /// The model name requests and responses use (default: --model).
    #[arg(long)]
    served_model_name: Option<String>,
    #[arg(long, default_value_t = 16)]
    block_size: usize,
    #[arg(long, default_value_t = 4096)]
    max_model_len: usize,
    /// Requests running at once.
    #[arg(long, default_value_t = 8)]
    max_num_seqs: usize,
    /// Token budget per engine step; longer prompts are prefilled in chunks.
    #[arg(long, default_value_t = 2048)]
    max_num_batched_tokens: usize,
    /// KV cache dtype: bfloat16, float16 or float32.
    #[arg(long, default_value = "bfloat16", value_parser = KvDtype::from_str)]
    kv_dtype: KvDtype,
    /// Paged KV layout, any kvrelay layout name (a PD prefiller and decoder may differ).
    #[arg(long, default_value = "flash_attn_nhd", value_parser = LayoutKind::from_str)]
    layout: LayoutKind,
    /// vLLM's KV transfer config JSON (kv_connector, kv_role, kv_connector_extra_config,
    /// ...). The LMCache connectors read their YAML from LMCACHE_CONFIG_FILE.
    #[arg(long)]
    kv_transfer_config: Option<String>,
    /// Requests admitted at once (queued or running); more are answered 503.
    #[arg(long, default_value_t = 64)]
    max_pending_requests: usize,
    /// How long a request may go without the engine making progress before it fails, and
    /// the longest a handler waits for the engine's next event.
    #[arg(long, default_value_t = 300)]
    request_timeout_sec: u64,
    /// Accepted for compatibility: the engine keeps no prefix cache of its own.
    #[arg(long)]
    no_enable_prefix_caching: bool,
    /// Accepted for compatibility: the engine is always eager.
    #[arg(long)]
    enforce_eager: bool,
    /// Accepted for compatibility: the engine runs no remote code.
    #[arg(long)]
    trust_remote_code: bool,
    /// Accepted for compatibility: requests are not logged.
    #[arg(long)]
    disable_log_requests: bool,
    /// Accepted for compatibility: the engine sizes its cache from max_model_len.
    #[arg(long)]
    gpu_memory_utilization: Option<f64>,
    /// Tensor-parallel ranks (threads of this process): each holds num_kv_heads / N KV
    /// heads and its own connector worker (worker id = rank; a PD rank i uses
    /// pd_peer_init_port[i] / pd_peer_alloc_port[i]). N must divide the KV heads.
    #[arg(long, default_value_t = 1)]
    tensor_parallel_size: usize,
    /// Where the KV cache lives: `host`, or `ascend` (feature `ascend`): TP rank i's cache
    /// in NPU i's memory, its Ascend PD channel on that NPU.
    #[arg(long, default_value = "host")]
    device: String,
}

/// What the handler threads share.
struct ServeState {
    engine: EngineHandle,
    shared: Arc<Shared>,
    tokenizer: Tokenizer,
    /// The checkpoint's chat template; without one, chat requests are answered 400.
    chat_template: Option<ChatTemplate>,
    served_name: String,
    max_model_len: usize,
    request_timeout: Duration,
    next_id: AtomicU64,
}

pub fn run(args: ServeArgs) -> Result<ExitCode, String> {
    if args.max_pending_requests == 0 {
        return Err("--max-pending-requests must be at least 1".into());
    }
    let (model, tokenizer) =
        load_model(&args.model, args.max_model_len).map_err(|e| format!("--model {e}"))?;
    // A broken template fails the start rather than every chat request later.
    let chat_template =
        load_chat_template(&args.model).map_err(|e| format!("--model chat template: {e}"))?;
    let config = EngineConfig {
        max_num_seqs: args.max_num_seqs,
        max_num_batched_tokens: args.max_num_batched_tokens,
        max_model_len: args.max_model_len,
        block_size: args.block_size,
        kv_dtype: args.kv_dtype,
        layout: args.layout,
        stall_timeout: Duration::from_secs(args.request_timeout_sec),
        tensor_parallel_size: args.tensor_parallel_size,
        kv_placement: kv_placement(&args.device)?,
        ..EngineConfig::default()
    };
    let mut engine =
        Engine::new(model, config).map_err(|e| format!("--tensor-parallel-size: {e}"))?;
    if let Some(json) = &args.kv_transfer_config {
        let transfer = KvTransferConfig::from_json_str(json)
            .map_err(|e| format!("--kv-transfer-config: {e}"))?;
        let lmcache = LmcacheConfig::load_from_env().map_err(|e| format!("LMCache config: {e}"))?;
        engine
            .connect(&transfer, &lmcache, &args.model)
            .map_err(|e| format!("--kv-transfer-config: {e}"))?;
    }
    let request_timeout = Duration::from_secs(args.request_timeout_sec);
    let (handle, shared) = EngineHandle::spawn(engine, args.max_pending_requests, request_timeout)
        .map_err(|e| format!("starting the engine thread: {e}"))?;
    let listener = Listener::bind(&args.host, args.port)?;
    let state = Arc::new(ServeState {
        engine: handle,
        shared,
        tokenizer,
        chat_template,
        served_name: args.served_model_name.unwrap_or(args.model),
        max_model_len: args.max_model_len,
        request_timeout,
        next_id: AtomicU64::new(0),
    });
    // Every admitted request may hold a handler while it streams; a few more answer the
    // cheap endpoints (and the 503s) meanwhile.
    let limits = Limits::with_handlers(args.max_pending_requests + 4);
    eprintln!("kvrelay serve: listening on http://{}", listener.address());
    listener.serve(limits, move |request| state.handle(request))?;
    Ok(ExitCode::SUCCESS)
}

/// The engine's KV placement for `--device`: rank 0 on NPU 0 (the engine gives rank i NPU i).
fn kv_placement(device: &str) -> Result<KvPlacement, String> {
    match device {
        "host" => Ok(KvPlacement::Host),
        #[cfg(feature = "ascend")]
        "ascend" => kvrelay::device::AscendDevice::open(0)
            .map(|d| KvPlacement::Ascend(Arc::new(d)))
            .map_err(|e| format!("--device ascend: {e}")),
        #[cfg(not(feature = "ascend"))]
        "ascend" => Err(
            "--device ascend needs a kvrelay built with the `ascend` feature \
                         (cargo build -p kvrelay-cli --features ascend)"
                .into(),
        ),
        other => Err(format!("unknown --device {other:?}; known: host, ascend")),
    }
}

fn unix_time() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl ServeState {
    fn model_info(&self) -> ModelInfo<'_> {
        ModelInfo {
            served_name: &self.served_name,
            tokenizer: &self.tokenizer,
            chat_template: self.chat_template.as_ref(),
            max_model_len: self.max_model_len,
        }
    }

    fn handle(&self, request: Request) {
        let path = request.path().to_string();
        let method = request.method().clone();
        match (method, path.as_str()) {
            (Method::GET, "/health") => match lock(&self.shared.dead).as_ref() {
                None => respond_bytes(request, 200, "text/plain", Vec::new()),
                Some(reason) => respond_error(
                    request,
                    &HttpError::new(500, format!("the engine stopped: {reason}")),
                ),
            },
            (Method::GET, "/metrics") => {
                let in_flight = self.shared.in_flight.load(Ordering::SeqCst);
                let mut text = lock(&self.shared.metrics).render(in_flight);
                if !self.shared.pd_receivers.is_empty() {
                    let ranks: Vec<_> = self
                        .shared
                        .pd_receivers
                        .iter()
                        .map(|r| r.occupancy())
                        .collect();
                    metrics::render_pd_buffer(&mut text, &ranks);
                }
                respond_bytes(request, 200, "text/plain; version=0.0.4", text.into_bytes());
            }
            (Method::GET, "/v1/models") => respond_json(request, 200, &self.models()),
            // Cheap enough for a proxy to ask before every prefill.
            (Method::GET, "/load") => respond_json(
                request,
                200,
                &json!({
                    "in_flight": self.shared.in_flight.load(Ordering::SeqCst),
                    "max_pending": self.engine.max_pending(),
                }),
            ),
            (Method::POST, "/abort_requests") => {
                let answer = read_json_object(&request).and_then(|body| self.abort(&body));
                match answer {
                    Ok(body) => respond_json(request, 200, &body),
                    Err(e) => respond_error(request, &e),
                }
            }
            (Method::POST, "/tokenize") => {
                let answer = read_json_object(&request).and_then(|body| self.tokenize(&body));
                match answer {
                    Ok(body) => respond_json(request, 200, &body),
                    Err(e) => respond_error(request, &e),
                }
            }
            (Method::POST, "/detokenize") => {
                let answer = read_json_object(&request).and_then(|body| self.detokenize(&body));
                match answer {
                    Ok(body) => respond_json(request, 200, &body),
                    Err(e) => respond_error(request, &e),
                }
            }
            (Method::POST, "/v1/completions") => self.generate(request, Api::Completions),
            (Method::POST, "/v1/chat/completions") => self.generate(request, Api::ChatCompletions),
            (
                _,
                "/health"
                | "/metrics"
                | "/v1/models"
                | "/load"
                | "/abort_requests"
                | "/tokenize"
                | "/detokenize"
                | "/v1/completions"
                | "/v1/chat/completions",
            ) => respond_error(
                request,
                &HttpError::new(405, format!("method not allowed on {path}")),
            ),
            _ => respond_error(request, &HttpError::new(404, format!("no route {path}"))),
        }
    }

    fn models(&self) -> Value {
        json!({
            "object": "list",
            "data": [{
                "id": self.served_name,
                "object": "model",
                "created": unix_time(),
                "owned_by": "kvrelay",
                "root": self.served_name,
                "max_model_len": self.max_model_len,
            }],
        })
    }

    /// A `prompt`'s tokens, or (as vLLM does) the tokens of `messages` rendered by the chat
    /// template.
    fn tokenize(&self, body: &serde_json::Map<String, Value>) -> Result<Value, HttpError> {
        let tokens = if body.contains_key("messages") {
            self.model_info().chat_prompt_tokens(body)?
        } else {
            self.model_info().prompt_tokens(body.get("prompt"))?
        };
        Ok(json!({
            "count": tokens.len(),
            "max_model_len": self.max_model_len,
            "tokens": tokens,
        }))
    }

    /// Ends the requests a PD proxy knows by the `disagg_spec.req_id` it gave them, and
    /// frees PD buffer pages pushed for ids this server never ran.
    fn abort(&self, body: &serde_json::Map<String, Value>) -> Result<Value, HttpError> {
        let ids = body
            .get("request_ids")
            .and_then(Value::as_array)
            .filter(|ids| ids.len() <= MAX_ABORT_IDS)
            .and_then(|ids| {
                ids.iter()
                    .map(|id| id.as_str().map(str::to_string))
                    .collect::<Option<Vec<String>>>()
            })
            .ok_or_else(|| {
                HttpError::bad_request(format!(
                    "`request_ids` must be a list of at most {MAX_ABORT_IDS} strings"
                ))
            })?;
        let (done, ended) = mpsc::channel();
        self.engine.abort(ids, AbortScope::PdOnly, Some(done));
        let aborted = ended
            .recv_timeout(self.request_timeout)
            .map_err(|e| match e {
                RecvTimeoutError::Timeout => {
                    HttpError::new(503, "the engine did not take the abort in time")
                }
                RecvTimeoutError::Disconnected => HttpError::new(500, "the engine stopped"),
            })?;
        Ok(json!({ "aborted": aborted }))
    }

    fn detokenize(&self, body: &serde_json::Map<String, Value>) -> Result<Value, HttpError> {
        let tokens = body
            .get("tokens")
            .and_then(Value::as_array)
            .and_then(|items| {
                items
                    .iter()
                    .map(|v| v.as_u64().and_then(|t| u32::try_from(t).ok()))
                    .collect::<Option<Vec<u32>>>()
            })
            .ok_or_else(|| HttpError::bad_request("`tokens` must be a list of token ids"))?;
        let text = self
            .tokenizer
            .decode(&tokens)
            .map_err(|e| HttpError::bad_request(e.to_string()))?;
        Ok(json!({ "prompt": text }))
    }

    /// Answers a completion or chat completion request, streamed or not.
    fn generate(&self, request: Request, api: Api) {
        let body = match read_json_object(&request) {
            Ok(body) => body,
            Err(e) => return respond_error(request, &e),
        };
        // The client sees this server's own id; a PD request runs in the engine under the
        // proxy's id, which names its KV in the PD buffer and the connector.
        let public_id = format!(
            "{}-{}",
            api.id_prefix(),
            self.next_id.fetch_add(1, Ordering::Relaxed)
        );
        let (parsed, mut events) = match self.admit(api, &body, &public_id) {
            Ok(admitted) => admitted,
            Err(e) => {
                // Refused before the engine saw it: the KV a prefiller pushed for it would
                // hold PD buffer pages until their TTL.
                if let Some(pd_id) = raw_pd_request_id(&body) {
                    cancel_pd_pages(&self.shared, pd_id);
                }
                return respond_error(request, &e);
            }
        };
        let envelope = Envelope {
            api,
            id: &public_id,
            created: unix_time(),
            model: &self.served_name,
        };
        if parsed.stream {
            self.stream(request, &envelope, &parsed, &mut events);
        } else {
            match self.wait_finished(&mut events) {
                Ok(output) => {
                    let text = self
                        .tokenizer
                        .decode(&output.output_token_ids)
                        .unwrap_or_default();
                    respond_json(request, 200, &envelope.completion(&output, text));
                }
                Err(e) => respond_error(request, &e),
            }
        }
    }

    /// Checks `body` and submits it to the engine, as `public_id` unless it is a PD request.
    fn admit(
        &self,
        api: Api,
        body: &serde_json::Map<String, Value>,
        public_id: &str,
    ) -> Result<(CompletionRequest, RequestEvents), HttpError> {
        let parsed = match api {
            Api::Completions => self.model_info().completion_request(body)?,
            Api::ChatCompletions => self.model_info().chat_request(body)?,
        };
        let (engine_id, pd) = match &parsed.pd_request_id {
            Some(id) => (id.clone(), true),
            None => (public_id.to_string(), false),
        };
        let params = SamplingParams {
            max_tokens: parsed.max_tokens,
            ignore_eos: parsed.ignore_eos,
            kv_transfer_params: parsed.kv_transfer_params.clone(),
        };
        let events = self
            .engine
            .submit(engine_id, pd, parsed.prompt.clone(), params)?;
        Ok((parsed, events))
    }

    /// The engine's next event, within the request timeout.
    fn next_event(&self, events: &mut RequestEvents) -> Result<Event, HttpError> {
        match events.recv_timeout(self.request_timeout) {
            Ok(Event::Failed(e)) => Err(e),
            Ok(event) => Ok(event),
            Err(RecvTimeoutError::Timeout) => Err(HttpError::new(
                504,
                format!("the engine produced nothing for {:?}", self.request_timeout),
            )),
            Err(RecvTimeoutError::Disconnected) => Err(HttpError::new(
                500,
                "the engine stopped before the request finished",
            )),
        }
    }

    fn wait_finished(&self, events: &mut RequestEvents) -> Result<RequestOutput, HttpError> {
        loop {
            if let Event::Finished(output) = self.next_event(events)? {
                return finished_ok(*output);
            }
        }
    }

    /// Relays the request's tokens as server-sent events. Once the stream started, errors
    /// are reported as an `error` event before `[DONE]`.
    fn stream(
        &self,
        request: Request,
        envelope: &Envelope<'_>,
        parsed: &CompletionRequest,
        events: &mut RequestEvents,
    ) {
        // The first event decides between an error status and a stream.
        let first = match self.next_event(events) {
            Ok(event) => event,
            Err(e) => return respond_error(request, &e),
        };
        let Ok(mut out) = ChunkedResponse::start(request, 200, "text/event-stream") else {
            return;
        };
        if let Some(role) = envelope.role_chunk() {
            if out.event(&role.to_string()).is_err() {
                return;
            }
        }
        let mut detok = Detokenizer::new(&self.tokenizer);
        let mut event = Ok(first);
        let sent = loop {
            match event {
                Ok(Event::Tokens(ids)) => {
                    let text = detok.push(&ids);
                    if out.event(&envelope.chunk(text, &ids).to_string()).is_err() {
                        // The client left; dropping `events` aborts the request.
                        return;
                    }
                }
                Ok(Event::Finished(output)) => {
                    break finished_ok(*output).map(|output| {
                        let text = detok.finish();
                        let mut sent = out.event(&envelope.last_chunk(&output, text).to_string());
                        if parsed.include_usage {
                            sent = sent.and_then(|()| {
                                out.event(&envelope.usage_chunk(&output).to_string())
                            });
                        }
                        sent
                    });
                }
                Ok(Event::Failed(e)) | Err(e) => break Err(e),
            }
            event = self.next_event(events);
        };
        let sent = match sent {
            Ok(sent) => sent,
            Err(e) => out.event(&e.body().to_string()),
        };
        let _ = sent
            .and_then(|()| out.event("[DONE]"))
            .and_then(|()| out.finish());
    }
}

/// The `kv_transfer_params.disagg_spec.req_id` of a request body, read without checking
/// the rest of the body (which may be what was refused).
fn raw_pd_request_id(body: &serde_json::Map<String, Value>) -> Option<&str> {
    body.get("kv_transfer_params")?
        .get("disagg_spec")?
        .get("req_id")?
        .as_str()
}

/// A finished request's output, or the error it ended with. Messages do not name the
/// engine's request id: for a PD request it is the proxy's, not the client's.
fn finished_ok(output: RequestOutput) -> Result<RequestOutput, HttpError> {
    match &output.finish_reason {
        kvrelay_engine::FinishReason::Error(message) => Err(HttpError::new(
            500,
            format!("the request failed: {message}"),
        )),
        kvrelay_engine::FinishReason::Aborted => Err(HttpError::new(
            500,
            "the request was aborted (POST /abort_requests)",
        )),
        _ if output.transfer.failed_sends > 0 => Err(HttpError::new(
            502,
            "the request's KV could not be sent to the decoder's PD buffer (the prefiller's log says why)",
        )),
        _ => Ok(output),
    }
}
