//! `kvrelay proxy`: LMCache's disaggregated-prefill proxy (reference/lmcache_vllm.md §4.2,
//! the "first token from decoder" variant). A completion request goes to a prefiller with
//! `max_tokens` 1 (its connector saves the prompt's KV), then unchanged to a decoder (its
//! connector loads that KV), whose answer, streamed or not, is relayed to the client.
//! Prefillers and decoders are picked round-robin; an upstream that fails or exceeds
//! `--timeout-sec` gets the client a 502 or 504, and is told to abort the request.
//!
//! Each request gets a random PD request id that names it to the prefiller, the PD senders
//! and the decoder, and stays out of client answers. A full decoder (`GET /load`) is
//! answered 503 before any prefill is spent.

use std::collections::HashMap;
use std::io::Read;
use std::net::TcpListener;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use clap::Args;
use serde_json::{json, Map, Value};

use kvrelay::transfer::{read_notification, KvReady};
use rand::RngCore;

use crate::http::{
    lock, read_json_object, respond_bytes, respond_error, ChunkedResponse, HttpError, Limits,
    Listener, Method, Request,
};
use crate::serve::DECODE_REQUEST;

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
    /// The PD senders' `pd_shared_secret`, to authenticate their notifications. Needed
    /// wherever untrusted hosts can reach --proxy-host:--proxy-port.
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

/// KV-ready notifications from PD senders, accepted only for requests the proxy issued
/// and still waits on ([`KvReadyBoard::expect`]), once per expected rank. Its state is
/// bounded by the requests in flight, whatever senders (or impostors) send.
struct KvReadyBoard {
    waiting: Mutex<HashMap<String, Readiness>>,
    arrived: Condvar,
    /// Notifications dropped: for no request waited on, from a rank not expected, or from
    /// a rank heard already.
    dropped: AtomicU64,
}

