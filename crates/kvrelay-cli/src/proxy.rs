//! `kvrelay proxy`: LMCache's disaggregated-prefill proxy (reference/lmcache_vllm.md §4.2,
//! the "first token from decoder" variant). A completion request goes to a prefiller with
//! `max_tokens` 1 (its connector saves the prompt's KV), then unchanged to a decoder (its
//! connector loads that KV), whose answer, streamed or not, is relayed to the client.
//! Prefillers and decoders are picked round-robin; an upstream that fails or exceeds
//! `--timeout-sec` gets the client a 502 or 504.

use std::collections::HashMap;
use std::io::Read;
use std::net::TcpListener;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use clap::Args;
use serde_json::{json, Map, Value};
use tiny_http::{Method, Request, Server};

use kvrelay::transfer::read_notification;

use crate::http::{read_json_object, respond_bytes, respond_error, ChunkedResponse, HttpError};

#[derive(Args, Debug)]
pub struct ProxyArgs {
    #[arg(long, default_value = "localhost")]
    host: String,
    /// Port to listen on (0: any free port; the address is printed once ready).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Prefiller hosts (comma-separated), paired with --prefiller-port.
    #[arg(long, value_delimiter = ',', default_value = "localhost")]
    prefiller_host: Vec<String>,
    #[arg(long, value_delimiter = ',', default_value = "8100")]
    prefiller_port: Vec<u16>,
    #[arg(long, default_value_t = 1)]
    num_prefillers: usize,
    /// Decoder hosts (comma-separated), paired with --decoder-port.
    #[arg(long, value_delimiter = ',', default_value = "localhost")]
    decoder_host: Vec<String>,
    #[arg(long, value_delimiter = ',', default_value = "8200")]
    decoder_port: Vec<u16>,
    #[arg(long, default_value_t = 1)]
    num_decoders: usize,
    /// The decoders' PD init ports, one per TP rank, sent to prefillers in `disagg_spec`:
    /// shared by every decoder (LMCache's meaning), or with --decoder-tp-size R, R ports
    /// per decoder in decoder order.
    #[arg(long, value_delimiter = ',', default_value = "8300")]
    decoder_init_port: Vec<u16>,
    /// The decoders' PD alloc ports, laid out as --decoder-init-port.
    #[arg(long, value_delimiter = ',', default_value = "8400")]
    decoder_alloc_port: Vec<u16>,
    /// TP ranks per decoder, when --decoder-init-port/--decoder-alloc-port list
    /// num-decoders × R ports (several decoders on one host need their own ports).
    /// Default: the whole list is one decoder's ranks, shared by every decoder.
    #[arg(long)]
    decoder_tp_size: Option<usize>,
    /// Where PD senders (LMCache `pd_proxy_host:pd_proxy_port`) notify the proxy that a
    /// request's KV reached every decoder rank. With --proxy-port the proxy waits for those
    /// notifications before it calls the decoder; without it, the prefiller's answer is
    /// the sign that the KV is saved (shared-storage and tier setups).
    #[arg(long, default_value = "localhost")]
    proxy_host: String,
    #[arg(long)]
    proxy_port: Option<u16>,
    /// The PD senders' `pd_shared_secret`, to authenticate their notifications.
    #[arg(long)]
    pd_shared_secret: Option<String>,
    /// Bound on each upstream exchange: a whole non-streaming answer, or the gap between
    /// two reads of a stream. Past it the client gets a 504.
    #[arg(long, default_value_t = 300)]
    timeout_sec: u64,
    /// Bound on connecting to an upstream server.
    #[arg(long, default_value_t = 10)]
    connect_timeout_sec: u64,
    /// Client requests handled at once.
    #[arg(long, default_value_t = 64)]
    max_concurrent_requests: usize,
}

