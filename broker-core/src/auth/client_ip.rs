//! The client address of a request, believing `X-Forwarded-For` only from trusted proxies.

use std::net::IpAddr;

use ipnet::IpNet;

/// The address a request came from. `peer` is the TCP peer. When it is a trusted proxy,
/// `X-Forwarded-For` is read right to left and the first address that is not itself a
/// trusted proxy is the client (the left part of the header is whatever the client sent,
/// so it is never believed). Malformed entries stop the walk at the last good address.
pub fn client_ip(peer: IpAddr, forwarded_for: Option<&str>, trusted: &[IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|n| n.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    let Some(header) = forwarded_for else {
        return peer;
    };
    let mut client = peer;
    for hop in header.rsplit(',') {
        match hop.trim().parse::<IpAddr>() {
            Ok(ip) => {
                client = ip;
                if !is_trusted(&ip) {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    client
}

/// Parses a list of IPs or CIDRs (a plain IP is a /32 or /128).
pub fn parse_nets(items: &[String]) -> Result<Vec<IpNet>, (usize, String)> {
    items
        .iter()
        .enumerate()
        .map(|(i, s)| {
            s.parse::<IpNet>()
                .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| (i, format!("`{s}` is not an IP address or CIDR")))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(s: &[&str]) -> Vec<IpNet> {
        parse_nets(&s.iter().map(|x| x.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn untrusted_peer_header_is_ignored() {
        let ip = client_ip(
            "203.0.113.9".parse().unwrap(),
            Some("127.0.0.1"),
            &nets(&["10.0.0.0/8"]),
        );
        assert_eq!(ip.to_string(), "203.0.113.9");
    }

    #[test]
    fn trusted_chain_is_walked_from_the_right() {
        let t = nets(&["10.0.0.0/8", "127.0.0.1"]);
        // The client forged "1.1.1.1"; the proxy appended the real address.
        let ip = client_ip(
            "127.0.0.1".parse().unwrap(),
            Some("1.1.1.1, 198.51.100.7, 10.1.2.3"),
            &t,
        );
        assert_eq!(ip.to_string(), "198.51.100.7");
        let ip = client_ip("127.0.0.1".parse().unwrap(), None, &t);
        assert_eq!(ip.to_string(), "127.0.0.1");
        let ip = client_ip("127.0.0.1".parse().unwrap(), Some("garbage, 10.0.0.5"), &t);
        assert_eq!(ip.to_string(), "10.0.0.5");
    }

    #[test]
    fn parse_accepts_ips_and_cidrs() {
        assert_eq!(nets(&["127.0.0.1", "::1", "10.0.0.0/8"]).len(), 3);
        assert_eq!(parse_nets(&["nope".into()]).unwrap_err().0, 0);
    }
}
