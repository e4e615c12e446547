//! Arbitrary bytes as what a client may send before any policy applies: a SOCKS5 greeting and
//! request (15080), and a CONNECT method and authority (15008). Refusals are expected; a panic,
//! or a parse that claims more bytes than it was given, is a finding.

#![no_main]

use libfuzzer_sys::fuzz_target;
use ztunnel::hbone::target::parse_request;
use ztunnel::worker::socks5::{parse_greeting, parse_request as parse_socks5};

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((_, used))) = parse_greeting(data) {
        assert!(used <= data.len());
        if let Ok(Some((_, used2))) = parse_socks5(&data[used..]) {
            assert!(used + used2 <= data.len());
        }
    }
    if let Ok(Some((_, used))) = parse_socks5(data) {
        assert!(used <= data.len());
    }
    // The first byte picks a method; the rest is the authority as a peer sent it.
    if let Some((&m, rest)) = data.split_first() {
        let method = match m % 4 {
            0 => http::Method::CONNECT,
            1 => http::Method::GET,
            2 => http::Method::POST,
            _ => http::Method::OPTIONS,
        };
        let authority = std::str::from_utf8(rest).ok();
        if let Err(refusal) = parse_request(&method, authority) {
            // What a refusal quotes of the peer is bounded.
            assert!(refusal.to_string().len() < 512);
        }
    }
});
