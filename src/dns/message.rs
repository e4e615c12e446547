//! One DNS request, from bytes to what to do with it, and replies back to bytes; no I/O (the
//! fuzz target drives it). The wire format is hickory-proto's.
//!
//! - a message too short for a header is dropped; one that does not parse gets FORMERR, as does
//!   one that is a response or asks other than exactly one question; a non-Query opcode gets
//!   NOTIMP; a client the proxy does not know gets SERVFAIL;
//! - A and AAAA for mesh names are answered here (AA, RA, TTL 30 s, shuffled, the CNAME form
//!   after a stripped search domain); everything else is forwarded;
//! - EDNS is echoed only when the request had it (payload max(request's, 512), DO copied); a UDP
//!   reply larger than the client takes (its EDNS payload, else 512 bytes) keeps the records
//!   that fit and sets TC; TCP replies are whole.

use std::net::IpAddr;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, CNAME};
use hickory_proto::rr::{Name, RData, Record, RecordType};

use super::names::{self, Asker, Family, Lookup};
use crate::snapshot::ConfigIndex;

/// TTL of mesh answers (Istio: 30 s).
pub const TTL: u32 = 30;
/// The largest UDP reply to a client without EDNS.
pub const CLASSIC_UDP: usize = 512;
/// The largest reply we build for anyone (a TCP message's limit).
pub const MAX_MESSAGE: usize = 65_535;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

impl Transport {
    pub fn label(self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
        }
    }
}

/// What to do with a request.
#[derive(Debug)]
pub enum Outcome {
    /// Send this reply.
    Reply { bytes: Vec<u8>, query_type: Option<RecordType>, result: &'static str },
    /// Not ours to answer: ask the upstream resolvers.
    Forward(Box<Message>),
    /// Not even a DNS header: nothing to answer.
    Drop,
}

/// Handles `bytes` from a client: `asker` is `None` when the proxy does not know the client's
/// workload (SERVFAIL).
pub fn handle(index: &ConfigIndex, asker: Option<&Asker>, bytes: &[u8], transport: Transport) -> Outcome {
    if bytes.len() < 12 {
        return Outcome::Drop;
    }
    let request = match Message::from_vec(bytes) {
        Ok(m) => m,
        Err(_) => {
            let id = u16::from_be_bytes([bytes[0], bytes[1]]);
            let reply = Message::error_msg(id, OpCode::Query, ResponseCode::FormErr);
            return Outcome::Reply { bytes: encode_plain(&reply), query_type: None, result: "malformed" };
        }
    };
    let qtype = request.queries.first().map(|q| q.query_type());
    let refuse = |code: ResponseCode, result: &'static str| {
        let mut reply = Message::error_msg(request.metadata.id, request.metadata.op_code, code);
        reply.add_queries(request.queries.iter().cloned());
        reply.metadata.recursion_desired = request.metadata.recursion_desired;
        Outcome::Reply { bytes: finish(reply, &request, transport), query_type: qtype, result }
    };
    if request.metadata.message_type == MessageType::Response {
        return refuse(ResponseCode::FormErr, "a response sent as a query");
    }
    if request.metadata.op_code != OpCode::Query {
        return refuse(ResponseCode::NotImp, "not a query");
    }
    if request.queries.len() != 1 {
        return refuse(ResponseCode::FormErr, "not exactly one question");
    }
    let Some(asker) = asker else {
        return refuse(ResponseCode::ServFail, "unknown client workload");
    };
    let query = &request.queries[0];
    let family = match query.query_type() {
        RecordType::A => Family::V4,
        RecordType::AAAA => Family::V6,
        _ => return Outcome::Forward(Box::new(request)),
    };
    let name = query.name().to_ascii().to_ascii_lowercase();
    let name = name.trim_end_matches('.');
    match names::lookup(index, name, family, asker) {
        Lookup::Unknown => Outcome::Forward(Box::new(request)),
        Lookup::Mesh { owner, cname, mut addrs } => {
            fastrand::shuffle(&mut addrs);
            let mut reply = Message::response(request.metadata.id, OpCode::Query);
            reply.metadata.authoritative = true;
            reply.metadata.recursion_available = true;
            reply.metadata.recursion_desired = request.metadata.recursion_desired;
            reply.add_query(query.clone());
            let asked = query.name().clone();
            let owner_name = match &cname {
                Some(target) => match Name::from_ascii(format!("{target}.")) {
                    Ok(t) => {
                        reply.add_answer(Record::from_rdata(asked.clone(), TTL, RData::CNAME(CNAME(t.clone()))));
                        t
                    }
                    Err(_) => asked.clone(),
                },
                None => {
                    let _ = owner;
                    asked.clone()
                }
            };
            for ip in addrs {
                let rdata = match ip {
                    IpAddr::V4(v4) => RData::A(A(v4)),
                    IpAddr::V6(v6) => RData::AAAA(AAAA(v6)),
                };
                reply.add_answer(Record::from_rdata(owner_name.clone(), TTL, rdata));
            }
            let result = if reply.answers.is_empty() { "no records" } else { "success" };
            Outcome::Reply { bytes: finish(reply, &request, transport), query_type: qtype, result }
        }
    }
}

