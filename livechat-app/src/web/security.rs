//! The HTTP edge: who the client is (its address, through trusted proxies only), whether the
//! request is for us (`Host`) and from one of our pages (`Origin`), the name cookie, and the
//! security headers every response carries.
//!
//! DNS rebinding: a page on `evil.test` whose name is made to resolve to this server sends
//! `Host: evil.test` and `Origin: http://evil.test`, which agree. So `Host` itself must be one
//! we serve: an IP literal (a rebinding needs a name), `localhost`, or the host of a configured
//! origin; only then may an `Origin` that matches it pass.

use std::net::{IpAddr, SocketAddr};

use axum::http::header::{self, HeaderMap, HeaderValue};
use axum::response::Response;

use crate::domain::validate_sender;

/// The cookie that remembers the reader's name.
pub const NAME_COOKIE: &str = "livechat_name";

/// The Content-Security-Policy of every page: scripts, styles and sockets from this origin
/// only, no inline script or style, no framing.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; style-src 'self'; \
     img-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'; object-src 'none'";

/// The peer address of a connection, put in each request's extensions by the server loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer(pub SocketAddr);

/// The listener a connection came in on, put in each request's extensions by the server loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    /// The chat's listener (`--listen`), the one a proxy forwards to.
    Public,
    /// The admin listener (`--admin-listen`, loopback only): the admin routes answer there
    /// without a token, and `X-Forwarded-*` headers are ignored.
    Admin,
}

/// Networks whose connections may say, in `X-Forwarded-For` and `X-Forwarded-Proto`, who the
/// client is and whether it came over TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustedProxies {
    networks: Vec<(IpAddr, u8)>,
}

/// Why a proxy network could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not an address or a network like 127.0.0.0/8")]
pub struct BadNetwork(String);

impl TrustedProxies {
    /// Loopback only (`127.0.0.0/8`, `::1`): a proxy on the same machine, such as nginx in
    /// front of the app. Another process on the machine could then claim any client address,
    /// which is no more than it could do anyway.
    pub fn loopback() -> Self {
        Self { networks: vec![(IpAddr::from([127, 0, 0, 0]), 8), (IpAddr::from([0u16, 0, 0, 0, 0, 0, 0, 1]), 128)] }
    }

    /// No proxy: every connection's own address is the client's.
    pub fn none() -> Self {
        Self { networks: Vec::new() }
    }

    /// Adds `network` (`10.0.0.0/8`, `::1`, `192.168.1.5`).
    pub fn add(&mut self, network: &str) -> Result<(), BadNetwork> {
        let bad = || BadNetwork(network.to_owned());
        let (address, bits) = match network.split_once('/') {
            Some((address, bits)) => (address, Some(bits.parse::<u8>().map_err(|_| bad())?)),
            None => (network, None),
        };
        let address: IpAddr = address.parse().map_err(|_| bad())?;
        let max = if address.is_ipv4() { 32 } else { 128 };
        let bits = bits.unwrap_or(max);
        if bits > max {
            return Err(bad());
        }
        self.networks.push((address, bits));
        Ok(())
    }

    /// Whether `address` is a trusted proxy.
    pub fn contains(&self, address: IpAddr) -> bool {
        let address = canonical(address);
        self.networks.iter().any(|&(network, bits)| in_network(address, canonical(network), bits))
    }
}

impl Default for TrustedProxies {
    fn default() -> Self {
        Self::loopback()
    }
}

fn canonical(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(address, IpAddr::V4),
        v4 => v4,
    }
}

fn in_network(address: IpAddr, network: IpAddr, bits: u8) -> bool {
    match (address, network) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let mask = if bits == 0 { 0 } else { u32::MAX << (32 - u32::from(bits)) };
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let mask = if bits == 0 { 0 } else { u128::MAX << (128 - u32::from(bits)) };
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

/// Who the client of a request is, as far as its connection tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClientAddress {
    /// Its address: the peer's own, or the one a trusted proxy put in `X-Forwarded-For`.
    Known(IpAddr),
    /// The peer is a trusted proxy that did not say who the client is in a form we accept: no
    /// `X-Forwarded-For`, or a hop that is not a bare IP address (`1.2.3.4:5678`, `unknown`,
    /// `[::1]:80`, a name). Never the proxy's own address, never loopback: all such clients
    /// share one bucket of each per-address limit, apart from every real address.
    Unknown,
}