/// What the senders said so far about one request.
struct Readiness {
    /// Per expected rank, whether it reported (ready or failed): a replay does not count.
    reported: Vec<bool>,
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

/// Sender connections served at once.
const MAX_NOTIFY_CONNECTIONS: usize = 256;

impl KvReadyBoard {
    /// Listens on `host:port`; each connection may carry any number of notifications.
    fn listen(host: &str, port: u16, secret: Option<Vec<u8>>) -> Result<Arc<Self>, String> {
        let listener = TcpListener::bind((host, port))
            .map_err(|e| format!("listening for KV-ready notifications on {host}:{port}: {e}"))?;
        let reachable_from_others = listener
            .local_addr()
            .map_or(true, |address| !address.ip().is_loopback());
        if secret.is_none() && reachable_from_others {
            eprintln!(
                "kvrelay proxy: WARNING: KV-ready notifications on {host}:{port} are not authenticated; any host that reaches this address can fail requests or make them look ready. Set --pd-shared-secret (and pd_shared_secret in the PD configs)."
            );
        }
        let board = Arc::new(KvReadyBoard {
            waiting: Mutex::new(HashMap::new()),
            arrived: Condvar::new(),
            dropped: AtomicU64::new(0),
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
                            board.record(note);
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

    /// Accepts notifications for `request_id` from ranks `0..ranks` until the returned
    /// guard is dropped.
    fn expect(&self, request_id: &str, ranks: usize) -> Expected<'_> {
        lock(&self.waiting).insert(
            request_id.to_string(),
            Readiness {
                reported: vec![false; ranks],
                ready: 0,
                failure: None,
            },
        );
        Expected {
            board: self,
            request_id: request_id.to_string(),
        }
    }

    fn record(&self, note: KvReady) {
        let mut waiting = lock(&self.waiting);
        let verdict = match waiting.get_mut(&note.request_id) {
            None => Err("no request waits for it"),
            Some(readiness) => match usize::try_from(note.rank)
                .ok()
                .and_then(|rank| readiness.reported.get_mut(rank))
            {
                None => Err("the decoder has no such rank"),
                Some(true) => Err("that rank already reported"),
                Some(reported) => {
                    *reported = true;
                    match note.failure.clone() {
                        Some(failure) => {
                            readiness.failure.get_or_insert(failure);
                        }
                        None => readiness.ready += 1,
                    }
                    Ok(())
                }
            },
        };
        drop(waiting);
        match verdict {
            Ok(()) => self.arrived.notify_all(),
            Err(why) => {
                let dropped = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                // Counted always, logged at powers of two: a flood must not flood the log.
                if dropped.is_power_of_two() {
                    eprintln!(
                        "kvrelay proxy: {dropped} KV-ready notification(s) dropped so far; the latest, for request {:?} rank {}: {why}",
                        note.request_id, note.rank
                    );
                }
            }
        }
    }
}

/// A request whose KV-ready notifications the board accepts; dropping it forgets them.
struct Expected<'a> {
    board: &'a KvReadyBoard,
    request_id: String,
}

impl Expected<'_> {
    /// Waits until every expected rank said the KV is ready; stops at the first failure a
    /// rank reports, or after `timeout`.
    fn wait(&self, timeout: Duration) -> Result<(), NotReady> {
        let deadline = Instant::now() + timeout;
        let mut waiting = lock(&self.board.waiting);
        loop {
            let readiness = waiting
                .get(&self.request_id)
                .expect("an expected request stays on the board until dropped");
            if let Some(failure) = &readiness.failure {
                return Err(NotReady::Failed(failure.clone()));
            }
            if readiness.ready == readiness.reported.len() {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(NotReady::TimedOut);
            }
            waiting = self
                .board
                .arrived
                .wait_timeout(waiting, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

impl Drop for Expected<'_> {
    fn drop(&mut self) {
        lock(&self.board.waiting).remove(&self.request_id);
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
    });
    let listener = Listener::bind(&args.host, args.port)?;
    if notified {
        eprintln!(
            "kvrelay proxy: decoders are called once every rank's KV-ready notification reached {}:{}",
            args.proxy_host,
            args.proxy_port.unwrap_or_default()
        );
    }
    eprintln!("kvrelay proxy: listening on http://{}", listener.address());
    let limits = Limits::with_handlers(args.max_concurrent_requests);
    listener.serve(limits, move |request| proxy.handle(request))?;
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
/// 4xx (the request was bad) or 503 (it is full: retry), a 504 for a timeout, a 502
/// otherwise.
fn upstream_error(what: &str, url: &str, error: ureq::Error) -> HttpError {
    match error {
        ureq::Error::Status(status, response) => {
            let body = response.into_string().unwrap_or_default();
            let message = upstream_message(&body);
            if (400..500).contains(&status) || status == 503 {
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

/// A PD request id no client or sender can guess: 128 bits from the OS's CSPRNG. Guessing
/// one would let a peer make a request look ready, fail it, or abort it.
fn new_request_id() -> Result<String, HttpError> {
    let mut bits = [0u8; 16];
    rand::rngs::OsRng
        .try_fill_bytes(&mut bits)
        .map_err(|e| HttpError::new(500, format!("drawing a request id: {e}")))?;
    let hex: String = bits.iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!("kvrelay-proxy-{hex}"))
}

/// Bound on telling an upstream to abort a request the proxy gave up on.
const ABORT_TIMEOUT: Duration = Duration::from_secs(5);

/// One client request on its way through a prefiller and a decoder.
struct Route<'a> {
    /// The PD request id; it names the request to senders, prefiller and decoder, and
    /// only the proxy's log shows it.
    id: String,
    prefiller: &'a str,
    decoder: &'a Decoder,
}

impl Proxy {
    fn handle(&self, request: Request) {
        let path = request.path().to_string();
        match (request.method().clone(), path.as_str()) {
            (Method::GET, "/health") => respond_bytes(request, 200, "text/plain", Vec::new()),
            (Method::POST, "/v1/completions" | "/v1/chat/completions") => {
                self.complete(request, &path)
            }
            (_, "/health" | "/v1/completions" | "/v1/chat/completions") => respond_error(
                request,
                &HttpError::new(405, format!("method not allowed on {path}")),
            ),
            _ => respond_error(request, &HttpError::new(404, format!("no route {path}"))),
        }
    }

    /// Prefills, waits for the KV, and relays the decoder's answer to a completion request.
    fn complete(&self, request: Request, path: &str) {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let ready = read_json_object(&request).and_then(|body| Ok((body, new_request_id()?)));
        let (body, id) = match ready {
            Ok(ready) => ready,
            Err(e) => return respond_error(request, &e),
        };
        let route = Route {
            id,
            prefiller: &self.prefillers[n % self.prefillers.len()],
            decoder: &self.decoders[n % self.decoders.len()],
        };
        if let Err(e) = self.decoder_has_room(&route.decoder.url) {
            // Nothing ran upstream yet: nothing to abort.
            return respond_error(request, &e);
        }
        // Registered before the prefill: its sender may notify before the prefiller answers.
        let expected = self
            .kv_ready
            .as_ref()
            .map(|board| board.expect(&route.id, route.decoder.init_ports.len().max(1)));
        let prefilled = self
            .prefill(path, &body, &route)
            .and_then(|()| match &expected {
                Some(expected) => self.wait_for_kv(expected, &route),
                None => Ok(()),
            });
        drop(expected);
        match prefilled {
            Ok(()) => self.decode(request, path, body, &route),
            Err(e) => self.fail(request, &e, &route),
        }
    }

    /// Checks, without spending a prefill, that the decoder can take one more request.
    /// A decoder without `GET /load` (a 404, as from vLLM) is called anyway; it answers
    /// 503 itself when full.
    fn decoder_has_room(&self, decoder: &str) -> Result<(), HttpError> {
        let url = format!("{decoder}/load");
        let load: Value = match self.agent.get(&url).timeout(self.timeout).call() {
            Ok(response) => response.into_json().unwrap_or(Value::Null),
            Err(ureq::Error::Status(404, _)) => return Ok(()),
            Err(e) => return Err(upstream_error("decoder", &url, e)),
        };
        match (load["in_flight"].as_u64(), load["max_pending"].as_u64()) {
            (Some(in_flight), Some(max_pending)) if in_flight >= max_pending => {
                Err(HttpError::new(
                    503,
                    format!(
                        "the decoder is full ({in_flight} of {max_pending} requests admitted); retry later"
                    ),
                ))
            }
            _ => Ok(()),
        }
    }

    /// Answers `error`, which the proxy logs with the request id and the client gets
    /// without it; a request that may still run upstream is aborted there.
    fn fail(&self, request: Request, error: &HttpError, route: &Route<'_>) {
        let message = error.message.replace(&route.id, "the request");
        if error.status >= 500 {
            eprintln!("kvrelay proxy: request {}: {}", route.id, error.message);
        }
        if matches!(error.status, 502 | 504) {
            self.abort_upstream(route);
        }
        respond_error(request, &HttpError::new(error.status, message));
    }

    /// Tells the prefiller and the decoder, in the background and within
    /// [`ABORT_TIMEOUT`], to drop the request: its engine work, blocks and PD pages.
    fn abort_upstream(&self, route: &Route<'_>) {
        let targets = [route.prefiller.to_string(), route.decoder.url.clone()];
        let (agent, id) = (self.agent.clone(), route.id.clone());
        let spawned = std::thread::Builder::new()
            .name("abort".into())
            .spawn(move || {
                let body = json!({ "request_ids": [id] }).to_string();
                for base in targets {
                    let url = format!("{base}/abort_requests");
                    let sent = agent
                        .post(&url)
                        .set("Content-Type", "application/json")
                        .timeout(ABORT_TIMEOUT)
                        .send_string(&body);
                    // A 404 is an upstream without the endpoint (vLLM): nothing to do.
                    if let Err(e) = sent.map_err(|e| upstream_error("abort", &url, e)) {
                        if e.status != 404 {
                            eprintln!("kvrelay proxy: aborting request {id}: {e}");
                        }
                    }
                }
            });
        if let Err(e) = spawned {
            eprintln!("kvrelay proxy: aborting request {}: {e}", route.id);
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

    /// Runs the prefill of `body` as `max_tokens` 1 and not streamed on the route's
    /// prefiller, for its decoder to load (its PD ranks are the receivers).
    fn prefill(
        &self,
        path: &str,
        body: &Map<String, Value>,
        route: &Route<'_>,
    ) -> Result<(), HttpError> {
        let mut prefill = body.clone();
        // The client's limits, for the prefiller to check the context the decoder needs.
        let decode_limits: Map<String, Value> = ["max_tokens", "max_completion_tokens"]
            .into_iter()
            .filter_map(|field| Some((field.to_string(), body.get(field)?.clone())))
            .collect();
        prefill.insert("max_tokens".into(), json!(1));
        if path == "/v1/chat/completions" {
            prefill.insert("max_completion_tokens".into(), json!(1));
        }
        prefill.insert("stream".into(), json!(false));
        prefill.remove("stream_options");
        let decoder = route.decoder;
        let receiver_host = decoder
            .url
            .trim_start_matches("http://")
            .rsplit_once(':')
            .map_or(decoder.url.as_str(), |(host, _)| host)
            .trim_start_matches('[')
            .trim_end_matches(']');
        prefill.insert(
            "kv_transfer_params".into(),
            json!({
                "disagg_spec": {
                    "req_id": route.id,
                    "receiver_host": receiver_host,
                    "receiver_init_port": decoder.init_ports,
                    "receiver_alloc_port": decoder.alloc_ports,
                },
                DECODE_REQUEST: decode_limits,
            }),
        );
        let (url, call) = self.post(route.prefiller, path);
        call.timeout(self.timeout)
            .send_string(&Value::Object(prefill).to_string())
            .map_err(|e| upstream_error("prefiller", &url, e))?
            .into_string()
            .map_err(|e| HttpError::new(502, format!("reading prefiller {url}'s answer: {e}")))?;
        Ok(())
    }

    /// Waits for every decoder rank's KV-ready notification.
    fn wait_for_kv(&self, expected: &Expected<'_>, route: &Route<'_>) -> Result<(), HttpError> {
        expected.wait(self.timeout).map_err(|not_ready| match not_ready {
            NotReady::Failed(reason) => HttpError::new(
                502,
                format!("the request's KV did not reach the decoder: {reason}"),
            ),
            NotReady::TimedOut => HttpError::new(
                504,
                format!(
                    "prefiller {} answered, but the {} KV-ready notification(s) for the request's KV did not arrive within {:?}",
                    route.prefiller,
                    route.decoder.init_ports.len().max(1),
                    self.timeout
                ),
            ),
        })
    }

    /// Sends `body` to the route's decoder, under the PD request id (its engine request is
    /// then the one the KV and an abort name), and relays the answer.
    fn decode(
        &self,
        request: Request,
        path: &str,
        mut body: Map<String, Value>,
        route: &Route<'_>,
    ) {
        body.insert(
            "kv_transfer_params".into(),
            json!({ "disagg_spec": { "req_id": route.id } }),
        );
        let stream = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
        let (url, call) = self.post(&route.decoder.url, path);
        let call = if stream {
            call
        } else {
            call.timeout(self.timeout)
        };
        let response = match call.send_string(&Value::Object(body).to_string()) {
            Ok(response) => response,
            Err(e) => return self.fail(request, &upstream_error("decoder", &url, e), route),
        };
        let status = response.status();
        if !stream {
            return match response.into_string() {
                Ok(text) => respond_bytes(request, status, "application/json", text.into_bytes()),
                Err(e) => self.fail(
                    request,
                    &HttpError::new(502, format!("reading decoder {url}'s answer: {e}")),
                    route,
                ),
            };
        }
        let content_type = response.content_type().to_string();
        let Ok(mut out) = ChunkedResponse::start(request, status, &content_type) else {
            return self.abort_upstream(route);
        };
        let mut reader = response.into_reader();
        let mut buffer = vec![0u8; 8192];
        loop {
            match reader.read(&mut buffer) {
                Ok(0) => break,
                Ok(n) => {
                    if out.send(&buffer[..n]).is_err() {
                        // The client left: the decoder need not finish its answer.
                        return self.abort_upstream(route);
                    }
                }
                Err(e) => {
                    eprintln!(
                        "kvrelay proxy: request {}: decoder {url}'s stream broke off: {e}",
                        route.id
                    );
                    self.abort_upstream(route);
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
