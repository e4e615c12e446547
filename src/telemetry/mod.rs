//! Logging setup, the access log, metrics.

pub mod access;
pub mod metrics;

use std::io::Write;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, TrySendError};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry, reload};

use crate::config::LogFormat;

/// Lines waiting for the writer thread; beyond this a line is dropped (and counted) rather than
/// making a worker wait for a slow log sink.
const LOG_QUEUE: usize = 4096;

enum LogMsg {
    Line(Vec<u8>),
    Flush(Sender<()>),
}

struct LogSink {
    tx: Sender<LogMsg>,
    /// Lines queued and not yet written: the bound is kept here so the queue itself (a
    /// growable list) costs memory only while lines wait.
    queued: AtomicU64,
    dropped: AtomicU64,
}

static SINK: OnceLock<LogSink> = OnceLock::new();
static FILTER: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();

/// The writer handed to the log formatter: one formatted line per `write_all`, queued.
pub struct QueueWriter;

impl Write for QueueWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Some(sink) = SINK.get() {
            if sink.queued.fetch_add(1, Ordering::Relaxed) >= LOG_QUEUE as u64 {
                sink.queued.fetch_sub(1, Ordering::Relaxed);
                sink.dropped.fetch_add(1, Ordering::Relaxed);
            } else if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) =
                sink.tx.try_send(LogMsg::Line(buf.to_vec()))
            {
                sink.queued.fetch_sub(1, Ordering::Relaxed);
                sink.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Writes queued lines to stdout, many per `write` when they pile up; reports drops.
fn writer_thread(rx: Receiver<LogMsg>) {
    let mut out = std::io::stdout().lock();
    let mut batch = Vec::with_capacity(64 * 1024);
    let mut reported = 0;
    while let Ok(first) = rx.recv() {
        let mut flushes = Vec::new();
        let mut lines = 0;
        for msg in std::iter::once(first).chain(rx.try_iter().take(1024)) {
            match msg {
                LogMsg::Line(l) => {
                    batch.extend_from_slice(&l);
                    lines += 1;
                }
                LogMsg::Flush(done) => flushes.push(done),
            }
        }
        if let Some(sink) = SINK.get() {
            sink.queued.fetch_sub(lines, Ordering::Relaxed);
        }
        let dropped = SINK.get().map(|s| s.dropped.load(Ordering::Relaxed)).unwrap_or(0);
        if dropped > reported {
            let _ = writeln!(batch, "log queue full: dropped {} lines so far", dropped);
            reported = dropped;
        }
        let _ = out.write_all(&batch);
        let _ = out.flush();
        batch.clear();
        for f in flushes {
            let _ = f.send(());
        }
    }
}

/// Installs the global subscriber: `RUST_LOG` filter (default `info`, changeable at run time
/// through [`set_log_level`]), plain or JSON lines, written by a background thread.
pub fn init_logging(format: LogFormat) -> anyhow::Result<()> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(v) if !v.trim().is_empty() => {
            EnvFilter::try_new(&v).map_err(|e| anyhow::anyhow!("invalid RUST_LOG={v:?}: {e}"))?
        }
        _ => EnvFilter::new("info"),
    };
    let (tx, rx) = crossbeam_channel::unbounded();
    let _ = SINK.set(LogSink { tx, queued: AtomicU64::new(0), dropped: AtomicU64::new(0) });
    std::thread::Builder::new().name("log-writer".into()).spawn(move || writer_thread(rx))?;
    let (filter, handle) = reload::Layer::new(filter);
    let _ = FILTER.set(handle);
    let registry = tracing_subscriber::registry().with(filter);
    let res = match format {
        LogFormat::Json => registry
            .with(tracing_subscriber::fmt::layer().json().flatten_event(true).with_writer(|| QueueWriter))
            .try_init(),
        LogFormat::Plain => {
            registry.with(tracing_subscriber::fmt::layer().with_ansi(false).with_writer(|| QueueWriter)).try_init()
        }
    };
    res.map_err(|e| anyhow::anyhow!("installing the log subscriber: {e}"))
}

/// Waits (up to a second) until every line logged so far is written: call before exiting.
pub fn flush_logs() {
    if let Some(sink) = SINK.get() {
        let (done_tx, done_rx) = crossbeam_channel::bounded(1);
        if sink.tx.send_timeout(LogMsg::Flush(done_tx), Duration::from_secs(1)).is_ok() {
            let _ = done_rx.recv_timeout(Duration::from_secs(1));
        }
    }
}

/// The log filter in force (`RUST_LOG` syntax), when logging was set up by [`init_logging`].
pub fn log_level() -> Option<String> {
    FILTER.get().and_then(|h| h.with_current(|f| f.to_string()).ok())
}

/// Replaces the log filter at run time (`POST /logging?level=...`): a `RUST_LOG` directive such
/// as `debug` or `info,access=warn`.
pub fn set_log_level(directive: &str) -> Result<String, String> {
    let handle = FILTER.get().ok_or("logging is not managed by this process (tests)")?;
    let filter = EnvFilter::try_new(directive).map_err(|e| format!("invalid level {directive:?}: {e}"))?;
    handle.reload(filter).map_err(|e| e.to_string())?;
    Ok(log_level().unwrap_or_default())
}

/// `YYYY-MM-DDTHH:MM:SSZ` (UTC, whole seconds), as `config_dump` prints times.
pub fn rfc3339(t: std::time::SystemTime) -> String {
    let secs = t.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    match time::OffsetDateTime::from_unix_timestamp(secs) {
        Ok(dt) => format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
            dt.year(),
            u8::from(dt.month()),
            dt.day(),
            dt.hour(),
            dt.minute(),
            dt.second()
        ),
        Err(_) => String::new(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn rfc3339() {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
        assert_eq!(super::rfc3339(t), "2023-11-14T22:13:20Z");
    }
}
