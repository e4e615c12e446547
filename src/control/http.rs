//! A deliberately small HTTP/1.1 server for the admin, metrics and readiness ports: one request
//! per connection, `Connection: close`. Runs on the control thread.
//!
//! Anyone who can reach 15020 or 15021 can talk to it, so nothing a client does holds memory or
//! a descriptor for long: the head is bounded in size, the whole exchange (head, handler, reply)
//! in time, and each server in concurrent connections (over the cap a connection is closed at
//! once). Replies are shared bytes, so a cached page is not copied per client.

use std::future::Future;
use std::rc::Rc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const MAX_HEAD: usize = 16 * 1024;
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest one connection lives: reading the request, answering it and writing the reply.
pub const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(20);
/// Connections one server handles at once.
pub const MAX_CONNECTIONS: usize = 64;

pub struct Request {
    pub method: String,
    pub path: String,
    pub query: String,
    /// Header names lowercased.
    pub headers: Vec<(String, String)>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: bytes::Bytes,
}

pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";
pub const OPENMETRICS_TEXT: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

impl Response {
    pub fn text(status: u16, body: impl Into<String>) -> Response {
        Response { status, content_type: "text/plain; charset=utf-8", body: body.into().into() }
    }

    pub fn json(body: String) -> Response {
        Response { status: 200, content_type: "application/json", body: body.into() }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        _ => "",
    }
}

/// Accepts until the listener fails; each connection is a local task.
pub async fn serve<H, F>(listener: TcpListener, handler: Rc<H>)
where
    H: Fn(Request) -> F + 'static,
    F: Future<Output = Response> + 'static,
{
    let active = Rc::new(std::cell::Cell::new(0usize));
    let mut refused = 0u64;
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if active.get() >= MAX_CONNECTIONS {
            // Closed at once: a flood costs neither memory nor a descriptor for long.
            refused += 1;
            if refused.is_power_of_two() {
                tracing::warn!(%peer, refused, "control port busy ({MAX_CONNECTIONS} connections); closing new ones");
            }
            drop(stream);
            continue;
        }
        active.set(active.get() + 1);
        let slot = Slot(active.clone());
        let handler = handler.clone();
        tokio::task::spawn_local(async move {
            let _slot = slot;
            match tokio::time::timeout(EXCHANGE_TIMEOUT, one(stream, handler)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!(error = %e, "admin connection failed"),
                Err(_) => tracing::debug!(%peer, "admin connection closed after {EXCHANGE_TIMEOUT:?}"),
            }
        });
    }
}

/// One connection's place under [`MAX_CONNECTIONS`], given back however the task ends.
struct Slot(Rc<std::cell::Cell<usize>>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.set(self.0.get() - 1);
    }
}

async fn one<H, F>(mut stream: TcpStream, handler: Rc<H>) -> std::io::Result<()>
where
    H: Fn(Request) -> F,
    F: Future<Output = Response>,
{
    let resp = match tokio::time::timeout(READ_TIMEOUT, read_head(&mut stream)).await {
        Err(_) => Response::text(408, "request timeout\n"),
        Ok(Err(status)) => Response::text(status, format!("{}\n", reason(status))),
        Ok(Ok(req)) => handler(req).await,
    };
    let head = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: {}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        resp.status,
        reason(resp.status),
        resp.content_type,
        resp.body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(&resp.body).await?;
    stream.shutdown().await
}

async fn read_head(stream: &mut TcpStream) -> Result<Request, u16> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            buf.truncate(end);
            break;
        }
        if buf.len() > MAX_HEAD {
            return Err(431);
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return Err(400),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let head = std::str::from_utf8(&buf).map_err(|_| 400u16)?;
    let line = head.lines().next().ok_or(400u16)?;
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(400);
    };
    if !version.starts_with("HTTP/1.") {
        return Err(400);
    }
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let headers = head
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Ok(Request { method: method.to_string(), path: path.to_string(), query: query.to_string(), headers })
}
