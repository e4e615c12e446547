//! The DNS proxy Istio's ztunnel has: a pod's DNS (redirected to 15053 by istio-cni) answered
//! from the mesh's config where the name is a mesh name, forwarded to the node's resolvers
//! otherwise.
//!
//! - `names`: which mesh name a query means (COMPAT.md's rules), pure;
//! - `message`: one request from bytes to a reply or a forward, pure (fuzzed);
//! - `resolv`: the upstream resolvers, from `/etc/resolv.conf`;
//! - `server`: per worker, the UDP and TCP servers (per pod in in-pod mode, on
//!   `ISTIO_META_DNS_PROXY_ADDR` in dedicated mode) and the forwarder, on the worker's runtime.

pub mod message;
pub mod names;
pub mod resolv;
pub mod server;
