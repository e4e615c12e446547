//! Arbitrary bytes as istiod's resources: decoded as a workload `Address` and as an
//! `Authorization`, then converted into the model. Errors are expected; a panic is a finding.

#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use ztunnel::control::xds::convert::AddressResource;
use ztunnel::control::xds::proto::{security, workload};

fuzz_target!(|data: &[u8]| {
    if let Ok(a) = workload::Address::decode(data) {
        let _ = AddressResource::try_from(a);
    }
    if let Ok(p) = security::Authorization::decode(data) {
        let _ = ztunnel::model::Authorization::try_from(p);
    }
    // The same bytes through the wire walk that finds fields our proto does not know.
    let _ = ztunnel::control::xds::convert::authorization_from_wire(data);
});
