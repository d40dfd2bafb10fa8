//! regionguard decides, in the request path, whether an account may use a product from where it is.
//!
//! The major components are:
//! - [`region`]: ISO 3166 country and subdivision codes, parsed once at the edges.
//! - [`classify`]: the pure core, `classify(&Facts, &Policy) -> Decision`; no IO, no clock.
//! - [`policy`]: the policy file's model, validation and compiled lookup tables.
//! - [`geo`]: MaxMind-format database readers, the prefix cache and hot reload.
//! - [`engine`]: joins geo lookups, the current policy and the clock into decisions.
//! - [`grpc`]: tonic services; translates proto <-> domain and maps errors to `Status`.
//! - [`server`]: the listener, health, reflection and graceful shutdown; [`connections`] bounds
//!   the connections it takes.
//! - [`config`]: the one typed configuration, from file, environment and flags.

pub mod app;
pub mod audit;
pub mod auth;
pub mod classify;
pub mod config;
pub mod connections;
pub mod console;
pub mod engine;
pub mod gateway;
pub mod geo;
pub mod grpc;
pub mod metrics;
pub mod overrides;
pub mod policy;
pub mod region;
pub mod reload;
pub mod replay;
pub mod server;
mod sharded;
pub mod store;
mod ttl_cache;
pub mod usage;

/// Lower-case hex of `bytes` (digests in tokens, hashes and ids), without the formatter.
pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut text = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        text.push(char::from(DIGITS[usize::from(b >> 4)]));
        text.push(char::from(DIGITS[usize::from(b & 15)]));
    }
    text
}

/// At most the first 64 bytes of caller input (on a character boundary), for error messages:
/// enough to recognise the value, never a whole hostile payload echoed back. Every message that
/// quotes a caller's value quotes this; `grpc::ApiError` bounds the whole message besides.
pub fn excerpt(text: &str) -> &str {
    let mut end = text.len().min(64);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_excerpt_is_at_most_64_bytes_on_a_character_boundary() {
        assert_eq!(super::excerpt("UA-43"), "UA-43");
        assert_eq!(super::excerpt(&"a".repeat(200_000)).len(), 64);
        let wide = "é".repeat(40); // 2 bytes each: 64 is a boundary
        assert_eq!(super::excerpt(&wide).len(), 64);
        let odd = format!("a{wide}"); // 65th byte is inside a character
        assert_eq!(super::excerpt(&odd).len(), 63);
    }

    #[test]
    fn hex_is_lower_case_two_digits_a_byte() {
        assert_eq!(super::hex(&[0x00, 0x0f, 0xa5, 0xff]), "000fa5ff");
        assert_eq!(super::hex(&[]), "");
    }
}
