//! The receiver's PD buffer: fixed pages of one full chunk each, admission control,
//! received chunks by key, and page reclamation.
//!
//! A request moves through `Receiving` (pages granted, bytes arriving) to `Ready` (every
//! chunk verified, chunks findable by key) and is gone once each chunk has been consumed, or
//! when it is cancelled, its sender disconnects, or its TTL passes. A consumed chunk's page
//! stays in use until the returned [`Chunk`] (and every clone of its bytes) is dropped.
//! A cancelled id is remembered (boundedly), so its transfer arriving later is refused
//! instead of holding pages until the TTL.

use std::collections::{HashMap, VecDeque};
use std::ptr::NonNull;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::{Condvar, Mutex};

use super::frame::ChunkDecl;
use super::TransferError;
use crate::device::{DevicePage, HostBuffer};
use crate::keys::CacheKey;
use crate::store::{Chunk, ChunkMeta};

/// Where the pages live. Host memory (private, or a shared mapping for `shm`) today; device
/// memory allocated through the `Device` trait later implements the same two methods.
pub(crate) trait PageMemory: Send + Sync {
    /// Start of the memory; valid for reads and writes of `len()` bytes while `self` lives.
    fn base(&self) -> NonNull<u8>;
    fn len(&self) -> usize;
    /// Where the pages also live in device memory, when this memory is their host copy: the
    /// device's ordinal and the device address of page 0's first byte (pages follow at the
    /// same offsets as here).
    fn device(&self) -> Option<(u32, u64)> {
        None
    }
}

/// Private host memory, for the `tcp` channel.
pub(crate) struct HostPages {
    base: NonNull<u8>,
    buf: HostBuffer,
}

// SAFETY: `base` points into `buf`, which HostPages owns; HostBuffer is Send + Sync, and
// the PD buffer hands out disjoint page ranges only (see PdBuffer).
unsafe impl Send for HostPages {}
// SAFETY: as above.
unsafe impl Sync for HostPages {}

impl HostPages {
    pub(crate) fn new(len: usize) -> Result<Self, TransferError> {
        let mut buf = HostBuffer::zeroed(len)
            .map_err(|e| TransferError::Config(format!("PD buffer: {e}")))?;
        // Fault every page in now, not while the first request's bytes arrive.
        buf.fill(0);
        let base = NonNull::new(buf.as_mut_ptr())
            .ok_or_else(|| TransferError::Config("PD buffer: null allocation".into()))?;
        Ok(HostPages { base, buf })
    }
}

impl PageMemory for HostPages {
    fn base(&self) -> NonNull<u8> {
        self.base
    }
    fn len(&self) -> usize {
        self.buf.len()
    }
}

/// A snapshot of the buffer's use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Occupancy {
    pub page_size: usize,
    pub total_pages: usize,
    /// Pages granted, holding unconsumed KV, or held by chunks handed to a consumer.
    pub used_pages: usize,
    /// Requests receiving or ready.
    pub requests: usize,
    /// Allocations waiting for pages.
    pub waiting: usize,
    /// Ready requests reclaimed because their TTL passed before they were consumed in full
    /// (since the buffer was created): KV the decoder never released.
    pub expired_requests: u64,
    /// Pages those requests still held.
    pub expired_pages: u64,
}

/// A request whose chunks all arrived and verified.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadyRequest {
    pub chunks: usize,
    pub tokens: u64,
}

/// The pages granted to one request.
#[derive(Clone, Debug)]
pub(crate) struct Grant {
    pub id: u32,
    pub pages: Vec<u32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Receiving { cancelled: bool },
    Ready,
}

struct Slot {
    key: CacheKey,
    meta: ChunkMeta,
    len: usize,
    page: u32,
    /// The request still owns the page (not yet consumed or freed).
    held: bool,
}

struct Request {
    phase: Phase,
    slots: Vec<Slot>,
    held: usize,
    /// Ready: when unconsumed pages are reclaimed.
    expires: Instant,
}

/// Bounded record of requests that are gone, for `wait_ready` and to refuse transfers of
/// cancelled requests.
const ENDED_KEPT: usize = 1024;

