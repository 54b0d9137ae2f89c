//! Signed requests (API keys in `signed` mode): the canonical string and its HMAC.
//!
//! `sign_str` = lowercase hex HMAC-SHA256(secret, timestamp + "\n" + METHOD + "\n" +
//! path-with-query + "\n" + body). The coordinator verifies, the agent signs; both use this.

use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// The header carrying the key's token (seed 000).
pub const TOKEN_HEADER: &str = "token";
/// The header carrying the request time, milliseconds since the Unix epoch (seed 000).
pub const TIMESTAMP_HEADER: &str = "timestamp";
/// The header carrying the signature (seed 000).
pub const SIGN_HEADER: &str = "sign_str";

/// The bytes a signature covers.
pub fn canonical(timestamp: &str, method: &str, path_and_query: &str, body: &[u8]) -> Vec<u8> {
    let mut out =
        Vec::with_capacity(timestamp.len() + method.len() + path_and_query.len() + body.len() + 3);
    out.extend_from_slice(timestamp.as_bytes());
    out.push(b'\n');
    out.extend_from_slice(method.to_ascii_uppercase().as_bytes());
    out.push(b'\n');
    out.extend_from_slice(path_and_query.as_bytes());
    out.push(b'\n');
    out.extend_from_slice(body);
    out
}

fn mac(
    secret: &str,
    timestamp: &str,
    method: &str,
    path_and_query: &str,
    body: &[u8],
) -> HmacSha256 {
    // HMAC takes a key of any length; `new_from_slice` cannot fail for HMAC.
    let mut mac = match HmacSha256::new_from_slice(secret.as_bytes()) {
        Ok(mac) => mac,
        Err(_) => unreachable!("HMAC accepts keys of any length"),
    };
    mac.update(&canonical(timestamp, method, path_and_query, body));
    mac
}

/// The `sign_str` for a request: lowercase hex HMAC-SHA256 of [`canonical`].
pub fn sign(
    secret: &str,
    timestamp: &str,
    method: &str,
    path_and_query: &str,
    body: &[u8],
) -> String {
    hex::encode(
        mac(secret, timestamp, method, path_and_query, body)
            .finalize()
            .into_bytes(),
    )
}

/// Whether `sign_str` is the signature of this request, compared in constant time.
pub fn verify(
    secret: &str,
    timestamp: &str,
    method: &str,
    path_and_query: &str,
    body: &[u8],
    sign_str: &str,
) -> bool {
    let Ok(given) = hex::decode(sign_str.trim()) else {
        return false;
    };
    mac(secret, timestamp, method, path_and_query, body)
        .verify_slice(&given)
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readme_example() {
        // The worked example in README.md's Security section.
        let sig = sign(
            "s3cr3t",
            "1747379023000",
            "POST",
            "/api/v1/tasks?x=1",
            br#"{"code":"print(1)"}"#,
        );
        assert_eq!(sig, README_SIG);
        assert!(verify(
            "s3cr3t",
            "1747379023000",
            "post",
            "/api/v1/tasks?x=1",
            br#"{"code":"print(1)"}"#,
            &sig
        ));
        assert!(!verify(
            "other",
            "1747379023000",
            "POST",
            "/api/v1/tasks?x=1",
            br#"{"code":"print(1)"}"#,
            &sig
        ));
        assert!(!verify(
            "s3cr3t",
            "1747379023000",
            "POST",
            "/api/v1/tasks?x=1",
            b"",
            "zz"
        ));
    }

    const README_SIG: &str = "221f72da4ab6339b08a003ede0ea48700c00a28bbc95ef20b4a2bda08d983ad2";
}
