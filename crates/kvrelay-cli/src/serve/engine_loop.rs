//! The engine thread: it owns the [`Engine`], admits submissions from the HTTP handlers,
//! steps, and sends every request its new tokens after each step and its output at the end.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use kvrelay_engine::{Engine, EngineError, RequestOutput, SamplingParams};

use super::metrics::Metrics;
use crate::http::HttpError;
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
    prompt: Vec<u32>,
    params: SamplingParams,
    events: mpsc::Sender<Event>,
}

/// State the handlers and the engine thread share.
pub struct Shared {
    pub metrics: Mutex<Metrics>,
    /// Requests admitted and not finished yet (queued in the channel or in the engine).
    pub in_flight: AtomicUsize,
    /// Why the engine thread stopped, once it did.
    pub dead: Mutex<Option<String>>,
    /// A PD decoder's receive buffer, for its occupancy.
    pub pd_receiver: Option<Arc<PdReceiver>>,
}

/// The handlers' side of the engine thread.
#[derive(Clone)]
pub struct EngineHandle {
    submit: SyncSender<Submission>,
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
            pd_receiver: engine.connector().and_then(|c| c.pd_receiver.clone()),
        });
        let (submit, submissions) = mpsc::sync_channel(max_pending);
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

    /// Queues a request; its events arrive on the returned receiver. Fails with 503 when
    /// `max_pending` requests are already admitted or the engine stopped.
    pub fn submit(
        &self,
        id: String,
        prompt: Vec<u32>,
        params: SamplingParams,
    ) -> Result<Receiver<Event>, HttpError> {
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
            id,
            prompt,
            params,
            events,
        };
        match self.submit.try_send(submission) {
            Ok(()) => Ok(receiver),
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
}

/// Marks the engine dead if its thread ends without saying why (it panicked), so that
/// `/health` and new requests report it instead of waiting.
struct MarkDead(Arc<Shared>);

impl Drop for MarkDead {
    fn drop(&mut self) {
        lock(&self.0.dead).get_or_insert_with(|| "the engine thread panicked".into());
    }
}

/// A lock that survives a panicked holder: the data are counters and a message.
pub fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// An admitted request: where its events go and how many tokens it was sent.
struct Live {
    events: mpsc::Sender<Event>,
    sent: usize,
}

struct EngineLoop {
    engine: Engine,
    live: HashMap<String, Live>,
    shared: Arc<Shared>,
    stall_timeout: Duration,
}

impl EngineLoop {
    /// Serves submissions until every handle is gone or the engine fails; returns why.
    fn run(mut self, submissions: Receiver<Submission>) -> String {
        let mut last_progress = Instant::now();
        loop {
            if !self.engine.has_unfinished() {
                match submissions.recv() {
                    Ok(s) => self.admit(s),
                    Err(_) => return "the server shut down".into(),
                }
                last_progress = Instant::now();
            }
            while let Ok(s) = submissions.try_recv() {
                self.admit(s);
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

    fn admit(&mut self, s: Submission) {
        match self.engine.add_request(s.id.clone(), s.prompt, s.params) {
            Ok(()) => {
                self.live.insert(
                    s.id,
                    Live {
                        events: s.events,
                        sent: 0,
                    },
                );
            }
            Err(e) => {
                let status = if matches!(e, EngineError::BadRequest(_)) {
                    400
                } else {
                    500
                };
                self.shared.in_flight.fetch_sub(1, Ordering::SeqCst);
                lock(&self.shared.metrics).request_errors += 1;
                // The handler may be gone already; nothing else needs the event.
                let _ = s
                    .events
                    .send(Event::Failed(HttpError::new(status, e.to_string())));
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
