//! The load generator's clients. Blocking sockets on plain threads: simple, and cheap enough
//! that the proxy, not the client, is what the figures measure.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

/// How a client reaches its target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// Straight to the target (or through capture, when the client runs in a captured netns).
    Direct,
    /// Through a SOCKS5 proxy at this address.
    Socks5(SocketAddr),
}

/// Opens a connection to `target`, with a SOCKS5 CONNECT handshake when asked.
pub fn dial(target: SocketAddr, via: Via, timeout: Duration) -> io::Result<TcpStream> {
    let s = match via {
        Via::Direct => TcpStream::connect_timeout(&target, timeout)?,
        Via::Socks5(proxy) => {
            let mut s = TcpStream::connect_timeout(&proxy, timeout)?;
            s.set_read_timeout(Some(timeout))?;
            let mut req = vec![5, 1, 0, 5, 1, 0];
            match target {
                SocketAddr::V4(a) => {
                    req.push(1);
                    req.extend_from_slice(&a.ip().octets());
                }
                SocketAddr::V6(a) => {
                    req.push(4);
                    req.extend_from_slice(&a.ip().octets());
                }
            }
            req.extend_from_slice(&target.port().to_be_bytes());
            s.write_all(&req)?;
            let mut head = [0u8; 6];
            s.read_exact(&mut head)?;
            if head[0..2] != [5, 0] {
                return Err(io::Error::other("SOCKS5: no acceptable method"));
            }
            if head[3] != 0 {
                return Err(io::Error::other(format!("SOCKS5 reply code {}", head[3])));
            }
            let rest = match head[5] {
                4 => 18,
                _ => 6,
            };
            let mut tail = vec![0u8; rest];
            s.read_exact(&mut tail)?;
            s.set_read_timeout(None)?;
            s
        }
    };
    s.set_nodelay(true)?;
    Ok(s)
}

/// A latency histogram in nanoseconds, 3 significant figures, up to 60 s.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1_000, 60_000_000_000, 3).expect("valid histogram bounds")
}

#[derive(Debug, Clone, Serialize)]
pub struct Percentiles {
    pub count: u64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    pub mean_us: f64,
}

impl Percentiles {
    pub fn of(h: &Histogram<u64>) -> Percentiles {
        let us = |ns: u64| ns as f64 / 1000.0;
        Percentiles {
            count: h.len(),
            p50_us: us(h.value_at_quantile(0.50)),
            p90_us: us(h.value_at_quantile(0.90)),
            p99_us: us(h.value_at_quantile(0.99)),
            p999_us: us(h.value_at_quantile(0.999)),
            max_us: us(h.max()),
            mean_us: h.mean() / 1000.0,
        }
    }
}

/// The full histogram as (value in ns, count) pairs, lossless at its precision.
pub fn histogram_counts(h: &Histogram<u64>) -> Vec<(u64, u64)> {
    h.iter_recorded().map(|v| (h.highest_equivalent(v.value_iterated_to()), v.count_at_value())).collect()
}

/// HdrHistogram's percentile distribution text (the `.hgrm` format), in microseconds.
pub fn hgrm(h: &Histogram<u64>) -> String {
    let mut out = String::from("       Value     Percentile TotalCount 1/(1-Percentile)\n\n");
    for v in h.iter_quantiles(1) {
        let q = v.quantile_iterated_to();
        let inv = if q < 1.0 { format!("{:.2}", 1.0 / (1.0 - q)) } else { "inf".into() };
        out.push_str(&format!(
            "{:12.3} {:14.12} {:10} {:>14}\n",
            h.highest_equivalent(v.value_iterated_to()) as f64 / 1000.0,
            q,
            v.count_since_last_iteration(),
            inv
        ));
    }
    out.push_str(&format!(
        "#[Mean    = {:12.3}, StdDeviation   = {:12.3}]\n#[Max     = {:12.3}, Total count    = {:12}]\n",
        h.mean() / 1000.0,
        h.stdev() / 1000.0,
        h.max() as f64 / 1000.0,
        h.len()
    ));
    out
}

#[derive(Debug, Clone, Serialize)]
pub struct BulkResult {
    pub streams: usize,
    pub bytes: u64,
    pub seconds: f64,
    pub gbit_per_s: f64,
}

/// `streams` connections each write as fast as they can for `duration` to a discard sink, then
/// half-close and wait for the sink to close, so the time covers delivery too.
pub fn bulk(target: SocketAddr, via: Via, streams: usize, duration: Duration) -> io::Result<BulkResult> {
    let start = Instant::now();
    let deadline = start + duration;
    let handles: Vec<_> = (0..streams)
        .map(|_| {
            std::thread::spawn(move || -> io::Result<u64> {
                let mut s = dial(target, via, Duration::from_secs(10))?;
                let buf = vec![0x5Au8; 256 * 1024];
                let mut sent = 0u64;
                while Instant::now() < deadline {
                    s.write_all(&buf)?;
                    sent += buf.len() as u64;
                }
                s.shutdown(Shutdown::Write)?;
                s.set_read_timeout(Some(Duration::from_secs(30)))?;
                let mut rest = [0u8; 64];
                while s.read(&mut rest)? > 0 {}
                Ok(sent)
            })
        })
        .collect();
    let mut bytes = 0;
    for h in handles {
        bytes += h.join().map_err(|_| io::Error::other("bulk stream panicked"))??;
    }
    let seconds = start.elapsed().as_secs_f64();
    Ok(BulkResult { streams, bytes, seconds, gbit_per_s: bytes as f64 * 8.0 / seconds / 1e9 })
}

