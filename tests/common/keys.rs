//! Asymmetric test keys of every algorithm the service accepts, their PEM public keys and JWKs.

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

pub struct TestKey {
    pub kid: String,
    pub alg: Algorithm,
    pub encoding: EncodingKey,
    pub public_pem: String,
    pub jwk: Value,
}

fn b64url(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

/// Generates a fresh key for `alg` (RSA 2048 for RS*/PS*, P-256, P-384, Ed25519).
pub fn generate(alg: Algorithm, kid: &str) -> TestKey {
    use Algorithm::*;
    let rc_alg = match alg {
        RS256 | RS384 | RS512 | PS256 | PS384 | PS512 => &rcgen::PKCS_RSA_SHA256,
        ES256 => &rcgen::PKCS_ECDSA_P256_SHA256,
        ES384 => &rcgen::PKCS_ECDSA_P384_SHA384,
        EdDSA => &rcgen::PKCS_ED25519,
        other => panic!("no asymmetric test key for {other:?}"),
    };
    let pair = rcgen::KeyPair::generate_for(rc_alg).expect("keygen");
    let private_pem = pair.serialize_pem();
    let encoding = match alg {
        ES256 | ES384 => EncodingKey::from_ec_pem(private_pem.as_bytes()),
        EdDSA => EncodingKey::from_ed_pem(private_pem.as_bytes()),
        _ => EncodingKey::from_rsa_pem(private_pem.as_bytes()),
    }
    .expect("encoding key");
    let raw = pair.public_key_raw();
    let mut jwk = match alg {
        ES256 | ES384 => {
            let n = (raw.len() - 1) / 2;
            let crv = if alg == ES256 { "P-256" } else { "P-384" };
            json!({"kty": "EC", "crv": crv, "x": b64url(&raw[1..1 + n]), "y": b64url(&raw[1 + n..])})
        }
        EdDSA => json!({"kty": "OKP", "crv": "Ed25519", "x": b64url(raw)}),
        _ => serde_json::to_value(jsonwebtoken::jwk::Jwk::from_encoding_key(&encoding, alg).expect("rsa jwk"))
            .expect("json"),
    };
    jwk["kid"] = json!(kid);
    jwk["alg"] = json!(format!("{alg:?}"));
    jwk["use"] = json!("sig");
    TestKey { kid: kid.to_owned(), alg, encoding, public_pem: pair.public_key_pem(), jwk }
}

impl TestKey {
    pub fn sign(&self, claims: &Value) -> String {
        self.sign_as(self.alg, claims)
    }

    /// Signs with another algorithm of the same key family (to test allowlists).
    pub fn sign_as(&self, alg: Algorithm, claims: &Value) -> String {
        let mut h = Header::new(alg);
        h.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&h, claims, &self.encoding).expect("sign")
    }
}

/// The audience test configurations with key sets require.
pub const AUDIENCE: &str = "incident-stream";

pub fn claims(tenant: &str, sub: &str, iss: Option<&str>) -> Value {
    let now = jsonwebtoken::get_current_timestamp();
    let mut c = json!({"sub": sub, "tenant": tenant, "aud": AUDIENCE, "exp": now + 300, "iat": now});
    if let Some(i) = iss {
        c["iss"] = json!(i);
    }
    c
}
