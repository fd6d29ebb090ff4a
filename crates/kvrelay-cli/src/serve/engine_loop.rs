//! The engine thread: it owns the [`Engine`], admits submissions from the HTTP handlers,
//! steps, and sends every request its new tokens after each step and its output at the end.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use kvrelay_engine::{
    AbortOutcome, Engine, EngineError, FinishReason, RequestOutput, SamplingParams,
};

use super::metrics::Metrics;
use crate::http::{lock, HttpError};
use kvrelay::transfer::PdReceiver;

/// What the engine tells a request's handler.
#[derive(Debug)]
pub enum Event {
    /// Tokens sampled since the last event, in order.
    Tokens(Vec<u32>),
    /// The request finished; its output holds every token.
    Finished(Box<RequestOutput>),
    /// The request was refused or the engine failed; no more events follow.
    Failed(HttpError),
}

struct Submission {
    id: String,
    /// `id` is the PD request id a proxy gave the request.
    pd: bool,
    prompt: Vec<u32>,
    params: SamplingParams,
    events: mpsc::Sender<Event>,
}

/// Which requests an abort may end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AbortScope {
    /// The request of a handler that stopped listening.
    Any,
    /// Requests known by their PD request id: ids a caller can only know by having issued
    /// them (`POST /abort_requests`). Ids not in the engine free their PD buffer pages.
    PdOnly,
}

/// What the handlers ask of the engine thread.
enum Command {
    Submit(Submission),
    Abort {
        ids: Vec<String>,
        scope: AbortScope,
        /// Gets the ids that named a request (or PD buffer pages) and were ended.
        done: Option<mpsc::Sender<Vec<String>>>,
    },
}

/// State the handlers and the engine thread share.
pub struct Shared {
    pub metrics: Mutex<Metrics>,
    /// Requests admitted and not finished yet (queued in the channel or in the engine).
    pub in_flight: AtomicUsize,
    /// Why the engine thread stopped, once it did.
    pub dead: Mutex<Option<String>>,
    /// A PD decoder's receive buffers, one per TP rank, for their occupancy.
    pub pd_receivers: Vec<Arc<PdReceiver>>,
}

/// The handlers' side of the engine thread.
#[derive(Clone)]
pub struct EngineHandle {
    submit: SyncSender<Command>,
    shared: Arc<Shared>,
    max_pending: usize,
}

impl EngineHandle {
    /// Starts the engine thread over `engine`. At most `max_pending` requests are admitted
    /// at a time; a request that makes no progress for `stall_timeout` fails.
    pub fn spawn(
        engine: Engine,
        max_pending: usize,
        stall_timeout: Duration,
    ) -> std::io::Result<(Self, Arc<Shared>)> {
        let shared = Arc::new(Shared {
            metrics: Mutex::new(Metrics::default()),
            in_flight: AtomicUsize::new(0),
            dead: Mutex::new(None),
            pd_receivers: engine
                .connectors()
                .filter_map(|c| c.pd_receiver.clone())
                .collect(),
        });
        // Submissions are bounded by `max_pending` (see `submit`); the other half of the
        // queue keeps room for aborts.
        let (submit, submissions) = mpsc::sync_channel(2 * max_pending);
        let thread_shared = shared.clone();
        std::thread::Builder::new()
            .name("engine".into())
            .spawn(move || {
                let _mark = MarkDead(thread_shared.clone());
                let reason = EngineLoop {
                    engine,
                    live: HashMap::new(),
                    shared: thread_shared.clone(),
                    stall_timeout,
                }
                .run(submissions);
                *lock(&thread_shared.dead) = Some(reason);
            })?;
        let handle = EngineHandle {
            submit,
            shared: shared.clone(),
            max_pending,
        };
        Ok((handle, shared))
    }

    /// Requests admitted at once (`--max-pending-requests`).
    pub fn max_pending(&self) -> usize {
        self.max_pending
    }