impl ClientAddress {
    /// The address, when known.
    pub fn ip(self) -> Option<IpAddr> {
        match self {
            Self::Known(ip) => Some(ip),
            Self::Unknown => None,
        }
    }
}

impl std::fmt::Display for ClientAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Known(ip) => ip.fmt(f),
            Self::Unknown => f.write_str("unknown"),
        }
    }
}

/// The client's address: the peer's, unless the peer is a trusted proxy; then the last
/// `X-Forwarded-For` hop that is not itself a trusted proxy (walking back over trusted ones).
/// Every hop walked must be a bare IP address; a missing header, or a hop that is anything
/// else, makes the client [`ClientAddress::Unknown`] (strict: `ip:port` and `[v6]:port` are
/// not accepted, as no proxy we support writes them).
pub fn client_address(peer: SocketAddr, headers: &HeaderMap, trusted: &TrustedProxies) -> ClientAddress {
    let peer = canonical(peer.ip());
    if !trusted.contains(peer) {
        return ClientAddress::Known(peer);
    }
    let mut forwarded = Vec::new();
    for value in headers.get_all("x-forwarded-for") {
        let Ok(value) = value.to_str() else { return ClientAddress::Unknown };
        forwarded.push(value);
    }
    let mut client = ClientAddress::Unknown;
    for hop in forwarded.iter().rev().flat_map(|value| value.rsplit(',')) {
        let Ok(address) = hop.trim().parse::<IpAddr>() else { return ClientAddress::Unknown };
        let address = canonical(address);
        client = ClientAddress::Known(address);
        if !trusted.contains(address) {
            break;
        }
    }
    client
}

/// Whether the request reached us over TLS: `behind_tls` (the operator says so), or a trusted
/// proxy's `X-Forwarded-Proto: https`.
pub fn is_https(peer: SocketAddr, headers: &HeaderMap, trusted: &TrustedProxies, behind_tls: bool) -> bool {
    behind_tls
        || (trusted.contains(canonical(peer.ip()))
            && headers
                .get("x-forwarded-proto")
                .and_then(|v| v.to_str().ok())
                .is_some_and(|proto| proto.split(',').next().is_some_and(|p| p.trim().eq_ignore_ascii_case("https"))))
}

/// The host part of a `Host` header or of an origin's authority (`[::1]:4000` → `::1`).
fn host_of(authority: &str) -> &str {
    if let Some(rest) = authority.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    authority.rsplit_once(':').map_or(authority, |(host, port)| {
        if port.bytes().all(|b| b.is_ascii_digit()) {
            host
        } else {
            authority
        }
    })
}

/// Whether `Host` names this server: an IP literal, `localhost`, or the host of an allowed
/// origin.
pub fn host_allowed(headers: &HeaderMap, allowed_origins: &[String]) -> bool {
    let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) else { return false };
    let name = host_of(host);
    name.parse::<IpAddr>().is_ok()
        || name.eq_ignore_ascii_case("localhost")
        || allowed_origins.iter().any(|origin| {
            let authority = origin.split_once("://").map_or(origin.as_str(), |(_, rest)| rest);
            host_of(authority.trim_end_matches('/')).eq_ignore_ascii_case(name)
        })
}

/// Whether a request from a browser comes from one of our pages: its `Origin` (sent by
/// browsers on websocket upgrades and form posts) must be an allowed origin, or name the host
/// it was sent to *and* that host must pass [`host_allowed`]. Requests without `Origin` are not
/// from a browser page and pass.
pub fn origin_allowed(headers: &HeaderMap, allowed: &[String]) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else { return true };
    let Ok(origin) = origin.to_str() else { return false };
    if allowed.iter().any(|a| a.trim_end_matches('/') == origin) {
        return true;
    }
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    let origin_host = origin.strip_prefix("http://").or_else(|| origin.strip_prefix("https://"));
    matches!((origin_host, host), (Some(o), Some(h)) if o.eq_ignore_ascii_case(h)) && host_allowed(headers, allowed)
}

