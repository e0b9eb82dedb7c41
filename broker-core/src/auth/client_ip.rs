//! The client address of a request, believing `X-Forwarded-For` only from trusted proxies.

use std::net::IpAddr;

use ipnet::IpNet;

/// The address a request came from. `peer` is the TCP peer. When it is a trusted proxy,
/// the `X-Forwarded-For` entries (`lines`: every header line, in order; each a comma
/// list) are read right to left and the first address that is not itself a trusted
/// proxy is the client (what lies left of it is whatever the client sent, so it is never
/// believed). Ports are stripped (`1.2.3.4:5`, `[::1]:5`). An entry that does not parse
/// (`unknown`, empty) where the walk reaches it makes the chain unbelievable: an error,
/// never the proxy's own address.
pub fn client_ip<'a>(
    peer: IpAddr,
    lines: impl IntoIterator<Item = &'a str>,
    trusted: &[IpNet],
) -> Result<IpAddr, String> {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|n| n.contains(ip));
    if !is_trusted(&peer) {
        return Ok(peer);
    }
    let hops: Vec<&str> = lines.into_iter().flat_map(|l| l.split(',')).collect();
    let mut client = peer;
    for hop in hops.iter().rev() {
        let ip = parse_hop(hop).ok_or_else(|| {
            format!(
                "X-Forwarded-For entry `{}` is not an address",
                hop.trim().escape_debug()
            )
        })?;
        client = ip;
        if !is_trusted(&ip) {
            break;
        }
    }
    Ok(client)
}

/// One `X-Forwarded-For` entry: an address, possibly with a port.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    let hop = hop.trim();
    if let Ok(ip) = hop.parse::<IpAddr>() {
        return Some(ip);
    }
    hop.parse::<std::net::SocketAddr>().ok().map(|a| a.ip())
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

    fn ip(peer: &str, lines: &[&str], trusted: &[&str]) -> Result<String, String> {
        client_ip(peer.parse().unwrap(), lines.iter().copied(), &nets(trusted))
            .map(|ip| ip.to_string())
    }

    #[test]
    fn untrusted_peer_header_is_ignored() {
        let got = ip("203.0.113.9", &["127.0.0.1"], &["10.0.0.0/8"]);
        assert_eq!(got.unwrap(), "203.0.113.9");
    }

    #[test]
    fn trusted_chain_is_walked_from_the_right() {
        let t = ["10.0.0.0/8", "127.0.0.1"];
        // The client forged "1.1.1.1"; the proxy appended the real address.
        let got = ip("127.0.0.1", &["1.1.1.1, 198.51.100.7, 10.1.2.3"], &t);
        assert_eq!(got.unwrap(), "198.51.100.7");
        assert_eq!(ip("127.0.0.1", &[], &t).unwrap(), "127.0.0.1");
        // What lies left of the client is never read, parseable or not.
        let got = ip("127.0.0.1", &["garbage, 198.51.100.7"], &t);
        assert_eq!(got.unwrap(), "198.51.100.7");
    }

    #[test]
    fn every_header_line_counts_in_order() {
        // A forged first line and the proxy's appended second line (HAProxy, some
        // ingresses): the second line's address is the client.
        let got = ip("127.0.0.1", &["10.0.0.5", "203.0.113.9"], &["127.0.0.1/32"]);
        assert_eq!(got.unwrap(), "203.0.113.9");
    }

    #[test]
    fn ports_are_stripped_and_garbage_is_refused_not_the_proxy() {
        let t = ["127.0.0.1/32", "10.0.0.0/8"];
        assert_eq!(
            ip("127.0.0.1", &["203.0.113.9:4711"], &t).unwrap(),
            "203.0.113.9"
        );
        assert_eq!(
            ip("127.0.0.1", &["[2001:db8::1]:443"], &t).unwrap(),
            "2001:db8::1"
        );
        assert_eq!(
            ip("127.0.0.1", &["2001:db8::2"], &t).unwrap(),
            "2001:db8::2"
        );
        for bad in [
            &["unknown"][..],
            &["garbage, 10.0.0.5"],
            &[""],
            &["1.2.3.4,"],
        ] {
            assert!(ip("127.0.0.1", bad, &t).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn parse_accepts_ips_and_cidrs() {
        assert_eq!(nets(&["127.0.0.1", "::1", "10.0.0.0/8"]).len(), 3);
        assert_eq!(parse_nets(&["nope".into()]).unwrap_err().0, 0);
    }
}

#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    fn any_ip() -> impl Strategy<Value = IpAddr> {
        prop_oneof![
            any::<[u8; 4]>().prop_map(IpAddr::from),
            any::<[u16; 8]>().prop_map(IpAddr::from),
        ]
    }

    /// An entry as a proxy may write it: bare, or with a port (IPv6 in brackets then).
    fn written(ip: IpAddr, port: Option<u16>) -> String {
        match (ip, port) {
            (_, None) => ip.to_string(),
            (IpAddr::V4(v4), Some(p)) => format!("{v4}:{p}"),
            (IpAddr::V6(v6), Some(p)) => format!("[{v6}]:{p}"),
        }
    }

    proptest! {
        /// Whatever the header says: no panic; an untrusted peer is the client, and
        /// a trusted one yields an address or a typed refusal.
        #[test]
        fn any_header_is_handled(lines in proptest::collection::vec(".{0,80}", 0..4), peer in any_ip()) {
            let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
            let got = client_ip(peer, lines.iter().map(String::as_str), &trusted);
            if !trusted[0].contains(&peer) {
                prop_assert_eq!(got, Ok(peer));
            }
        }

        /// Behind trusted proxies the client is the rightmost untrusted entry, however
        /// the chain is split into header lines and whatever ports are written.
        #[test]
        fn the_client_is_the_rightmost_untrusted_hop(
            chain in proptest::collection::vec((any_ip(), proptest::option::of(any::<u16>())), 1..6),
            proxies in proptest::collection::vec((0u8..=255, proptest::option::of(any::<u16>())), 0..3),
            split in 0usize..8,
        ) {
            let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
            let is_trusted = |ip: &IpAddr| trusted[0].contains(ip);
            let mut hops: Vec<String> = chain.iter().map(|(ip, p)| written(*ip, *p)).collect();
            hops.extend(proxies.iter().map(|(b, p)| written(IpAddr::from([10, 0, 0, *b]), *p)));
            let at = split.min(hops.len());
            let lines = [hops[..at].join(", "), hops[at..].join(",")];
            let peer = IpAddr::from([10, 9, 9, 9]);
            let expected = chain
                .iter()
                .rev()
                .map(|(ip, _)| *ip)
                .find(|ip| !is_trusted(ip))
                .unwrap_or(chain[0].0);
            let lines = lines.iter().filter(|l| !l.is_empty()).map(String::as_str);
            prop_assert_eq!(client_ip(peer, lines, &trusted), Ok(expected));
        }

        /// An entry that is no address, where the walk reaches it, is a refusal —
        /// never the proxy's own address.
        #[test]
        fn garbage_where_the_walk_reaches_is_refused(junk in "[a-z_ ]{1,12}") {
            let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
            let peer = IpAddr::from([10, 0, 0, 1]);
            let line = format!("203.0.113.9, {junk}, 10.0.0.2");
            prop_assert!(client_ip(peer, [line.as_str()], &trusted).is_err());
        }
    }
}
