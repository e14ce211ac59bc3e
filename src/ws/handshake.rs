//! The server side of the opening handshake (RFC 6455 §4.2) as a pure check over the request
//! head: is this a WebSocket upgrade, which key to answer, which subprotocol to select.

use axum::http::{header, HeaderMap, Method, Version};
use base64::Engine;
use sha1::{Digest, Sha1};

const GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Why a request is not an acceptable WebSocket upgrade (400 with this text).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum HandshakeError {
    #[error("a WebSocket upgrade is a GET over HTTP/1.1")]
    MethodOrVersion,
    #[error("`Connection: upgrade` and `Upgrade: websocket` are required")]
    NotUpgrade,
    #[error("`Sec-WebSocket-Version: 13` is required")]
    Version,
    #[error("`Sec-WebSocket-Key` must be 16 bytes in base64")]
    Key,
}

/// An accepted upgrade: the `Sec-WebSocket-Accept` value and the selected subprotocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Accepted {
    pub(crate) accept: String,
    pub(crate) protocol: Option<&'static str>,
}

fn has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Checks the request head; selects `supported` if the client offers it.
pub(crate) fn check(
    method: &Method,
    version: Version,
    headers: &HeaderMap,
    supported: &'static str,
) -> Result<Accepted, HandshakeError> {
    if method != Method::GET || version != Version::HTTP_11 {
        return Err(HandshakeError::MethodOrVersion);
    }
    if !has_token(headers, header::CONNECTION, "upgrade") || !has_token(headers, header::UPGRADE, "websocket") {
        return Err(HandshakeError::NotUpgrade);
    }
    if headers.get(header::SEC_WEBSOCKET_VERSION).is_none_or(|v| v.as_bytes() != b"13") {
        return Err(HandshakeError::Version);
    }
    let key = headers.get(header::SEC_WEBSOCKET_KEY).ok_or(HandshakeError::Key)?;
    let decoded = base64::engine::general_purpose::STANDARD.decode(key.as_bytes()).map_err(|_| HandshakeError::Key)?;
    if decoded.len() != 16 {
        return Err(HandshakeError::Key);
    }
    let protocol = has_token(headers, header::SEC_WEBSOCKET_PROTOCOL, supported).then_some(supported);
    Ok(Accepted { accept: accept_key(key.as_bytes()), protocol })
}

/// `Sec-WebSocket-Accept` for a client key.
pub(crate) fn accept_key(key: &[u8]) -> String {
    let mut h = Sha1::new();
    h.update(key);
    h.update(GUID);
    base64::engine::general_purpose::STANDARD.encode(h.finalize())
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    fn upgrade_headers() -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, Upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(header::SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
        h.insert(header::SEC_WEBSOCKET_KEY, HeaderValue::from_static("dGhlIHNhbXBsZSBub25jZQ=="));
        h
    }

    #[test]
    fn rfc_6455_example_key() {
        let a = check(&Method::GET, Version::HTTP_11, &upgrade_headers(), "v1").expect("accepted");
        assert_eq!(a.accept, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        assert_eq!(a.protocol, None);
    }

    #[test]
    fn selects_only_the_supported_subprotocol() {
        let mut h = upgrade_headers();
        h.insert(header::SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static("bearer.abc, incident-stream.v1"));
        let a = check(&Method::GET, Version::HTTP_11, &h, "incident-stream.v1").expect("accepted");
        assert_eq!(a.protocol, Some("incident-stream.v1"));
        h.insert(header::SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static("bearer.abc"));
        assert_eq!(check(&Method::GET, Version::HTTP_11, &h, "incident-stream.v1").expect("ok").protocol, None);
    }

    #[test]
    fn refuses_what_is_not_an_upgrade() {
        let h = upgrade_headers();
        assert_eq!(check(&Method::POST, Version::HTTP_11, &h, "v1"), Err(HandshakeError::MethodOrVersion));
        assert_eq!(check(&Method::GET, Version::HTTP_2, &h, "v1"), Err(HandshakeError::MethodOrVersion));
        let mut no_upgrade = h.clone();
        no_upgrade.remove(header::UPGRADE);
        assert_eq!(check(&Method::GET, Version::HTTP_11, &no_upgrade, "v1"), Err(HandshakeError::NotUpgrade));
        let mut v8 = h.clone();
        v8.insert(header::SEC_WEBSOCKET_VERSION, HeaderValue::from_static("8"));
        assert_eq!(check(&Method::GET, Version::HTTP_11, &v8, "v1"), Err(HandshakeError::Version));
        let mut short_key = h.clone();
        short_key.insert(header::SEC_WEBSOCKET_KEY, HeaderValue::from_static("c2hvcnQ="));
        assert_eq!(check(&Method::GET, Version::HTTP_11, &short_key, "v1"), Err(HandshakeError::Key));
        let mut no_key = h;
        no_key.remove(header::SEC_WEBSOCKET_KEY);
        assert_eq!(check(&Method::GET, Version::HTTP_11, &no_key, "v1"), Err(HandshakeError::Key));
    }
}