#[derive(Clone, Copy)]
enum Ended {
    /// Every chunk was taken (possibly by another request with the same keys).
    Consumed(ReadyRequest),
    Failed(&'static str),
    /// The decoder's request ended or was cancelled: a transfer for it is refused.
    Cancelled,
}

const CANCELLED: &str = "cancelled";

struct State {
    free: Vec<u32>,
    requests: HashMap<Arc<str>, Request>,
    /// Verified chunks of ready requests, by key. Several requests may carry the same key
    /// (a shared prefix); any one of them serves it, since equal keys mean equal bytes.
    ready: HashMap<CacheKey, Vec<(Arc<str>, usize)>>,
    /// Allocation waiters in arrival order; only the head may take pages, so a large
    /// request is not starved by a stream of small ones.
    queue: VecDeque<u64>,
    next_ticket: u64,
    next_grant: u32,
    ended: VecDeque<(Arc<str>, Ended)>,
    expired_requests: u64,
    expired_pages: u64,
    closed: bool,
}

struct Shared {
    memory: Box<dyn PageMemory>,
    page_size: usize,
    num_pages: usize,
    ttl: Duration,
    state: Mutex<State>,
    changed: Condvar,
}

/// The PD buffer. Cheap to clone; clones share the pages.
#[derive(Clone)]
pub(crate) struct PdBuffer {
    shared: Arc<Shared>,
}

impl PdBuffer {
    /// `memory.len() / page_size` pages. Errors if not even one page fits.
    pub(crate) fn new(
        memory: Box<dyn PageMemory>,
        page_size: usize,
        ttl: Duration,
    ) -> Result<Self, TransferError> {
        let num_pages = memory.len().checked_div(page_size).unwrap_or(0);
        if num_pages == 0 {
            return Err(TransferError::BufferTooSmall {
                buffer_size: memory.len() as u64,
                page_size,
            });
        }
        // Page indexes travel as u32.
        let num_pages = num_pages.min(u32::MAX as usize);
        let state = State {
            free: (0..num_pages as u32).rev().collect(),
            requests: HashMap::new(),
            ready: HashMap::new(),
            queue: VecDeque::new(),
            next_ticket: 0,
            next_grant: 0,
            ended: VecDeque::new(),
            expired_requests: 0,
            expired_pages: 0,
            closed: false,
        };
        Ok(PdBuffer {
            shared: Arc::new(Shared {
                memory,
                page_size,
                num_pages,
                ttl,
                state: Mutex::new(state),
                changed: Condvar::new(),
            }),
        })
    }

    pub(crate) fn page_size(&self) -> usize {
        self.shared.page_size
    }

    pub(crate) fn num_pages(&self) -> usize {
        self.shared.num_pages
    }

    /// Pointer to byte `offset` of the buffer, for a range [`super::frame::GrantCheck`]
    /// admitted (so `offset + len <= pages * page_size`).
    pub(crate) fn ptr_at(&self, offset: usize) -> *mut u8 {
        debug_assert!(offset <= self.shared.memory.len());
        self.shared.memory.base().as_ptr().wrapping_add(offset)
    }

    /// The start of page `page` (< `num_pages()`).
    pub(crate) fn page_ptr(&self, page: usize) -> NonNull<u8> {
        debug_assert!(page < self.num_pages());
        let base = self.shared.memory.base();
        // SAFETY: a page index below num_pages() starts inside the memory, which is not
        // null; the offset cannot overflow as the memory is that large.
        unsafe { NonNull::new_unchecked(base.as_ptr().add(page * self.page_size())) }
    }

    /// Reserves one page for each chunk, all or nothing, waiting up to `timeout` for pages
    /// to come free.
    pub(crate) fn reserve(
        &self,
        request_id: &str,
        chunks: &[ChunkDecl],
        timeout: Duration,
    ) -> Result<Grant, TransferError> {
        let s = &self.shared;
        let n = chunks.len();
        if n > s.num_pages {
            return Err(TransferError::RequestTooLarge {
                request: request_id.to_string(),
                pages: n,
                total: s.num_pages,
            });
        }
        let started = Instant::now();
        let deadline = started + timeout;
        let mut st = s.state.lock();
        let ticket = st.next_ticket;
        st.next_ticket += 1;
        st.queue.push_back(ticket);
        let result = loop {
            if st.closed {
                break Err(TransferError::ShuttingDown);
            }
            if st.requests.contains_key(request_id) {
                break Err(TransferError::DuplicateRequest(request_id.to_string()));
            }
            if matches!(last_end(&st, request_id), Some(Ended::Cancelled)) {
                break Err(ended(
                    request_id,
                    "the decoder cancelled it before its KV arrived",
                ));
            }
            let now = Instant::now();
            self.expire(&mut st, now);
            if st.queue.front() == Some(&ticket) && st.free.len() >= n {
                break Ok(self.grant(&mut st, request_id, chunks));
            }
            if now >= deadline {
                break Err(TransferError::AllocationTimeout {
                    request: request_id.to_string(),
                    pages: n,
                    free: st.free.len(),
                    total: s.num_pages,
                    waited: now - started,
                });
            }
            // Wake for the deadline, or when the next ready request expires.
            let wake = next_expiry(&st).map_or(deadline, |e| e.min(deadline));
            s.changed.wait_until(&mut st, wake);
        };
        st.queue.retain(|t| *t != ticket);
        drop(st);
        // The next waiter may now be at the head.
        s.changed.notify_all();
        result
    }