/// The reply to a forwarded request from the upstream's answer: its rcode and records, with the
/// request's id and our flags (AA cleared, RA set).
pub fn from_upstream(request: &Message, upstream: &[u8], transport: Transport) -> Option<Vec<u8>> {
    let up = Message::from_vec(upstream).ok()?;
    if up.metadata.message_type != MessageType::Response {
        return None;
    }
    Some(from_upstream_message(request, up, transport))
}

/// [`from_upstream`] for an answer already parsed (a cached one).
pub fn from_upstream_message(request: &Message, up: Message, transport: Transport) -> Vec<u8> {
    let mut reply = Message::response(request.metadata.id, OpCode::Query);
    reply.metadata.response_code = up.metadata.response_code;
    reply.metadata.recursion_desired = request.metadata.recursion_desired;
    reply.metadata.recursion_available = true;
    reply.metadata.authoritative = false;
    reply.add_queries(request.queries.iter().cloned());
    reply.insert_answers(up.answers);
    reply.insert_authorities(up.authorities);
    reply.insert_additionals(up.additionals.into_iter().filter(|r| r.record_type() != RecordType::OPT).collect());
    finish(reply, request, transport)
}

/// SERVFAIL for a request whose forwarding failed.
pub fn servfail(request: &Message, transport: Transport) -> Vec<u8> {
    let mut reply = Message::error_msg(request.metadata.id, OpCode::Query, ResponseCode::ServFail);
    reply.add_queries(request.queries.iter().cloned());
    reply.metadata.recursion_desired = request.metadata.recursion_desired;
    finish(reply, request, transport)
}

/// Adds the EDNS echo and fits the reply to what the client takes over `transport`.
fn finish(mut reply: Message, request: &Message, transport: Transport) -> Vec<u8> {
    let limit = match (&request.edns, transport) {
        (_, Transport::Tcp) => MAX_MESSAGE,
        (Some(e), Transport::Udp) => usize::from(e.max_payload()).max(CLASSIC_UDP),
        (None, Transport::Udp) => CLASSIC_UDP,
    };
    if let Some(req_edns) = &request.edns {
        let mut edns = Edns::new();
        edns.set_max_payload(req_edns.max_payload().max(CLASSIC_UDP as u16));
        edns.set_version(req_edns.version());
        edns.set_dnssec_ok(req_edns.flags().dnssec_ok);
        reply.set_edns(edns);
    }
    let whole = encode_plain(&reply);
    if whole.len() <= limit {
        return whole;
    }
    // Too big for the client: the most leading records that fit, TC set (the client retries
    // over TCP). Bisection over how many answers to keep.
    reply.metadata.truncation = true;
    reply.authorities.clear();
    reply.additionals.clear();
    let answers = std::mem::take(&mut reply.answers);
    let (mut lo, mut hi) = (0usize, answers.len());
    let with = |n: usize, reply: &Message| {
        let mut m = reply.clone();
        m.answers = answers[..n].to_vec();
        encode_plain(&m)
    };
    while lo < hi {
        let mid = (lo + hi).div_ceil(2);
        if with(mid, &reply).len() <= limit { lo = mid } else { hi = mid - 1 }
    }
    with(lo, &reply)
}