/// `hosts` and `ports` paired into `num` instances, as LMCache's proxy pairs them: one host
/// and one port give `num` consecutive ports; otherwise 1×N, N×1 or N×N lists.
fn instances(
    what: &str,
    hosts: &[String],
    ports: &[u16],
    num: usize,
) -> Result<Vec<String>, String> {
    let pairs: Vec<(String, u16)> = match (hosts, ports) {
        ([host], [port]) => (0..num)
            .map(|i| {
                u16::try_from(i)
                    .ok()
                    .and_then(|i| port.checked_add(i))
                    .map(|p| (host.clone(), p))
                    .ok_or_else(|| format!("--{what}-port {port} + {i} is not a port"))
            })
            .collect::<Result<_, _>>()?,
        ([host], ports) => ports.iter().map(|&p| (host.clone(), p)).collect(),
        (hosts, [port]) => hosts.iter().map(|h| (h.clone(), *port)).collect(),
        (hosts, ports) if hosts.len() == ports.len() => {
            hosts.iter().cloned().zip(ports.iter().copied()).collect()
        }
        _ => {
            return Err(format!(
                "--{what}-host has {} entries and --{what}-port {}; give one of either or as many of both",
                hosts.len(),
                ports.len()
            ))
        }
    };
    if pairs.len() != num {
        return Err(format!(
            "--num-{what}s is {num} but the host and port lists name {} {what}s",
            pairs.len()
        ));
    }
    Ok(pairs
        .into_iter()
        .map(|(host, port)| format!("http://{host}:{port}"))
        .collect())
}

/// KV-ready notifications from PD senders, per request id.
struct KvReadyBoard {
    requests: Mutex<HashMap<String, Readiness>>,
    arrived: Condvar,
}

/// What the senders said so far about one request.
#[derive(Default)]
struct Readiness {
    /// Ranks whose KV is ready.
    ready: usize,
    /// The first failure a sender reported: the KV will never be complete.
    failure: Option<String>,
}

/// Why waiting for a request's KV ended without it.
enum NotReady {
    Failed(String),
    TimedOut,
}

/// Request ids a board keeps before it drops new ones (notifications nobody waits for).
const MAX_PENDING_NOTIFICATIONS: usize = 65_536;
/// Sender connections served at once.
const MAX_NOTIFY_CONNECTIONS: usize = 256;

impl KvReadyBoard {
    /// Listens on `host:port`; each connection may carry any number of notifications.
    fn listen(host: &str, port: u16, secret: Option<Vec<u8>>) -> Result<Arc<Self>, String> {
        let listener = TcpListener::bind((host, port))
            .map_err(|e| format!("listening for KV-ready notifications on {host}:{port}: {e}"))?;
        let board = Arc::new(KvReadyBoard {
            requests: Mutex::new(HashMap::new()),
            arrived: Condvar::new(),
        });
        let served = Arc::clone(&board);
        let secret = Arc::new(secret);
        let open = Arc::new(AtomicUsize::new(0));
        std::thread::Builder::new()
            .name("kv-ready".into())
            .spawn(move || {
                for stream in listener.incoming().flatten() {
                    if open.fetch_add(1, Ordering::AcqRel) >= MAX_NOTIFY_CONNECTIONS {
                        open.fetch_sub(1, Ordering::AcqRel);
                        continue;
                    }
                    let (board, secret, count) =
                        (Arc::clone(&served), Arc::clone(&secret), Arc::clone(&open));
                    // Senders open one connection per notification; a silent one is dropped.
                    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
                    let spawned = std::thread::Builder::new().spawn(move || {
                        let mut reader = std::io::BufReader::new(stream);
                        // A malformed or unauthenticated notification ends that connection.
                        while let Ok(note) = read_notification(&mut reader, secret.as_deref()) {
                            board.record(note.request_id, note.failure);
                        }
                        count.fetch_sub(1, Ordering::AcqRel);
                    });
                    if spawned.is_err() {
                        open.fetch_sub(1, Ordering::AcqRel);
                    }
                }
            })
            .map_err(|e| e.to_string())?;
        Ok(board)
    }

    fn record(&self, request_id: String, failure: Option<String>) {
        let mut requests = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        if requests.len() < MAX_PENDING_NOTIFICATIONS || requests.contains_key(&request_id) {
            let readiness = requests.entry(request_id).or_default();
            match failure {
                Some(failure) => {
                    readiness.failure.get_or_insert(failure);
                }
                None => readiness.ready += 1,
            }
            self.arrived.notify_all();
        }
    }