    fn grant(&self, st: &mut State, request_id: &str, chunks: &[ChunkDecl]) -> Grant {
        let pages: Vec<u32> = st.free.split_off(st.free.len() - chunks.len());
        let slots = chunks
            .iter()
            .zip(&pages)
            .map(|(c, &page)| Slot {
                key: c.key.clone(),
                meta: c.meta,
                len: c.len as usize,
                page,
                held: true,
            })
            .collect();
        let id = st.next_grant;
        st.next_grant = st.next_grant.wrapping_add(1);
        st.requests.insert(
            Arc::from(request_id),
            Request {
                phase: Phase::Receiving { cancelled: false },
                slots,
                held: chunks.len(),
                expires: Instant::now() + self.shared.ttl,
            },
        );
        Grant { id, pages }
    }

    /// Ends a receiving request: with every chunk verified it becomes ready, otherwise (or
    /// if it was cancelled meanwhile) its pages are freed. Returns the rejected count.
    pub(crate) fn commit(&self, request_id: &str, verified: &[bool]) -> Result<u32, TransferError> {
        let s = &self.shared;
        let mut st = s.state.lock();
        let rejected = verified.iter().filter(|ok| !**ok).count() as u32;
        let Some(id) = st
            .requests
            .get_key_value(request_id)
            .map(|(k, _)| Arc::clone(k))
        else {
            return Err(ended(request_id, "it was reclaimed"));
        };
        let Some(req) = st.requests.get_mut(request_id) else {
            return Err(ended(request_id, "it was reclaimed"));
        };
        let cancelled = matches!(req.phase, Phase::Receiving { cancelled: true });
        if cancelled || rejected > 0 || verified.len() != req.slots.len() {
            let (reason, end) = if cancelled {
                (CANCELLED, Ended::Cancelled)
            } else {
                let reason = "chunks failed verification";
                (reason, Ended::Failed(reason))
            };
            self.remove(&mut st, request_id, end);
            drop(st);
            s.changed.notify_all();
            return if cancelled {
                Err(ended(request_id, reason))
            } else {
                Ok(rejected.max(1))
            };
        }
        req.phase = Phase::Ready;
        req.expires = Instant::now() + s.ttl;
        let keys: Vec<(CacheKey, usize)> = req
            .slots
            .iter()
            .enumerate()
            .map(|(i, slot)| (slot.key.clone(), i))
            .collect();
        for (key, i) in keys {
            st.ready.entry(key).or_default().push((Arc::clone(&id), i));
        }
        drop(st);
        s.changed.notify_all();
        Ok(0)
    }

    /// Frees a request's pages whatever its phase, except that a receiving request whose
    /// bytes may still be landing is only marked: its connection frees it at commit. With
    /// `remember_unknown`, an id not in the buffer is remembered as cancelled, so its
    /// transfer is refused if it comes later. Returns whether the request was in the buffer.
    pub(crate) fn cancel(&self, request_id: &str, remember_unknown: bool) -> bool {
        let mut st = self.shared.state.lock();
        let known = match st.requests.get_mut(request_id) {
            Some(req) if matches!(req.phase, Phase::Receiving { .. }) => {
                req.phase = Phase::Receiving { cancelled: true };
                true
            }
            Some(_) => {
                self.remove(&mut st, request_id, Ended::Cancelled);
                true
            }
            None if !remember_unknown => false,
            None => {
                match st
                    .ended
                    .iter_mut()
                    .rev()
                    .find(|(id, _)| &**id == request_id)
                {
                    Some((_, end)) => *end = Ended::Cancelled,
                    None => record_end(&mut st, Arc::from(request_id), Ended::Cancelled),
                }
                false
            }
        };
        drop(st);
        self.shared.changed.notify_all();
        known
    }