fn encode_plain(m: &Message) -> Vec<u8> {
    // Encoding a message built from parsed or generated records cannot fail short of a bug;
    // an empty reply is then better than a panic on a worker.
    m.to_vec().unwrap_or_default()
}

/// The label Istio uses for a query type (`a`, `aaaa`, ...).
pub fn type_label(t: Option<RecordType>) -> String {
    t.map(|t| t.to_string().to_ascii_lowercase()).unwrap_or_else(|| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ConfigState;
    use crate::snapshot::{LocalScope, SourceInfo};
    use hickory_proto::op::Query;

    fn index(extra_ips: usize) -> ConfigIndex {
        let vips: Vec<String> = (0..1 + extra_ips).map(|i| format!("\"/10.96.{}.{}\"", i / 250, i % 250 + 1)).collect();
        let yaml = format!(
            "services:\n- {{name: big, namespace: ns1, hostname: big.ns1.svc.cluster.local, vips: [{}], ports: {{80: 80}}}}\n",
            vips.join(", ")
        );
        let state: ConfigState = crate::control::local::parse(&yaml).unwrap();
        ConfigIndex::build(1, SourceInfo { kind: "test", location: String::new() }, LocalScope::Node(None), state)
    }

    fn query(name: &str, t: RecordType, edns: Option<u16>) -> Vec<u8> {
        let mut m = Message::new(0x1234, MessageType::Query, OpCode::Query);
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), t));
        if let Some(p) = edns {
            let mut e = Edns::new();
            e.set_max_payload(p);
            e.set_dnssec_ok(true);
            m.set_edns(e);
        }
        m.to_vec().unwrap()
    }

    fn reply(o: Outcome) -> Message {
        match o {
            Outcome::Reply { bytes, .. } => Message::from_vec(&bytes).unwrap(),
            other => panic!("{other:?}"),
        }
    }

    fn search() -> Vec<String> {
        names::pod_search("ns1", "cluster.local")
    }

    fn asker(search: &[String]) -> Asker<'_> {
        Asker {
            namespace: "ns1",
            network: "",
            cluster_domain: "cluster.local",
            search,
            preferred_namespace: None,
            ipv6_enabled: true,
        }
    }

    #[test]
    fn mesh_answers_are_authoritative_with_ttl_30() {
        let s = search();
        let r = reply(handle(&index(0), Some(&asker(&s)), &query("big.", RecordType::A, None), Transport::Udp));
        assert_eq!(r.metadata.id, 0x1234);
        assert!(r.metadata.authoritative && r.metadata.recursion_available);
        assert_eq!(r.answers.len(), 1);
        assert_eq!(r.answers[0].ttl, TTL);
        assert_eq!(r.answers[0].name.to_ascii(), "big.");
        assert!(r.edns.is_none(), "no EDNS unless asked");
        // No IPv6 VIP: NOERROR, no answers.
        let r = reply(handle(&index(0), Some(&asker(&s)), &query("big.", RecordType::AAAA, None), Transport::Udp));
        assert_eq!(r.metadata.response_code, ResponseCode::NoError);
        assert!(r.answers.is_empty());
    }

    #[test]
    fn cname_form_for_a_stripped_search_domain() {
        let s = search();
        let q = query("big.ns1.ns1.svc.cluster.local.", RecordType::A, None);
        let r = reply(handle(&index(0), Some(&asker(&s)), &q, Transport::Udp));
        assert_eq!(r.answers.len(), 2);
        assert_eq!(r.answers[0].record_type(), RecordType::CNAME);
        assert_eq!(r.answers[0].name.to_ascii(), "big.ns1.ns1.svc.cluster.local.");
        assert_eq!(r.answers[1].name.to_ascii(), "big.ns1.");
    }

    #[test]
    fn errors_forwarding_and_unknown_clients() {
        let s = search();
        let a = asker(&s);
        let idx = index(0);
        assert!(matches!(handle(&idx, Some(&a), &[1, 2, 3], Transport::Udp), Outcome::Drop));
        let garbage = [0x12, 0x34, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0xff];
        assert_eq!(
            reply(handle(&idx, Some(&a), &garbage, Transport::Udp)).metadata.response_code,
            ResponseCode::FormErr
        );
        let mut resp = Message::from_vec(&query("big.", RecordType::A, None)).unwrap();
        resp.metadata.message_type = MessageType::Response;
        let r = reply(handle(&idx, Some(&a), &resp.to_vec().unwrap(), Transport::Udp));
        assert_eq!(r.metadata.response_code, ResponseCode::FormErr);
        let mut notify = Message::from_vec(&query("big.", RecordType::A, None)).unwrap();
        notify.metadata.op_code = OpCode::Notify;
        let r = reply(handle(&idx, Some(&a), &notify.to_vec().unwrap(), Transport::Udp));
        assert_eq!(r.metadata.response_code, ResponseCode::NotImp);
        assert!(matches!(
            handle(&idx, Some(&a), &query("example.com.", RecordType::A, None), Transport::Udp),
            Outcome::Forward(_)
        ));
        assert!(matches!(
            handle(&idx, Some(&a), &query("big.", RecordType::TXT, None), Transport::Udp),
            Outcome::Forward(_)
        ));
        let r = reply(handle(&idx, None, &query("big.", RecordType::A, None), Transport::Udp));
        assert_eq!(r.metadata.response_code, ResponseCode::ServFail);
    }

    #[test]
    fn edns_echo_and_udp_truncation() {
        let s = search();
        let a = asker(&s);
        let idx = index(255);
        // Without EDNS: at most 512 bytes, TC set.
        let o = handle(&idx, Some(&a), &query("big.", RecordType::A, None), Transport::Udp);
        let Outcome::Reply { bytes, .. } = o else { panic!() };
        assert!(bytes.len() <= CLASSIC_UDP);
        let r = Message::from_vec(&bytes).unwrap();
        assert!(r.metadata.truncation && !r.answers.is_empty() && r.answers.len() < 256);
        // EDNS 1232: more fit, the OPT echoed with DO.
        let r = reply(handle(&idx, Some(&a), &query("big.", RecordType::A, Some(1232)), Transport::Udp));
        assert!(r.metadata.truncation && r.answers.len() > 30 && r.answers.len() < 256, "{}", r.answers.len());
        let edns = r.edns.expect("echoed");
        assert_eq!(edns.max_payload(), 1232);
        assert!(edns.flags().dnssec_ok);
        // A tiny advertised payload still gets 512.
        let r = reply(handle(&idx, Some(&a), &query("big.", RecordType::A, Some(100)), Transport::Udp));
        assert_eq!(r.edns.unwrap().max_payload(), 512);
        // TCP: all 256.
        let r = reply(handle(&idx, Some(&a), &query("big.", RecordType::A, None), Transport::Tcp));
        assert!(!r.metadata.truncation);
        assert_eq!(r.answers.len(), 256);
    }

    #[test]
    fn upstream_answers_pass_through_without_aa() {
        let request = Message::from_vec(&query("example.com.", RecordType::A, Some(4096))).unwrap();
        let mut up = Message::response(0x1234, OpCode::Query);
        up.metadata.authoritative = true;
        up.metadata.response_code = ResponseCode::NXDomain;
        let bytes = from_upstream(&request, &up.to_vec().unwrap(), Transport::Udp).unwrap();
        let r = Message::from_vec(&bytes).unwrap();
        assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
        assert!(!r.metadata.authoritative && r.metadata.recursion_available);
        assert_eq!(r.queries.len(), 1);
        let r = Message::from_vec(&servfail(&request, Transport::Udp)).unwrap();
        assert_eq!(r.metadata.response_code, ResponseCode::ServFail);
        assert_eq!(type_label(Some(RecordType::AAAA)), "aaaa");
    }
}
