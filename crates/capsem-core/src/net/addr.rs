//! Which upstream addresses the proxy may connect to: public ones only, unless the user mapped
//! the name to an address on purpose (`upstream_override`). A guest must not reach the host's
//! own services, its LAN or a cloud metadata endpoint through a name it controls (an allowed
//! wildcard whose DNS points inward, or `default = "allow"`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Whether `ip` is an address on the public internet (not loopback, private, link-local,
/// shared, multicast, reserved or unspecified).
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => is_public_v4(v4),
            None => is_public_v6(v6),
        },
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_documentation()
        || a == 0
        // shared address space (carrier-grade NAT), 100.64.0.0/10
        || (a == 100 && (64..128).contains(&b))
        // protocol assignments, 192.0.0.0/24
        || (a == 192 && b == 0 && c == 0)
        // benchmarking, 198.18.0.0/15
        || (a == 198 && (18..20).contains(&b))
        // reserved, 240.0.0.0/4
        || a >= 240)
}

/// Public IPv6 is global unicast (2000::/3) less documentation, benchmarking and Teredo. Three
/// forms carry an IPv4 address, which decides instead: NAT64's well-known prefix
/// (64:ff9b::/96, how an IPv6-only host reaches IPv4 sites), the old IPv4-compatible form
/// (::a.b.c.d) and 6to4 (2002::/16); behind NAT64, `64:ff9b::a0a:1` is 10.10.0.1 on the
/// host's own network.
fn is_public_v6(ip: Ipv6Addr) -> bool {
    let s = ip.segments();
    let v4 = |hi: u16, lo: u16| {
        let ([a, b], [c, d]) = (hi.to_be_bytes(), lo.to_be_bytes());
        is_public_v4(Ipv4Addr::new(a, b, c, d))
    };
    match s {
        [0x64, 0xff9b, 0, 0, 0, 0, hi, lo] | [0, 0, 0, 0, 0, 0, hi, lo] => v4(hi, lo),
        [0x2002, hi, lo, ..] => v4(hi, lo),
        [0x2001, 0x0db8, ..] | [0x2001, 0, ..] | [0x2001, 2, 0, ..] => false,
        [first, ..] => first & 0xe000 == 0x2000,
    }
}

/// Resolve `target` (`host:port`) and keep its public addresses; when it resolves to none, the
/// error names the inward address it found.
pub async fn public_addrs(target: &str) -> Result<Vec<SocketAddr>, AddrError> {
    let all: Vec<SocketAddr> = tokio::net::lookup_host(target)
        .await
        .map_err(|e| AddrError::Resolve(e.to_string()))?
        .collect();
    let public: Vec<SocketAddr> = all.iter().copied().filter(|a| is_public(a.ip())).collect();
    match (public.is_empty(), all.first()) {
        (false, _) => Ok(public),
        (true, Some(inward)) => Err(AddrError::Inward(inward.ip())),
        (true, None) => Err(AddrError::Resolve("no address".into())),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AddrError {
    #[error("cannot resolve it: {0}")]
    Resolve(String),
    #[error("it resolves to {0}, an address on the host's own network or a reserved one; capsem reaches public addresses only (map the name with upstream_override to allow it on purpose)")]
    Inward(IpAddr),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inward_and_reserved_addresses_are_not_public() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "240.0.0.1",
            "::1",
            "::",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "192.0.0.170",
            // IPv4 inside IPv6: NAT64, IPv4-compatible, 6to4
            "64:ff9b::a0a:1",
            "64:ff9b::127.0.0.1",
            "::10.0.0.1",
            "2002:a9fe:a9fe::1",
            "2002:c0a8:101::1",
            // outside global unicast, or special within it
            "64:ff9b:1::1",
            "fec0::1",
            "ff02::1",
            "2001:db8::1",
            "2001:0:4136:e378::1",
            "2001:2::1",
        ] {
            assert!(!is_public(ip.parse().unwrap()), "{ip}");
        }
        for ip in [
            "1.1.1.1",
            "93.184.216.34",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
            "64:ff9b::101:101",
            "2002:808:808::1",
            "2a00:1450:4001::1",
        ] {
            assert!(is_public(ip.parse().unwrap()), "{ip}");
        }
    }

    #[tokio::test]
    async fn a_name_that_resolves_inward_is_refused() {
        let err = public_addrs("localhost:80").await.unwrap_err();
        assert!(
            matches!(err, AddrError::Inward(ip) if ip.is_loopback()),
            "{err}"
        );
        assert!(err.to_string().contains("upstream_override"));
        assert!(public_addrs("127.0.0.1:443").await.is_err());
        assert_eq!(
            public_addrs("1.1.1.1:443").await.unwrap(),
            vec!["1.1.1.1:443".parse().unwrap()]
        );
    }
}
