//! Logging setup, the access log, metrics.

pub mod access;
pub mod fields;
pub mod metrics;

use std::io::Write;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, TrySendError};
use crossbeam_utils::atomic::AtomicCell;
use tracing::subscriber::Interest;
use tracing::{Event, Metadata, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::LogFormat;

/// Bytes of lines waiting for the writer thread; beyond this a line is dropped (and counted)
/// rather than making a worker wait for a slow log sink. Bounded in bytes, not lines: a line
/// can carry what a peer sent.
const LOG_QUEUE_BYTES: u64 = 4 * 1024 * 1024;
/// The longest line written; a longer one is cut, and says so.
const MAX_LINE: usize = 16 * 1024;

enum LogMsg {
    Line(Vec<u8>),
    Flush(Sender<()>),
}

struct LogSink {
    tx: Sender<LogMsg>,
    /// Bytes queued and not yet written: the bound is kept here so the queue itself (a
    /// growable list) costs memory only while lines wait.
    queued: AtomicU64,
    dropped: AtomicU64,
}

static SINK: OnceLock<LogSink> = OnceLock::new();

/// The log filter in force. Every worker consults it on every event, so it is read with one
/// atomic load (no lock, no shared counter written) and replaced whole by a pointer store.
/// A replaced filter is never freed (a reader may still hold it): each run-time change of the
/// level keeps one small filter for the life of the process, and changes are operator actions.
static FILTER: AtomicCell<Option<&'static EnvFilter>> = AtomicCell::new(None);

/// The layer that applies [`FILTER`]: every call goes to the filter in force at that moment.
struct CurrentFilter;

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for CurrentFilter {
    fn register_callsite(&self, meta: &'static Metadata<'static>) -> Interest {
        match FILTER.load() {
            Some(f) => <EnvFilter as Layer<S>>::register_callsite(f, meta),
            None => Interest::always(),
        }
    }

    fn max_level_hint(&self) -> Option<tracing::level_filters::LevelFilter> {
        FILTER.load().and_then(<EnvFilter as Layer<S>>::max_level_hint)
    }

    fn enabled(&self, meta: &Metadata<'_>, ctx: Context<'_, S>) -> bool {
        FILTER.load().is_none_or(|f| <EnvFilter as Layer<S>>::enabled(f, meta, ctx))
    }

    fn event_enabled(&self, event: &Event<'_>, ctx: Context<'_, S>) -> bool {
        FILTER.load().is_none_or(|f| <EnvFilter as Layer<S>>::event_enabled(f, event, ctx))
    }

    fn on_new_span(&self, attrs: &tracing::span::Attributes<'_>, id: &tracing::span::Id, ctx: Context<'_, S>) {
        if let Some(f) = FILTER.load() {
            <EnvFilter as Layer<S>>::on_new_span(f, attrs, id, ctx);
        }
    }

    fn on_record(&self, id: &tracing::span::Id, values: &tracing::span::Record<'_>, ctx: Context<'_, S>) {
        if let Some(f) = FILTER.load() {
            <EnvFilter as Layer<S>>::on_record(f, id, values, ctx);
        }
    }

    fn on_enter(&self, id: &tracing::span::Id, ctx: Context<'_, S>) {
        if let Some(f) = FILTER.load() {
            <EnvFilter as Layer<S>>::on_enter(f, id, ctx);
        }
    }

    fn on_exit(&self, id: &tracing::span::Id, ctx: Context<'_, S>) {
        if let Some(f) = FILTER.load() {
            <EnvFilter as Layer<S>>::on_exit(f, id, ctx);
        }
    }

    fn on_close(&self, id: tracing::span::Id, ctx: Context<'_, S>) {
        if let Some(f) = FILTER.load() {
            <EnvFilter as Layer<S>>::on_close(f, id, ctx);
        }
    }
}

/// The writer handed to the log formatter: one formatted line per `write_all`, queued.
pub struct QueueWriter;

impl Write for QueueWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Some(sink) = SINK.get() {
            let line = bounded_line(buf);
            let size = line.len() as u64;
            if sink.queued.fetch_add(size, Ordering::Relaxed) + size > LOG_QUEUE_BYTES {
                sink.queued.fetch_sub(size, Ordering::Relaxed);
                sink.dropped.fetch_add(1, Ordering::Relaxed);
            } else if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) =
                sink.tx.try_send(LogMsg::Line(line))
            {
                sink.queued.fetch_sub(size, Ordering::Relaxed);
                sink.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The line to queue: as formatted, or cut at [`MAX_LINE`] bytes with a marker.
fn bounded_line(buf: &[u8]) -> Vec<u8> {
    if buf.len() <= MAX_LINE {
        return buf.to_vec();
    }
    let mut line = Vec::with_capacity(MAX_LINE + 32);
    line.extend_from_slice(&buf[..MAX_LINE]);
    line.extend_from_slice(format!("... [cut: {} bytes]\n", buf.len() - MAX_LINE).as_bytes());
    line
}

/// Writes queued lines to stdout, many per `write` when they pile up; reports drops.
fn writer_thread(rx: Receiver<LogMsg>) {
    let mut out = std::io::stdout().lock();
    let mut batch = Vec::with_capacity(64 * 1024);
    let mut reported = 0;
    while let Ok(first) = rx.recv() {
        let mut flushes = Vec::new();
        let mut bytes = 0;
        for msg in std::iter::once(first).chain(rx.try_iter().take(1024)) {
            match msg {
                LogMsg::Line(l) => {
                    batch.extend_from_slice(&l);
                    bytes += l.len() as u64;
                }
                LogMsg::Flush(done) => flushes.push(done),
            }
        }
        if let Some(sink) = SINK.get() {
            sink.queued.fetch_sub(bytes, Ordering::Relaxed);
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
    FILTER.store(Some(Box::leak(Box::new(filter))));
    let registry = tracing_subscriber::registry().with(CurrentFilter);
    let res = match format {
        LogFormat::Json => registry
            .with(tracing_subscriber::fmt::layer().json().flatten_event(true).with_writer(|| QueueWriter))
            .try_init(),
        LogFormat::Plain => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(false)
                    .fmt_fields(fields::PlainFields)
                    .with_writer(|| QueueWriter),
            )
            .try_init(),
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
    FILTER.load().map(|f| f.to_string())
}

/// Replaces the log filter at run time (`POST /logging?level=...`): a `RUST_LOG` directive such
/// as `debug` or `info,access=warn`.
pub fn set_log_level(directive: &str) -> Result<String, String> {
    if FILTER.load().is_none() {
        return Err("logging is not managed by this process (tests)".into());
    }
    let filter = EnvFilter::try_new(directive).map_err(|e| format!("invalid level {directive:?}: {e}"))?;
    FILTER.store(Some(Box::leak(Box::new(filter))));
    // Callsites cached what the old filter said of them; ask again.
    tracing::callsite::rebuild_interest_cache();
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

    #[test]
    fn long_lines_are_cut_and_say_so() {
        assert_eq!(super::bounded_line(b"short\n"), b"short\n");
        let long = vec![b'x'; super::MAX_LINE * 4];
        let cut = super::bounded_line(&long);
        assert!(cut.len() < super::MAX_LINE + 64);
        assert!(String::from_utf8_lossy(&cut).ends_with(&format!("[cut: {} bytes]\n", super::MAX_LINE * 3)));
    }
}
