//! Address newtypes: an IP within a network, a namespaced hostname, a CIDR.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// An IP address within a network (`"network/ip"`; the default network is empty: `"/1.2.3.4"`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NetworkAddress {
    pub network: String,
    pub address: IpAddr,
}

impl FromStr for NetworkAddress {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (network, ip) = s
            .rsplit_once('/')
            .ok_or_else(|| format!("{s:?} is not network/ip (use \"/{s}\" for the default network)"))?;
        let address = ip.parse::<IpAddr>().map_err(|_| format!("{ip:?} in {s:?} is not an IP address"))?;
        Ok(NetworkAddress { network: network.to_string(), address: address.to_canonical() })
    }
}

impl fmt::Display for NetworkAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.address)
    }
}

/// A CIDR within a network (`"network/ip/length"`): a service address that covers a range (an
/// xDS `NetworkAddress` with a `length` short of the whole address).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NetworkCidr {
    pub network: String,
    pub net: IpNet,
}

impl FromStr for NetworkCidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut parts = s.rsplitn(3, '/');
        let (Some(len), Some(ip), Some(network)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(format!("{s:?} is not network/ip/length (use \"/10.0.0.0/24\" for the default network)"));
        };
        Ok(NetworkCidr { network: network.to_string(), net: format!("{ip}/{len}").parse()? })
    }
}

impl fmt::Display for NetworkCidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.net)
    }
}

/// `namespace/hostname`, how workloads name the services they back.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NamespacedHostname {
    pub namespace: String,
    pub hostname: String,
}

impl FromStr for NamespacedHostname {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once('/') {
            Some((ns, host)) if !ns.is_empty() && !host.is_empty() && !host.contains('/') => {
                Ok(NamespacedHostname { namespace: ns.to_string(), hostname: host.to_string() })
            }
            _ => Err(format!("{s:?} is not namespace/hostname")),
        }
    }
}

impl fmt::Display for NamespacedHostname {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.hostname)
    }
}

/// A CIDR block, as written in policies (`10.0.0.0/8`; a bare address means just that host).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IpNet {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl IpNet {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = if self.prefix == 0 { 0 } else { u32::MAX << (32 - u32::from(self.prefix)) };
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = if self.prefix == 0 { 0 } else { u128::MAX << (128 - u32::from(self.prefix)) };
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for IpNet {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (ip, prefix) = match s.split_once('/') {
            Some((ip, p)) => (ip, Some(p)),
            None => (s, None),
        };
        let addr = ip.parse::<IpAddr>().map_err(|_| format!("{s:?} is not a CIDR (ip/length)"))?.to_canonical();
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?}: prefix length must be 0..={max}"))?,
        };
        Ok(IpNet { addr, prefix })
    }
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Serde through `FromStr`/`Display` for the string-shaped types above.
macro_rules! string_serde {
    ($($t:ty),*) => {$(
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    )*};
}
string_serde!(NetworkAddress, NamespacedHostname, IpNet, NetworkCidr);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_address() {
        let a: NetworkAddress = "/127.10.0.1".parse().unwrap();
        assert_eq!(a.network, "");
        assert_eq!(a.to_string(), "/127.10.0.1");
        let b: NetworkAddress = "remote/::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(b.network, "remote");
        assert_eq!(b.address, "10.0.0.1".parse::<IpAddr>().unwrap(), "v4-mapped is canonicalised");
        assert!("10.0.0.1".parse::<NetworkAddress>().unwrap_err().contains("network/ip"));
        assert!("net/10.0.0".parse::<NetworkAddress>().is_err());
    }

    #[test]
    fn cidr() {
        let n: IpNet = "10.1.0.0/16".parse().unwrap();
        assert!(n.contains("10.1.200.3".parse().unwrap()));
        assert!(!n.contains("10.2.0.1".parse().unwrap()));
        assert!(n.contains("::ffff:10.1.0.9".parse().unwrap()));
        let all: IpNet = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("1.2.3.4".parse().unwrap()));
        let host: IpNet = "fd00::1".parse().unwrap();
        assert_eq!(host.prefix, 128);
        assert!(host.contains("fd00::1".parse().unwrap()));
        assert!(!host.contains("fd00::2".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<IpNet>().is_err());
        assert!("nope/8".parse::<IpNet>().is_err());
    }
}
