//! How a plain log line's fields are written: byte for byte what tracing-subscriber's default
//! field formatter writes (`name=value` separated by spaces, the message bare, strings quoted
//! and escaped as `{:?}` escapes them), on a shorter path for the values every access-log line
//! carries. Those lines are written once per connection on the workers, where the generic path
//! (a `{:?}` per string, which escapes it a character at a time; the standard library's address
//! formatting, an octet at a time) took about 15 thousand instructions a line, an eighth of a
//! proxied connection's user-space instructions on each side.
//!
//! Plain printable ASCII strings, integers and booleans are written directly, other values as
//! `name=` and their `{:?}`. The message, errors, `r#` names and strings needing an escape go to
//! tracing-subscriber's own visitor, one field at a time.

use std::fmt;
use std::net::SocketAddr;

use tracing::field::{Field, Visit};
use tracing_subscriber::field::{RecordFields, VisitOutput};
use tracing_subscriber::fmt::FormatFields;
use tracing_subscriber::fmt::format::{DefaultVisitor, Writer};

/// The plain format's field formatter (see the module's documentation).
#[derive(Debug, Default, Clone, Copy)]
pub struct PlainFields;

impl<'w> FormatFields<'w> for PlainFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'w>, fields: R) -> fmt::Result {
        let mut visitor = PlainVisitor { writer, is_empty: true, result: Ok(()) };
        fields.record(&mut visitor);
        visitor.result
    }
}

struct PlainVisitor<'w> {
    writer: Writer<'w>,
    /// Nothing written yet: the next field needs no separating space.
    is_empty: bool,
    result: fmt::Result,
}

impl PlainVisitor<'_> {
    /// Whether `field` may take a direct path (the message and `r#` names never do).
    fn direct(&self, field: &Field) -> bool {
        self.result.is_ok() && field.name() != "message" && !field.name().starts_with("r#")
    }

    /// ` name=` (no space before the first field).
    fn start(&mut self, field: &Field) -> fmt::Result {
        if !std::mem::take(&mut self.is_empty) {
            self.writer.write_str(" ")?;
        }
        self.writer.write_str(field.name())?;
        self.writer.write_str("=")
    }

    /// The field the default way, by tracing-subscriber's own visitor.
    fn delegate(&mut self, record: impl FnOnce(&mut DefaultVisitor<'_>)) {
        if self.result.is_err() {
            return;
        }
        let mut visitor = DefaultVisitor::new(self.writer.by_ref(), self.is_empty);
        record(&mut visitor);
        self.result = visitor.finish();
        self.is_empty = false;
    }
}

/// Printable ASCII other than `"` and `\`: what `{:?}` writes unchanged.
fn plain_ascii(s: &str) -> bool {
    s.bytes().all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
}

impl Visit for PlainVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if self.direct(field) && plain_ascii(value) {
            self.result = self.start(field).and_then(|_| {
                self.writer.write_str("\"")?;
                self.writer.write_str(value)?;
                self.writer.write_str("\"")
            });
        } else {
            self.delegate(|v| v.record_str(field, value));
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        if self.direct(field) {
            self.result = self.start(field).and_then(|_| self.writer.write_str(Decimal::of(value).as_str()));
        } else {
            self.delegate(|v| v.record_u64(field, value));
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        if self.direct(field) {
            self.result = self.start(field).and_then(|_| {
                if value < 0 {
                    self.writer.write_str("-")?;
                }
                self.writer.write_str(Decimal::of(value.unsigned_abs()).as_str())
            });
        } else {
            self.delegate(|v| v.record_i64(field, value));
        }
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        if self.direct(field) {
            self.result = self.start(field).and_then(|_| self.writer.write_str(if value { "true" } else { "false" }));
        } else {
            self.delegate(|v| v.record_bool(field, value));
        }
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.delegate(|v| v.record_error(field, value));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if self.direct(field) {
            // What the default writes for such a field: `name=` and the value's `{:?}`.
            self.result = self.start(field).and_then(|_| write!(self.writer, "{value:?}"));
        } else {
            self.delegate(|v| v.record_debug(field, value));
        }
    }
}

/// An unsigned number in decimal, on the stack.
struct Decimal {
    buf: [u8; 20],
    at: usize,
}

impl Decimal {
    fn of(mut n: u64) -> Decimal {
        let mut d = Decimal { buf: [0; 20], at: 20 };
        loop {
            d.at -= 1;
            d.buf[d.at] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                return d;
            }
        }
    }

    fn as_str(&self) -> &str {
        // Only ASCII digits were written.
        std::str::from_utf8(&self.buf[self.at..]).unwrap_or("")
    }
}

/// A socket address that writes as `Display` does, IPv4 ones in one piece from the stack
/// (the standard library writes each octet and the port through the formatting machinery).
pub struct FastAddr(pub SocketAddr);