/// The reader's name from the cookie, if set and valid.
pub fn name_from_cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, _)| *key == NAME_COOKIE)
        .and_then(|(_, value)| percent_decode(value))
        .and_then(|name| validate_sender(&name).ok().map(str::to_owned))
}

/// The `Set-Cookie` value remembering `name`; `Secure` when the request came over TLS.
pub fn name_cookie(name: &str, secure: bool) -> HeaderValue {
    let secure = if secure { "; Secure" } else { "" };
    let value =
        format!("{NAME_COOKIE}={}; Path=/; Max-Age=31536000; SameSite=Lax; HttpOnly{secure}", percent_encode(name));
    HeaderValue::from_str(&value).unwrap_or_else(|_| HeaderValue::from_static("livechat_name=; Path=/"))
}

fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn percent_decode(text: &str) -> Option<String> {
    let mut bytes = Vec::with_capacity(text.len());
    let mut input = text.bytes();
    while let Some(b) = input.next() {
        if b == b'%' {
            let hex = [input.next()?, input.next()?];
            bytes.push(u8::from_str_radix(std::str::from_utf8(&hex).ok()?, 16).ok()?);
        } else {
            bytes.push(b);
        }
    }
    String::from_utf8(bytes).ok()
}

/// Adds the security headers to a response.
pub async fn security_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CONTENT_SECURITY_POLICY));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("same-origin"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (key, value) in pairs {
            map.append(*key, HeaderValue::from_str(value).expect("header"));
        }
        map
    }

    #[test]
    fn cookie_names_round_trip() {
        for name in ["alice", "Zoë Müller", "a b;c=d", "<script>"] {
            let cookie = name_cookie(name, false);
            let pair = cookie.to_str().expect("ascii").split(';').next().expect("pair").to_owned();
            assert_eq!(name_from_cookie(&headers(&[("cookie", &pair)])).as_deref(), Some(name));
        }
        assert_eq!(name_from_cookie(&headers(&[("cookie", "livechat_name=%ZZ")])), None);
        assert_eq!(name_from_cookie(&headers(&[("cookie", "livechat_name=%20%20")])), None, "blank name");
        assert_eq!(name_from_cookie(&headers(&[("cookie", "other=1; livechat_name=bob")])).as_deref(), Some("bob"));
        assert_eq!(name_from_cookie(&headers(&[("cookie", "livechat_name=a%E2%80%AEb")])), None, "a bidi override");
        assert!(name_cookie("a", true).to_str().expect("ascii").ends_with("; Secure"));
        assert!(!name_cookie("a", false).to_str().expect("ascii").contains("Secure"));
    }

    #[test]
    fn origins_and_hosts() {
        let allowed = vec!["http://example.test".to_owned()];
        assert!(origin_allowed(&headers(&[("host", "127.0.0.1:4000")]), &allowed), "no origin: not a browser");
        assert!(origin_allowed(&headers(&[("host", "127.0.0.1:4000"), ("origin", "http://127.0.0.1:4000")]), &allowed));
        assert!(origin_allowed(&headers(&[("host", "x:1"), ("origin", "http://example.test")]), &allowed));
        assert!(!origin_allowed(&headers(&[("host", "127.0.0.1:4000"), ("origin", "http://evil.test")]), &allowed));
        assert!(!origin_allowed(&headers(&[("host", "127.0.0.1:4000"), ("origin", "http://127.0.0.1:4001")]), &[]));
        assert!(!origin_allowed(&headers(&[("origin", "null")]), &[]));
        // DNS rebinding: Host and Origin agree on a name we do not serve.
        assert!(!origin_allowed(
            &headers(&[("host", "evil.test:4000"), ("origin", "http://evil.test:4000")]),
            &allowed
        ));
        assert!(origin_allowed(&headers(&[("host", "localhost:4000"), ("origin", "http://localhost:4000")]), &[]));
        assert!(host_allowed(&headers(&[("host", "[::1]:4000")]), &[]));
        assert!(host_allowed(&headers(&[("host", "example.test")]), &allowed));
        assert!(!host_allowed(&headers(&[("host", "evil.test")]), &allowed));
        assert!(!host_allowed(&headers(&[]), &allowed));
    }

    #[test]
    fn client_addresses_come_from_trusted_proxies_only() {
        let trusted = TrustedProxies::loopback();
        let proxy: SocketAddr = "127.0.0.1:5000".parse().expect("addr");
        let stranger: SocketAddr = "203.0.113.9:5000".parse().expect("addr");
        let known = |ip: &str| ClientAddress::Known(ip.parse().expect("ip"));
        let forwarded = headers(&[("x-forwarded-for", "198.51.100.1, 203.0.113.7")]);
        assert_eq!(client_address(proxy, &forwarded, &trusted), known("203.0.113.7"));
        assert_eq!(client_address(stranger, &forwarded, &trusted), known("203.0.113.9"), "not a proxy: ignored");
        assert_eq!(client_address(proxy, &forwarded, &TrustedProxies::none()), known("127.0.0.1"));
        let mut chain = TrustedProxies::loopback();
        chain.add("203.0.113.0/24").expect("network");
        assert_eq!(client_address(proxy, &forwarded, &chain), known("198.51.100.1"));
        assert!(chain.add("10.0.0.0/33").is_err() && chain.add("nope").is_err());
        let https = headers(&[("x-forwarded-proto", "https")]);
        assert!(is_https(proxy, &https, &trusted, false));
        assert!(!is_https(stranger, &https, &trusted, false), "only a trusted proxy may say so");
        assert!(is_https(stranger, &headers(&[]), &trusted, true));
    }

    #[test]
    fn a_proxy_that_does_not_name_the_client_makes_it_unknown_never_the_proxy() {
        let trusted = TrustedProxies::loopback();
        let proxy: SocketAddr = "127.0.0.1:5000".parse().expect("addr");
        let v6_proxy: SocketAddr = "[::1]:5000".parse().expect("addr");
        for peer in [proxy, v6_proxy] {
            assert_eq!(client_address(peer, &headers(&[]), &trusted), ClientAddress::Unknown, "no header");
            for hop in ["1.2.3.4:5678", "unknown", "[::1]:80", "[2001:db8::1]", "garbage", "", " ", "_hidden"] {
                let forwarded = headers(&[("x-forwarded-for", hop)]);
                assert_eq!(client_address(peer, &forwarded, &trusted), ClientAddress::Unknown, "{hop:?}");
                let after_a_good_one = headers(&[("x-forwarded-for", &format!("198.51.100.1, {hop}"))]);
                assert_eq!(client_address(peer, &after_a_good_one, &trusted), ClientAddress::Unknown, "{hop:?} last");
            }
        }
        // A bad hop behind a trusted one is walked to, and is still unknown.
        let behind_loopback = headers(&[("x-forwarded-for", "unknown, 127.0.0.1")]);
        assert_eq!(client_address(proxy, &behind_loopback, &trusted), ClientAddress::Unknown);
        // Bare addresses of both families are accepted; an IPv4-mapped one is the IPv4 one.
        let v6 = headers(&[("x-forwarded-for", "2001:db8::7")]);
        assert_eq!(client_address(proxy, &v6, &trusted), ClientAddress::Known("2001:db8::7".parse().expect("ip")));
        let mapped = headers(&[("x-forwarded-for", "::ffff:198.51.100.3")]);
        assert_eq!(
            client_address(v6_proxy, &mapped, &trusted),
            ClientAddress::Known("198.51.100.3".parse().expect("ip"))
        );
        // Only trusted hops: the first of them (a client on the proxy's own machine).
        let local = headers(&[("x-forwarded-for", "127.0.0.1")]);
        assert_eq!(client_address(proxy, &local, &trusted), ClientAddress::Known("127.0.0.1".parse().expect("ip")));
        assert_eq!(ClientAddress::Unknown.to_string(), "unknown");
        assert_eq!(ClientAddress::Unknown.ip(), None);
    }
}