    /// The request's connection is gone before `Commit`: free its pages.
    pub(crate) fn abort(&self, request_id: &str, reason: &'static str) {
        let mut st = self.shared.state.lock();
        self.remove(&mut st, request_id, Ended::Failed(reason));
        drop(st);
        self.shared.changed.notify_all();
    }

    /// Frees a request's pages and records how it ended.
    fn remove(&self, st: &mut State, request_id: &str, end: Ended) {
        let Some((id, req)) = st.requests.remove_entry(request_id) else {
            return;
        };
        for (i, slot) in req.slots.iter().enumerate().filter(|(_, s)| s.held) {
            st.free.push(slot.page);
            if let Some(list) = st.ready.get_mut(&slot.key) {
                list.retain(|(r, j)| !(Arc::ptr_eq(r, &id) && *j == i));
                if list.is_empty() {
                    st.ready.remove(&slot.key);
                }
            }
        }
        record_end(st, id, end);
        tracing::debug!(
            request = request_id,
            reason = end.reason(),
            "PD request removed"
        );
    }

    /// Reclaims ready requests whose TTL passed.
    fn expire(&self, st: &mut State, now: Instant) {
        let expired: Vec<Arc<str>> = st
            .requests
            .iter()
            .filter(|(_, r)| r.phase == Phase::Ready && r.expires <= now)
            .map(|(id, _)| Arc::clone(id))
            .collect();
        for id in expired {
            let pages = st.requests.get(&id).map_or(0, |r| r.held);
            tracing::warn!(
                request = &*id,
                pages,
                "unconsumed PD KV expired; pages reclaimed (nothing released them when the \
                 decoder's request ended)"
            );
            st.expired_requests += 1;
            st.expired_pages += pages as u64;
            self.remove(st, &id, Ended::Failed("expired before it was consumed"));
        }
    }

    /// Takes a verified chunk out of the buffer, `owner`'s own copy when it has one: a
    /// request that took another request's copy of a shared-prefix chunk would leave its
    /// own unused, to be freed when it ends, and the other request would then miss. Its
    /// page is freed when the returned chunk's bytes (and its device page, which holds
    /// them) are dropped.
    pub(crate) fn take(&self, key: &CacheKey, owner: Option<&str>) -> Option<Chunk> {
        let s = &self.shared;
        let mut st = s.state.lock();
        self.expire(&mut st, Instant::now());
        let list = st.ready.get_mut(key)?;
        let own = owner.and_then(|owner| list.iter().position(|(id, _)| &**id == owner));
        let (id, i) = list.remove(own.unwrap_or(0));
        if list.is_empty() {
            st.ready.remove(key);
        }
        let req = st.requests.get_mut(&id)?;
        let slot = &mut req.slots[i];
        slot.held = false;
        let (meta, page, len) = (slot.meta, slot.page, slot.len);
        req.held -= 1;
        if req.held == 0 {
            let info = ready_info(req);
            st.requests.remove(&id);
            record_end(&mut st, id, Ended::Consumed(info));
        }
        let lease = PageLease {
            shared: Arc::clone(s),
            page,
            len,
        };
        let data = Bytes::from_owner(lease);
        let device = s.memory.device().map(|(ordinal, base)| {
            let addr = base + (page as usize * s.page_size) as u64;
            DevicePage::new(ordinal, addr, len, data.clone())
        });
        Some(Chunk { meta, data, device })
    }

    pub(crate) fn contains(&self, key: &CacheKey) -> bool {
        self.shared.state.lock().ready.contains_key(key)
    }

    pub(crate) fn wait_ready(
        &self,
        request_id: &str,
        timeout: Duration,
    ) -> Result<ReadyRequest, TransferError> {
        let s = &self.shared;
        let started = Instant::now();
        let deadline = started + timeout;
        let mut st = s.state.lock();
        loop {
            let now = Instant::now();
            self.expire(&mut st, now);
            if let Some(req) = st.requests.get(request_id) {
                if req.phase == Phase::Ready {
                    return Ok(ready_info(req));
                }
            } else if let Some(end) = last_end(&st, request_id) {
                return match end {
                    Ended::Consumed(info) => Ok(info),
                    failed => Err(ended(request_id, failed.reason())),
                };
            }
            if st.closed {
                return Err(TransferError::ShuttingDown);
            }
            if now >= deadline {
                return Err(TransferError::WaitTimeout {
                    request: request_id.to_string(),
                    waited: now - started,
                });
            }
            s.changed.wait_until(&mut st, deadline);
        }
    }

