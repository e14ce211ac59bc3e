//! Where a bearer token is found on a request, in DESIGN.md's order: the `Authorization: Bearer`
//! header, a `bearer.<token>` entry of `Sec-WebSocket-Protocol` (browsers cannot set headers),
//! then `?access_token=` when the configuration allows it. Pure: reads headers, returns a slice.

use axum::http::{header, HeaderMap, Uri};

use super::AuthError;

/// Prefix of the subprotocol entry that carries a token.
pub const BEARER_PROTOCOL_PREFIX: &str = "bearer.";

/// Finds the request's token. `Ok(None)` means no token anywhere.
pub fn extract(headers: &HeaderMap, uri: &Uri, allow_query: bool) -> Result<Option<String>, AuthError> {
    if let Some(value) = headers.get(header::AUTHORIZATION) {
        let value = value.to_str().map_err(|_| AuthError::Malformed("Authorization header is not ASCII"))?;
        let (scheme, token) =
            value.split_once(' ').ok_or(AuthError::Malformed("Authorization must be `Bearer <token>`"))?;
        if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
            return Err(AuthError::Malformed("Authorization must be `Bearer <token>`"));
        }
        return Ok(Some(token.trim().to_owned()));
    }
    for value in headers.get_all(header::SEC_WEBSOCKET_PROTOCOL) {
        let Ok(value) = value.to_str() else { continue };
        if let Some(token) = value.split(',').map(str::trim).find_map(|p| p.strip_prefix(BEARER_PROTOCOL_PREFIX)) {
            if token.is_empty() {
                return Err(AuthError::Malformed("empty bearer subprotocol"));
            }
            return Ok(Some(token.to_owned()));
        }
    }
    if allow_query {
        if let Some(q) = uri.query() {
            for pair in q.split('&') {
                if let Some(token) = pair.strip_prefix("access_token=") {
                    if token.is_empty() {
                        return Err(AuthError::Malformed("empty access_token"));
                    }
                    // JWTs are base64url and dots: nothing to percent-decode.
                    return Ok(Some(token.to_owned()));
                }
            }
        }
    }
    Ok(None)
}

/// The request URI with any `access_token` value replaced, for logging.
pub fn redact_uri(uri: &Uri) -> String {
    match uri.query() {
        None => uri.path().to_owned(),
        Some(q) => {
            let redacted: Vec<String> = q
                .split('&')
                .map(|p| if p.starts_with("access_token=") { "access_token=REDACTED".to_owned() } else { p.to_owned() })
                .collect();
            format!("{}?{}", uri.path(), redacted.join("&"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn h(pairs: &[(header::HeaderName, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(k.clone(), HeaderValue::from_str(v).expect("ascii"));
        }
        m
    }

    fn uri(s: &str) -> Uri {
        s.parse().expect("uri")
    }

    #[test]
    fn sources_in_order() {
        let u = uri("/ws?access_token=q");
        let both =
            h(&[(header::AUTHORIZATION, "Bearer a"), (header::SEC_WEBSOCKET_PROTOCOL, "incident-stream.v1, bearer.b")]);
        assert_eq!(extract(&both, &u, true).expect("ok").as_deref(), Some("a"));
        let proto = h(&[(header::SEC_WEBSOCKET_PROTOCOL, "incident-stream.v1, bearer.b")]);
        assert_eq!(extract(&proto, &u, true).expect("ok").as_deref(), Some("b"));
        assert_eq!(extract(&HeaderMap::new(), &u, true).expect("ok").as_deref(), Some("q"));
        assert_eq!(extract(&HeaderMap::new(), &u, false).expect("ok"), None);
        assert_eq!(extract(&HeaderMap::new(), &uri("/ws"), true).expect("ok"), None);
    }

    #[test]
    fn malformed_authorization_is_refused() {
        for v in ["Basic abc", "Bearer", "Bearer  ", "token"] {
            assert!(
                matches!(extract(&h(&[(header::AUTHORIZATION, v)]), &uri("/ws"), false), Err(AuthError::Malformed(_))),
                "{v}"
            );
        }
    }

    #[test]
    fn query_tokens_are_redacted() {
        assert_eq!(redact_uri(&uri("/ws?a=1&access_token=secret&b=2")), "/ws?a=1&access_token=REDACTED&b=2");
        assert_eq!(redact_uri(&uri("/ws")), "/ws");
    }
}
