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
    let [a, b, ..] = ip.octets();
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
        // benchmarking, 198.18.0.0/15
        || (a == 198 && (18..20).contains(&b))
        // reserved, 240.0.0.0/4
        || a >= 240)
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_multicast()
        || ip.is_unique_local()
        || ip.is_unicast_link_local()
        // documentation 2001:db8::/32
        || (ip.segments()[0] == 0x2001 && ip.segments()[1] == 0x0db8))
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
        ] {
            assert!(!is_public(ip.parse().unwrap()), "{ip}");
        }
        for ip in [
            "1.1.1.1",
            "93.184.216.34",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
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