    pub(crate) fn occupancy(&self) -> Occupancy {
        let s = &self.shared;
        let mut st = s.state.lock();
        self.expire(&mut st, Instant::now());
        Occupancy {
            page_size: s.page_size,
            total_pages: s.num_pages,
            used_pages: s.num_pages - st.free.len(),
            requests: st.requests.len(),
            waiting: st.queue.len(),
            expired_requests: st.expired_requests,
            expired_pages: st.expired_pages,
        }
    }

    /// Fails every waiter; used when the receiver shuts down.
    pub(crate) fn close(&self) {
        self.shared.state.lock().closed = true;
        self.shared.changed.notify_all();
    }
}

fn ended(request_id: &str, reason: &str) -> TransferError {
    TransferError::RequestEnded {
        request: request_id.to_string(),
        reason: reason.to_string(),
    }
}

fn ready_info(req: &Request) -> ReadyRequest {
    ReadyRequest {
        chunks: req.slots.len(),
        tokens: req.slots.iter().map(|s| u64::from(s.meta.num_tokens)).sum(),
    }
}

impl Ended {
    fn reason(self) -> &'static str {
        match self {
            Ended::Consumed(_) => "consumed",
            Ended::Failed(reason) => reason,
            Ended::Cancelled => CANCELLED,
        }
    }
}

/// How `request_id` ended, if it is among the requests remembered.
fn last_end(st: &State, request_id: &str) -> Option<Ended> {
    st.ended
        .iter()
        .rev()
        .find(|(id, _)| &**id == request_id)
        .map(|(_, end)| *end)
}

fn record_end(st: &mut State, id: Arc<str>, end: Ended) {
    if st.ended.len() == ENDED_KEPT {
        st.ended.pop_front();
    }
    st.ended.push_back((id, end));
}

fn next_expiry(st: &State) -> Option<Instant> {
    st.requests
        .values()
        .filter(|r| r.phase == Phase::Ready)
        .map(|r| r.expires)
        .min()
}

/// A consumed chunk's page: readable until dropped, then free again.
struct PageLease {
    shared: Arc<Shared>,
    page: u32,
    len: usize,
}

impl AsRef<[u8]> for PageLease {
    fn as_ref(&self) -> &[u8] {
        let offset = self.page as usize * self.shared.page_size;
        // SAFETY: page < num_pages and len <= page_size (checked when granted), so the
        // range lies in the memory, which `shared` keeps alive. The page is neither free nor
        // granted while this lease exists, so nothing writes it.
        unsafe {
            std::slice::from_raw_parts(self.shared.memory.base().as_ptr().add(offset), self.len)
        }
    }
}

impl Drop for PageLease {
    fn drop(&mut self) {
        self.shared.state.lock().free.push(self.page);
        self.shared.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transfer::ErrorCode;
    use crate::KvDtype;

    fn buffer(pages: usize) -> PdBuffer {
        PdBuffer::new(
            Box::new(HostPages::new(pages * 64).unwrap()),
            64,
            Duration::from_secs(60),
        )
        .unwrap()
    }

    fn one_chunk() -> Vec<ChunkDecl> {
        vec![ChunkDecl {
            key: CacheKey::new("m", 1, 0, 7, KvDtype::Bf16).unwrap(),
            meta: ChunkMeta {
                layout_fingerprint: 1,
                num_tokens: 1,
            },
            len: 64,
        }]
    }

    #[test]
    fn cancelled_ids_are_refused_and_remembered_boundedly() {
        let buffer = buffer(2);
        assert!(!buffer.cancel("local", false));
        for i in 0..=ENDED_KEPT {
            assert!(!buffer.cancel(&format!("gone-{i}"), true));
        }
        let refused = buffer.reserve(&format!("gone-{ENDED_KEPT}"), &one_chunk(), Duration::ZERO);
        assert!(
            matches!(&refused, Err(e) if e.code() == ErrorCode::Cancelled),
            "{:?}",
            refused.err()
        );
        // The oldest record made room for the newest; that id is admitted again.
        assert!(buffer
            .reserve("gone-0", &one_chunk(), Duration::ZERO)
            .is_ok());
        assert_eq!(buffer.shared.state.lock().ended.len(), ENDED_KEPT);
        // Released without being remembered: a local id stays free to use.
        assert!(buffer
            .reserve("local", &one_chunk(), Duration::ZERO)
            .is_ok());
        // Cancelling an id twice does not grow the record.
        buffer.cancel("gone-1", true);
        buffer.cancel("gone-1", true);
        assert_eq!(buffer.shared.state.lock().ended.len(), ENDED_KEPT);
    }
}