    /// Queues request `id` (a PD request id when `pd`); its events arrive through the
    /// returned [`RequestEvents`], which aborts the request if dropped before it ended.
    /// Fails with 503 when `max_pending` requests are already admitted or the engine
    /// stopped.
    pub fn submit(
        &self,
        id: String,
        pd: bool,
        prompt: Vec<u32>,
        params: SamplingParams,
    ) -> Result<RequestEvents, HttpError> {
        if let Some(reason) = lock(&self.shared.dead).as_ref() {
            return Err(HttpError::new(503, format!("the engine stopped: {reason}")));
        }
        let admitted =
            self.shared
                .in_flight
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                    (n < self.max_pending).then_some(n + 1)
                });
        if admitted.is_err() {
            lock(&self.shared.metrics).requests_rejected += 1;
            return Err(HttpError::new(
                503,
                format!(
                    "the server already holds {} pending requests (--max-pending-requests); retry later",
                    self.max_pending
                ),
            ));
        }
        let (events, receiver) = mpsc::channel();
        let submission = Submission {
            id: id.clone(),
            pd,
            prompt,
            params,
            events,
        };
        match self.submit.try_send(Command::Submit(submission)) {
            Ok(()) => Ok(RequestEvents {
                events: receiver,
                engine: self.clone(),
                id,
                ended: false,
            }),
            Err(e) => {
                self.shared.in_flight.fetch_sub(1, Ordering::SeqCst);
                Err(HttpError::new(
                    503,
                    match e {
                        TrySendError::Full(_) => "the request queue is full; retry later".into(),
                        TrySendError::Disconnected(_) => "the engine stopped".to_string(),
                    },
                ))
            }
        }
    }

    /// Asks the engine thread to end `ids` (see [`AbortScope`]); with `done`, it sends back
    /// the ids it ended. Waits only while the command queue is full.
    pub fn abort(
        &self,
        ids: Vec<String>,
        scope: AbortScope,
        done: Option<mpsc::Sender<Vec<String>>>,
    ) {
        // A stopped engine has nothing left to abort.
        let _ = self.submit.send(Command::Abort { ids, scope, done });
    }
}

/// One admitted request's events. Dropped before the request ended (its client left, or
/// its handler gave up waiting), it aborts the request, which stops costing engine time,
/// KV blocks and PD buffer pages.
pub struct RequestEvents {
    events: Receiver<Event>,
    engine: EngineHandle,
    id: String,
    ended: bool,
}

impl RequestEvents {
    /// The next event, waiting at most `timeout`.
    pub fn recv_timeout(&mut self, timeout: Duration) -> Result<Event, RecvTimeoutError> {
        let event = self.events.recv_timeout(timeout);
        if matches!(
            event,
            Ok(Event::Finished(_) | Event::Failed(_)) | Err(RecvTimeoutError::Disconnected)
        ) {
            self.ended = true;
        }
        event
    }
}

impl Drop for RequestEvents {
    fn drop(&mut self) {
        if !self.ended {
            self.engine
                .abort(vec![std::mem::take(&mut self.id)], AbortScope::Any, None);
        }
    }
}

/// Marks the engine dead if its thread ends without saying why (it panicked), so that
/// `/health` and new requests report it instead of waiting.
struct MarkDead(Arc<Shared>);

impl Drop for MarkDead {
    fn drop(&mut self) {
        lock(&self.0.dead).get_or_insert_with(|| "the engine thread panicked".into());
    }
}

/// Frees the PD buffer pages of `pd_request_id`, a request this decoder refused, on every
/// rank: its KV will never be loaded, and should not hold pages until the buffer's TTL.
/// Returns whether any rank held some.
pub fn cancel_pd_pages(shared: &Shared, pd_request_id: &str) -> bool {
    shared.pd_receivers.iter().fold(false, |held, receiver| {
        receiver.cancel(pd_request_id) | held
    })
}

/// An admitted request: where its events go and how many tokens it was sent.
struct Live {
    events: mpsc::Sender<Event>,
    sent: usize,
    /// Known by its PD request id (see [`AbortScope::PdOnly`]).
    pd: bool,
}

struct EngineLoop {
    engine: Engine,
    live: HashMap<String, Live>,
    shared: Arc<Shared>,
    stall_timeout: Duration,
}