impl fmt::Display for FastAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let SocketAddr::V4(v4) = self.0 else { return self.0.fmt(f) };
        if f.width().is_some() || f.precision().is_some() {
            return self.0.fmt(f);
        }
        let mut buf = [0u8; 21];
        let mut len = 0;
        let mut push = |bytes: &[u8]| {
            buf[len..len + bytes.len()].copy_from_slice(bytes);
            len += bytes.len();
        };
        for (i, octet) in v4.ip().octets().into_iter().enumerate() {
            if i > 0 {
                push(b".");
            }
            push(Decimal::of(u64::from(octet)).as_str().as_bytes());
        }
        push(b":");
        push(Decimal::of(u64::from(v4.port())).as_str().as_bytes());
        f.write_str(std::str::from_utf8(&buf[..len]).map_err(|_| fmt::Error)?)
    }
}

#[cfg(test)]
mod tests {
    use tracing_subscriber::fmt::MakeWriter;

    use super::*;

    /// Collects what the formatter writes (each write is sent; the test reads them after).
    #[derive(Clone)]
    struct Buf(crossbeam_channel::Sender<Vec<u8>>);

    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            let _ = self.0.send(b.to_vec());
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Buf {
        type Writer = Buf;
        fn make_writer(&'a self) -> Buf {
            self.clone()
        }
    }

    #[derive(Debug)]
    struct Outer(std::io::Error);
    impl fmt::Display for Outer {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("outer failed")
        }
    }
    impl std::error::Error for Outer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    /// Every kind of field, through a span and an event, both ways.
    fn emit() {
        let span = tracing::info_span!("conn", id = 7u64, peer = "10.0.0.1", r#type = "x");
        let _in = span.enter();
        let addr: SocketAddr = "10.1.2.3:15008".parse().unwrap();
        let v6: SocketAddr = "[fd00::1]:80".parse().unwrap();
        let err = Outer(std::io::Error::other("inner"));
        let none: Option<&str> = None;
        tracing::event!(
            target: "access",
            tracing::Level::INFO,
            src.addr = %FastAddr(addr),
            v6 = %FastAddr(v6),
            std = %addr,
            plain = "spiffe://cluster.local/ns/a/sa/b",
            quoted = "say \"hi\"\\ok",
            control = "tab\there\nline",
            unicode = "caf\u{e9} \u{200b}",
            empty = "",
            some = Some("x"),
            none,
            big = u64::MAX,
            zero = 0u64,
            neg = -42i64,
            min = i64::MIN,
            yes = true,
            no = false,
            float = 1.5f64,
            dbg = ?vec![1, 2],
            error = &err as &(dyn std::error::Error + 'static),
            "connection {} complete",
            "fully"
        );
        tracing::warn!("message only");
        tracing::error!(x = "first", "then the message");
    }

    fn formatted(ours: bool) -> String {
        let (tx, rx) = crossbeam_channel::unbounded();
        let builder = tracing_subscriber::fmt().without_time().with_ansi(false).with_writer(Buf(tx));
        if ours {
            tracing::subscriber::with_default(builder.fmt_fields(PlainFields).finish(), emit);
        } else {
            tracing::subscriber::with_default(builder.finish(), emit);
        }
        String::from_utf8(rx.try_iter().flatten().collect()).unwrap()
    }

    #[test]
    fn lines_are_what_the_default_formatter_writes() {
        let (ours, theirs) = (formatted(true), formatted(false));
        assert_eq!(ours, theirs);
        // The comparison saw the fields (not two empty outputs).
        assert!(ours.contains("src.addr=10.1.2.3:15008 v6=[fd00::1]:80 std=10.1.2.3:15008"), "{ours}");
        assert!(ours.contains("plain=\"spiffe://cluster.local/ns/a/sa/b\""), "{ours}");
        assert!(ours.contains("big=18446744073709551615 zero=0 neg=-42 min=-9223372036854775808"), "{ours}");
        assert!(ours.contains("conn{id=7 peer=\"10.0.0.1\" type=\"x\"}"), "{ours}");
        assert!(ours.contains(r#"quoted="say \"hi\"\\ok" control="tab\there\nline""#), "{ours}");
        assert!(ours.contains("error=outer failed error.sources=[inner]"), "{ours}");
        assert!(ours.contains("access: connection fully complete src.addr="), "{ours}");
        assert_eq!(ours.lines().count(), 3, "{ours}");
    }

    #[test]
    fn addresses_write_as_display_does() {
        for a in ["0.0.0.0:0", "255.255.255.255:65535", "10.0.0.1:80", "[::1]:15008", "[fe80::1]:1"] {
            let addr: SocketAddr = a.parse().unwrap();
            assert_eq!(FastAddr(addr).to_string(), addr.to_string());
            assert_eq!(format!("{:>24}|", FastAddr(addr)), format!("{addr:>24}|"));
        }
    }
}