/// Closed-loop request/response on one connection: `count` round trips of `size` bytes after
/// `warmup` unrecorded ones.
pub fn rr_closed(target: SocketAddr, via: Via, size: usize, warmup: u64, count: u64) -> io::Result<Histogram<u64>> {
    let mut s = dial(target, via, Duration::from_secs(10))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let msg = vec![0x42u8; size];
    let mut back = vec![0u8; size];
    let mut h = new_histogram();
    for i in 0..warmup + count {
        let t = Instant::now();
        s.write_all(&msg)?;
        s.read_exact(&mut back)?;
        if i >= warmup {
            h.saturating_record(t.elapsed().as_nanos() as u64);
        }
    }
    Ok(h)
}

/// Open-loop request/response at a fixed rate on one connection. Latency is measured from when
/// each request was due, not when it was sent, so a stalled proxy shows as queueing instead of
/// silently slowing the client (no coordinated omission).
pub fn rr_open(target: SocketAddr, via: Via, size: usize, rate: u64, duration: Duration) -> io::Result<Histogram<u64>> {
    let s = dial(target, via, Duration::from_secs(10))?;
    let mut reader = s.try_clone()?;
    reader.set_read_timeout(Some(Duration::from_secs(10)))?;
    let n = (rate as f64 * duration.as_secs_f64()).max(1.0) as u64;
    let (tx, rx) = mpsc::channel::<Instant>();
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let sender = std::thread::spawn(move || -> io::Result<()> {
        let mut s = s;
        let msg = vec![0x42u8; size];
        let start = Instant::now();
        for i in 0..n {
            let due = start + interval * i as u32;
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            if tx.send(due).is_err() {
                break;
            }
            s.write_all(&msg)?;
        }
        Ok(())
    });
    let mut h = new_histogram();
    let mut back = vec![0u8; size];
    for due in rx.iter() {
        reader.read_exact(&mut back)?;
        h.saturating_record(due.elapsed().as_nanos() as u64);
    }
    sender.join().map_err(|_| io::Error::other("open-loop sender panicked"))??;
    Ok(h)
}

#[derive(Debug, Clone, Serialize)]
pub struct ConnRateResult {
    pub clients: usize,
    pub connections: u64,
    pub errors: u64,
    pub seconds: f64,
    pub per_second: f64,
}

/// `clients` threads each loop: connect, 1-byte echo, close. Histogram of the whole cycle.
pub fn connrate(
    target: SocketAddr,
    via: Via,
    clients: usize,
    duration: Duration,
) -> io::Result<(ConnRateResult, Histogram<u64>)> {
    let start = Instant::now();
    let deadline = start + duration;
    let handles: Vec<_> = (0..clients)
        .map(|_| {
            std::thread::spawn(move || {
                let mut h = new_histogram();
                let (mut ok, mut errors) = (0u64, 0u64);
                while Instant::now() < deadline {
                    let t = Instant::now();
                    let res = (|| -> io::Result<()> {
                        let mut s = dial(target, via, Duration::from_secs(10))?;
                        s.set_read_timeout(Some(Duration::from_secs(10)))?;
                        s.write_all(b"x")?;
                        let mut b = [0u8; 1];
                        s.read_exact(&mut b)?;
                        Ok(())
                    })();
                    match res {
                        Ok(()) => {
                            ok += 1;
                            h.saturating_record(t.elapsed().as_nanos() as u64);
                        }
                        Err(_) => errors += 1,
                    }
                }
                (ok, errors, h)
            })
        })
        .collect();
    let mut total = new_histogram();
    let (mut connections, mut errors) = (0, 0);
    for handle in handles {
        let (ok, err, h) = handle.join().map_err(|_| io::Error::other("connrate client panicked"))?;
        connections += ok;
        errors += err;
        total.add(&h).map_err(|e| io::Error::other(e.to_string()))?;
    }
    let seconds = start.elapsed().as_secs_f64();
    Ok((ConnRateResult { clients, connections, errors, seconds, per_second: connections as f64 / seconds }, total))
}

/// Opens `n` connections, proves each works with a 1-byte echo, and returns them open.
pub fn open_idle(target: SocketAddr, via: Via, n: usize) -> io::Result<Vec<TcpStream>> {
    let mut conns = Vec::with_capacity(n);
    for _ in 0..n {
        let mut s = dial(target, via, Duration::from_secs(10))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(b"i")?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b)?;
        conns.push(s);
    }
    Ok(conns)
}