    /// Waits until `ranks` notifications for `request_id` say its KV is ready; stops at the
    /// first failure a sender reports, or after `timeout`.
    fn wait(&self, request_id: &str, ranks: usize, timeout: Duration) -> Result<(), NotReady> {
        let deadline = Instant::now() + timeout;
        let mut requests = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            match requests.get_mut(request_id) {
                Some(Readiness {
                    failure: Some(failure),
                    ..
                }) => {
                    let failure = std::mem::take(failure);
                    requests.remove(request_id);
                    return Err(NotReady::Failed(failure));
                }
                Some(r) if r.ready >= ranks => {
                    requests.remove(request_id);
                    return Ok(());
                }
                _ => {}
            }
            let now = Instant::now();
            if now >= deadline {
                requests.remove(request_id);
                return Err(NotReady::TimedOut);
            }
            requests = self
                .arrived
                .wait_timeout(requests, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// A decoder: its URL and the PD ports of its TP ranks.
struct Decoder {
    url: String,
    init_ports: Vec<u16>,
    alloc_ports: Vec<u16>,
}

/// Splits a PD port list into each decoder's ranks (see --decoder-tp-size).
fn ports_per_decoder(
    flag: &str,
    ports: &[u16],
    decoders: usize,
    tp_size: Option<usize>,
) -> Result<Vec<Vec<u16>>, String> {
    let ranks = tp_size.unwrap_or(ports.len());
    if ranks == 0 {
        return Err(format!(
            "--{flag} and --decoder-tp-size must name at least one rank"
        ));
    }
    if ports.len() == ranks {
        Ok(vec![ports.to_vec(); decoders])
    } else if ports.len() == ranks * decoders {
        Ok(ports.chunks(ranks).map(<[u16]>::to_vec).collect())
    } else {
        Err(format!(
            "--{flag} lists {} ports; with {decoders} decoders of {ranks} TP ranks it needs {ranks} (shared) or {}",
            ports.len(),
            ranks * decoders
        ))
    }
}

struct Proxy {
    prefillers: Vec<String>,
    decoders: Vec<Decoder>,
    agent: ureq::Agent,
    timeout: Duration,
    next: AtomicUsize,
    /// Set in PD mode (--proxy-port): prefills wait for their KV-ready notifications.
    kv_ready: Option<Arc<KvReadyBoard>>,
    /// Makes request ids unique across proxy restarts.
    id_prefix: String,
}

pub fn run(args: ProxyArgs) -> Result<ExitCode, String> {
    if args.timeout_sec == 0 || args.connect_timeout_sec == 0 {
        return Err("--timeout-sec and --connect-timeout-sec must be at least 1".into());
    }
    let prefillers = instances(
        "prefiller",
        &args.prefiller_host,
        &args.prefiller_port,
        args.num_prefillers,
    )?;
    let urls = instances(
        "decoder",
        &args.decoder_host,
        &args.decoder_port,
        args.num_decoders,
    )?;
    let init = ports_per_decoder(
        "decoder-init-port",
        &args.decoder_init_port,
        urls.len(),
        args.decoder_tp_size,
    )?;
    let alloc = ports_per_decoder(
        "decoder-alloc-port",
        &args.decoder_alloc_port,
        urls.len(),
        args.decoder_tp_size,
    )?;
    if args.decoder_init_port.len() != args.decoder_alloc_port.len() {
        return Err(format!(
            "--decoder-init-port lists {} ports and --decoder-alloc-port {}; each rank has one of each",
            args.decoder_init_port.len(),
            args.decoder_alloc_port.len()
        ));
    }
    let decoders = urls
        .into_iter()
        .zip(init.into_iter().zip(alloc))
        .map(|(url, (init_ports, alloc_ports))| Decoder {
            url,
            init_ports,
            alloc_ports,
        })
        .collect();
    let timeout = Duration::from_secs(args.timeout_sec);
    let agent = ureq::AgentBuilder::new()
        .timeout_connect(Duration::from_secs(args.connect_timeout_sec))
        .timeout_read(timeout)
        .timeout_write(timeout)
        .build();
    let kv_ready = match args.proxy_port {
        Some(port) => Some(KvReadyBoard::listen(
            &args.proxy_host,
            port,
            args.pd_shared_secret.map(String::into_bytes),
        )?),
        None => None,
    };
    let notified = kv_ready.is_some();
    let proxy = Arc::new(Proxy {
        prefillers,
        decoders,
        agent,
        timeout,
        next: AtomicUsize::new(0),
        kv_ready,
        id_prefix: format!(
            "kvrelay-proxy-{:x}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        ),
    });
    let server = Server::http((args.host.as_str(), args.port))
        .map_err(|e| format!("listening on {}:{}: {e}", args.host, args.port))?;
    let handlers = crate::http::serve_threads(server, args.max_concurrent_requests, move |r| {
        proxy.handle(r)
    })?;
    if notified {
        eprintln!(
            "kvrelay proxy: decoders are called once every rank's KV-ready notification reached {}:{}",
            args.proxy_host,
            args.proxy_port.unwrap_or_default()
        );
    }
    eprintln!("kvrelay proxy: listening on http://{}", handlers.address());
    handlers.join();
    Ok(ExitCode::SUCCESS)
}

/// The message of an upstream error body (OpenAI's or vLLM's shape), else the body.
fn upstream_message(body: &str) -> String {
    let value: Value = serde_json::from_str(body).unwrap_or(Value::Null);
    value["error"]["message"]
        .as_str()
        .or(value["message"].as_str())
        .map_or_else(|| body.to_string(), str::to_string)
}

/// What the client gets for an upstream call that did not succeed: the upstream's own
/// 4xx (the request was bad), a 504 for a timeout, a 502 otherwise.
fn upstream_error(what: &str, url: &str, error: ureq::Error) -> HttpError {
    match error {
        ureq::Error::Status(status, response) => {
            let body = response.into_string().unwrap_or_default();
            let message = upstream_message(&body);
            if (400..500).contains(&status) {
                HttpError::new(status, message)
            } else {
                HttpError::new(502, format!("{what} {url} answered {status}: {message}"))
            }
        }
        ureq::Error::Transport(transport) => {
            let timed_out = std::error::Error::source(&transport)
                .and_then(|s| s.downcast_ref::<std::io::Error>())
                .is_some_and(|e| {
                    matches!(
                        e.kind(),
                        std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
                    )
                });
            if timed_out {
                HttpError::new(504, format!("{what} {url} timed out: {transport}"))
            } else {
                HttpError::new(502, format!("{what} {url} failed: {transport}"))
            }
        }
    }
}

impl Proxy {
    fn handle(&self, mut request: Request) {
        let path = request.url().split('?').next().unwrap_or("").to_string();
        match (request.method().clone(), path.as_str()) {
            (Method::Get, "/health") => respond_bytes(request, 200, "text/plain", Vec::new()),
            (Method::Post, "/v1/completions" | "/v1/chat/completions") => {
                let n = self.next.fetch_add(1, Ordering::Relaxed);
                let decoder = &self.decoders[n % self.decoders.len()];
                let prefilled = read_json_object(&mut request)
                    .and_then(|body| self.prefill(&path, &body, n, decoder).map(|()| body));
                match prefilled {
                    Ok(body) => self.decode(request, &path, body, &decoder.url),
                    Err(e) => respond_error(request, &e),
                }
            }
            _ => respond_error(request, &HttpError::new(404, format!("no route {path}"))),
        }
    }

    fn post(&self, base: &str, path: &str) -> (String, ureq::Request) {
        let url = format!("{base}{path}");
        let call = self
            .agent
            .post(&url)
            .set("Content-Type", "application/json");
        (url, call)
    }

    /// Runs the prefill of request `n`, `body` as `max_tokens` 1 and not streamed, on its
    /// prefiller, for `decoder` to load (its PD ranks are the receivers).
    fn prefill(
        &self,
        path: &str,
        body: &Map<String, Value>,
        n: usize,
        decoder: &Decoder,
    ) -> Result<(), HttpError> {
        let mut prefill = body.clone();
        prefill.insert("max_tokens".into(), json!(1));
        if path == "/v1/chat/completions" {
            prefill.insert("max_completion_tokens".into(), json!(1));
        }
        prefill.insert("stream".into(), json!(false));
        prefill.remove("stream_options");
        let request_id = format!("{}-{n}", self.id_prefix);
        let url = &decoder.url;
        let receiver_host = url
            .trim_start_matches("http://")
            .rsplit_once(':')
            .map_or(url.as_str(), |(host, _)| host)
            .trim_start_matches('[')
            .trim_end_matches(']');
        prefill.insert(
            "kv_transfer_params".into(),
            json!({
                "disagg_spec": {
                    "req_id": request_id,
                    "receiver_host": receiver_host,
                    "receiver_init_port": decoder.init_ports,
                    "receiver_alloc_port": decoder.alloc_ports,
                }
            }),
        );
        let prefiller = &self.prefillers[n % self.prefillers.len()];
        let (url, call) = self.post(prefiller, path);
        call.timeout(self.timeout)
            .send_string(&Value::Object(prefill).to_string())
            .map_err(|e| upstream_error("prefiller", &url, e))?
            .into_string()
            .map_err(|e| HttpError::new(502, format!("reading prefiller {url}'s answer: {e}")))?;
        let ranks = decoder.init_ports.len().max(1);
        let Some(board) = &self.kv_ready else {
            return Ok(());
        };
        board
            .wait(&request_id, ranks, self.timeout)
            .map_err(|not_ready| match not_ready {
                NotReady::Failed(reason) => HttpError::new(
                    502,
                    format!("the KV of request {request_id} did not reach the decoder: {reason}"),
                ),
                NotReady::TimedOut => HttpError::new(
                    504,
                    format!(
                        "prefiller {url} answered, but {ranks} KV-ready notification(s) for request {request_id} did not arrive within {:?}",
                        self.timeout
                    ),
                ),
            })
    }

    /// Sends `body` to `decoder` and relays the answer.
    fn decode(&self, request: Request, path: &str, body: Map<String, Value>, decoder: &str) {
        let stream = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
        let (url, call) = self.post(decoder, path);
        let call = if stream {
            call
        } else {
            call.timeout(self.timeout)
        };
        let response = match call.send_string(&Value::Object(body).to_string()) {
            Ok(response) => response,
            Err(e) => return respond_error(request, &upstream_error("decoder", &url, e)),
        };
        let status = response.status();
        if !stream {
            return match response.into_string() {
                Ok(text) => respond_bytes(request, status, "application/json", text.into_bytes()),
                Err(e) => respond_error(
                    request,
                    &HttpError::new(502, format!("reading decoder {url}'s answer: {e}")),
                ),
            };
        }
        let content_type = response.content_type().to_string();
        let Ok(mut out) = ChunkedResponse::start(request, status, &content_type) else {
            return;
        };
        let mut reader = response.into_reader();
        let mut buffer = vec![0u8; 8192];
        loop {
            match reader.read(&mut buffer) {
                Ok(0) => break,
                Ok(n) => {
                    if out.send(&buffer[..n]).is_err() {
                        // The client left; dropping the reader closes the upstream stream.
                        return;
                    }
                }
                Err(e) => {
                    let error =
                        HttpError::new(502, format!("decoder {url}'s stream broke off: {e}"));
                    let _ = out.event(&error.body().to_string());
                    break;
                }
            }
        }
        let _ = out.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::ports_per_decoder;

    #[test]
    fn pd_ports_are_shared_or_split_per_decoder() {
        let shared = ports_per_decoder("p", &[7300, 7301], 3, None).unwrap();
        assert_eq!(shared, vec![vec![7300, 7301]; 3]);
        let split = ports_per_decoder("p", &[7300, 7301, 7400, 7401], 2, Some(2)).unwrap();
        assert_eq!(split, vec![vec![7300, 7301], vec![7400, 7401]]);
        let one_rank_each = ports_per_decoder("p", &[7300, 7400], 2, Some(1)).unwrap();
        assert_eq!(one_rank_each, vec![vec![7300], vec![7400]]);
        let err = ports_per_decoder("decoder-init-port", &[1, 2, 3], 2, Some(2)).unwrap_err();
        assert!(err.contains("lists 3 ports"), "{err}");
        assert!(ports_per_decoder("p", &[1], 1, Some(0)).is_err());
    }
}