impl EngineLoop {
    /// Serves submissions until every handle is gone or the engine fails; returns why.
    fn run(mut self, commands: Receiver<Command>) -> String {
        let mut last_progress = Instant::now();
        loop {
            if !self.engine.has_unfinished() {
                match commands.recv() {
                    Ok(command) => self.obey(command),
                    Err(_) => return "the server shut down".into(),
                }
                last_progress = Instant::now();
            }
            while let Ok(command) = commands.try_recv() {
                self.obey(command);
            }
            if !self.engine.has_unfinished() {
                continue;
            }
            let before = (self.engine.stats().computed_tokens, self.live.len());
            let finished = match self.engine.step() {
                Ok(finished) => finished,
                Err(e) => return self.fail_all(format!("engine step failed: {e}")),
            };
            let progressed = !finished.is_empty()
                || before != (self.engine.stats().computed_tokens, self.live.len());
            for output in finished {
                self.finish(output);
            }
            self.stream_new_tokens();
            if progressed || self.live.is_empty() {
                last_progress = Instant::now();
                continue;
            }
            if last_progress.elapsed() > self.stall_timeout {
                return self.fail_all(format!(
                    "no progress for {:?} (asynchronous KV loads never finished)",
                    self.stall_timeout
                ));
            }
            // Only asynchronous transfers are left to finish: poll, don't spin.
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn obey(&mut self, command: Command) {
        match command {
            Command::Submit(submission) => self.admit(submission),
            Command::Abort { ids, scope, done } => {
                let ended: Vec<String> =
                    ids.into_iter().filter(|id| self.abort(id, scope)).collect();
                if let Some(done) = done {
                    // The caller may have stopped waiting.
                    let _ = done.send(ended);
                }
            }
        }
    }

    /// Ends request `id` if `scope` allows; returns whether something was ended.
    fn abort(&mut self, id: &str, scope: AbortScope) -> bool {
        match self.live.get(id) {
            Some(live) if scope == AbortScope::Any || live.pd => {
                match self.engine.abort_request(id) {
                    AbortOutcome::Finished(output) => {
                        self.finish(*output);
                        true
                    }
                    AbortOutcome::WhenLoaded => true,
                    AbortOutcome::NotFound => false,
                }
            }
            Some(_) => false,
            // KV pushed for a request this decoder never got (or already refused).
            None if scope == AbortScope::PdOnly => cancel_pd_pages(&self.shared, id),
            None => false,
        }
    }

    fn admit(&mut self, s: Submission) {
        let refused = if self.live.contains_key(&s.id) {
            // Its pages belong to the request already running under this id.
            Some(HttpError::bad_request(
                "a request with this `kv_transfer_params.disagg_spec.req_id` is already running",
            ))
        } else {
            match self.engine.add_request(s.id.clone(), s.prompt, s.params) {
                Ok(()) => None,
                Err(e) => {
                    if s.pd {
                        cancel_pd_pages(&self.shared, &s.id);
                    }
                    let status = if matches!(e, EngineError::BadRequest(_)) {
                        400
                    } else {
                        500
                    };
                    Some(HttpError::new(status, e.to_string()))
                }
            }
        };
        match refused {
            None => {
                self.live.insert(
                    s.id,
                    Live {
                        events: s.events,
                        sent: 0,
                        pd: s.pd,
                    },
                );
            }
            Some(error) => {
                self.shared.in_flight.fetch_sub(1, Ordering::SeqCst);
                lock(&self.shared.metrics).request_errors += 1;
                // The handler may be gone already; nothing else needs the event.
                let _ = s.events.send(Event::Failed(error));
            }
        }
    }

    fn stream_new_tokens(&mut self) {
        for (id, live) in &mut self.live {
            let Some(tokens) = self.engine.output_token_ids(id) else {
                continue;
            };
            if tokens.len() > live.sent {
                // A handler whose client left stops listening; the request still finishes.
                let _ = live
                    .events
                    .send(Event::Tokens(tokens[live.sent..].to_vec()));
                live.sent = tokens.len();
            }
        }
    }

    fn finish(&mut self, output: RequestOutput) {
        let Some(live) = self.live.remove(&output.request_id) else {
            return;
        };
        if live.pd && output.finish_reason == FinishReason::Aborted {
            // What it had not loaded yet (a partial last chunk, KV still arriving) would
            // otherwise hold pages until the buffer's TTL.
            cancel_pd_pages(&self.shared, &output.request_id);
        }
        self.shared.in_flight.fetch_sub(1, Ordering::SeqCst);
        lock(&self.shared.metrics).record(&output);
        if output.output_token_ids.len() > live.sent {
            let rest = output.output_token_ids[live.sent..].to_vec();
            let _ = live.events.send(Event::Tokens(rest));
        }
        let _ = live.events.send(Event::Finished(Box::new(output)));
    }

    /// Fails every admitted request with `reason` and returns it.
    fn fail_all(&mut self, reason: String) -> String {
        for (_, live) in self.live.drain() {
            self.shared.in_flight.fetch_sub(1, Ordering::SeqCst);
            lock(&self.shared.metrics).request_errors += 1;
            let _ = live
                .events
                .send(Event::Failed(HttpError::new(500, reason.clone())));
        }
        reason
    }
}
