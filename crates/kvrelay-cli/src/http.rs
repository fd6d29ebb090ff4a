//! What `kvrelay serve` and `kvrelay proxy` share on the HTTP side: OpenAI-style error
//! bodies, bounded JSON request bodies, a chunked response written one event at a time,
//! and the lock their handler threads share state under.

use std::io::{self, Read, Write};
use std::sync::{Arc, Mutex, MutexGuard};

use serde_json::{json, Value};
use tiny_http::{Header, Request, Response, Server, StatusCode};

/// The largest request body either server reads.
pub const MAX_BODY_BYTES: u64 = 16 << 20;

/// An answer that is not a success: the status code and the message the client sees.
#[derive(Debug, thiserror::Error)]
#[error("{status}: {message}")]
pub struct HttpError {
    pub status: u16,
    pub message: String,
}

impl HttpError {
    pub fn new(status: u16, message: impl Into<String>) -> Self {
        HttpError {
            status,
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        HttpError::new(400, message)
    }

    /// The OpenAI error object.
    pub fn body(&self) -> Value {
        json!({
            "error": {
                "message": self.message,
                "type": error_type(self.status),
                "param": null,
                "code": self.status,
            }
        })
    }
}

fn error_type(status: u16) -> &'static str {
    match status {
        400 => "BadRequestError",
        404 => "NotFoundError",
        405 => "MethodNotAllowed",
        413 => "RequestTooLarge",
        503 => "ServiceUnavailableError",
        502 => "BadGateway",
        504 => "GatewayTimeout",
        _ => "InternalServerError",
    }
}

/// A header from names and values this program spells itself.
pub fn header(name: &str, value: &str) -> Header {
    Header::from_bytes(name.as_bytes(), value.as_bytes()).expect("a well-formed static header")
}

/// Answers `request` with `body` as JSON. A client that went away is not an error here.
pub fn respond_json(request: Request, status: u16, body: &Value) {
    respond_bytes(
        request,
        status,
        "application/json",
        body.to_string().into_bytes(),
    );
}

/// Seconds a client told 503 should wait before it retries.
pub const RETRY_AFTER_SEC: u32 = 1;

/// Answers `request` with `error`'s OpenAI body; a 503 says when to retry.
pub fn respond_error(request: Request, error: &HttpError) {
    let mut response = Response::from_data(error.body().to_string().into_bytes())
        .with_status_code(StatusCode(error.status))
        .with_header(header("Content-Type", "application/json"));
    if error.status == 503 {
        response.add_header(header("Retry-After", &RETRY_AFTER_SEC.to_string()));
    }
    // The client may have closed the connection; there is nobody left to tell.
    let _ = request.respond(response);
}

pub fn respond_bytes(request: Request, status: u16, content_type: &str, body: Vec<u8>) {
    let response = Response::from_data(body)
        .with_status_code(StatusCode(status))
        .with_header(header("Content-Type", content_type));
    // The client may have closed the connection; there is nobody left to tell.
    let _ = request.respond(response);
}

/// The request body as a JSON object, at most [`MAX_BODY_BYTES`].
pub fn read_json_object(
    request: &mut Request,
) -> Result<serde_json::Map<String, Value>, HttpError> {
    let mut body = Vec::new();
    request
        .as_reader()
        .take(MAX_BODY_BYTES + 1)
        .read_to_end(&mut body)
        .map_err(|e| HttpError::bad_request(format!("reading the request body: {e}")))?;
    if body.len() as u64 > MAX_BODY_BYTES {
        return Err(HttpError::new(
            413,
            format!("the request body exceeds {MAX_BODY_BYTES} bytes"),
        ));
    }
    match serde_json::from_slice(&body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(HttpError::bad_request(
            "the request body must be a JSON object",
        )),
        Err(e) => Err(HttpError::bad_request(format!(
            "the request body is not valid JSON: {e}"
        ))),
    }
}

/// A response whose body is sent as HTTP/1.1 chunks, flushed one by one, so that every
/// server-sent event reaches the client when it is written.
pub struct ChunkedResponse {
    writer: Box<dyn Write + Send>,
}

impl ChunkedResponse {
    /// Sends the status line and headers.
    pub fn start(request: Request, status: u16, content_type: &str) -> io::Result<Self> {
        let reason = StatusCode(status).default_reason_phrase();
        let mut writer = request.into_writer();
        write!(
            writer,
            "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nCache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n"
        )?;
        writer.flush()?;
        Ok(ChunkedResponse { writer })
    }

    /// Sends `data` as one chunk (nothing for empty data: an empty chunk ends the body).
    pub fn send(&mut self, data: &[u8]) -> io::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        write!(self.writer, "{:x}\r\n", data.len())?;
        self.writer.write_all(data)?;
        self.writer.write_all(b"\r\n")?;
        self.writer.flush()
    }

    /// Sends one server-sent event, `data: <payload>`.
    pub fn event(&mut self, payload: &str) -> io::Result<()> {
        self.send(format!("data: {payload}\n\n").as_bytes())
    }

    /// Ends the body.
    pub fn finish(mut self) -> io::Result<()> {
        self.writer.write_all(b"0\r\n\r\n")?;
        self.writer.flush()
    }
}

/// Handler threads answering one server's requests.
pub struct Handlers {
    address: String,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Handlers {
    /// The address the server listens on, with the port it got.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// Waits for the handler threads; they run until the server fails.
    pub fn join(self) {
        for thread in self.threads {
            // A handler that panicked already printed why; the others keep serving.
            let _ = thread.join();
        }
    }
}

/// Answers `server`'s requests with `handle` on `threads` threads.
pub fn serve_threads<F>(server: Server, threads: usize, handle: F) -> Result<Handlers, String>
where
    F: Fn(Request) + Send + Sync + 'static,
{
    let address = server.server_addr().to_string();
    let server = Arc::new(server);
    let handle = Arc::new(handle);
    let threads = (0..threads.max(1))
        .map(|i| {
            let (server, handle) = (server.clone(), handle.clone());
            std::thread::Builder::new()
                .name(format!("http-{i}"))
                .spawn(move || {
                    while let Ok(request) = server.recv() {
                        handle(request);
                    }
                })
                .map_err(|e| format!("starting handler thread {i}: {e}"))
        })
        .collect::<Result<Vec<_>, String>>()?;
    Ok(Handlers { address, threads })
}

/// A lock that survives a panicked holder: what the handlers share (counters, messages,
/// maps updated in one step) stays consistent.
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
