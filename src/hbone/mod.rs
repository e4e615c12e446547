//! HBONE: HTTP/2 CONNECT inside mutual TLS with SPIFFE identities, port 15008.
//!
//! Owned by the workers: every type here lives on one worker thread (`Rc`, `Cell`; no locks).
//! The pure parts come first and are tested without sockets:
//! - `headers`: the CONNECT headers a client sends (`forwarded`, `baggage`, `traceparent`);
//! - `target`: what a CONNECT may ask for, and the status of each refusal;
//! - `pool`: the per-worker connection pool (one dial per key, stream limits, retirement, idle).
//!
//! Then the I/O around them: `client` (dial, handshake, CONNECT through the pool), `server`
//! (inbound 15008) and `relay` (bytes between an HTTP/2 stream and a TCP socket).

pub mod client;
pub mod headers;
pub mod pool;
pub mod relay;
pub mod server;
pub mod target;
