//! The request path as an upstream server will resolve it, for matching `bypass_paths`.
//!
//! A bypass must never let a request reach a classified route: `/public/../signup` is
//! `/signup` to any server behind Envoy, so it is matched as `/signup`. Percent-encoded
//! unreserved characters are decoded (`%2e` is `.`, `%68` is `h`, RFC 3986 §6.2.2.2), dot
//! segments are resolved (§5.2.4) and empty segments (`//`) dropped. A path whose meaning
//! depends on the server (an encoded `/` or `\`, a backslash, `..;`, a control character, a
//! broken `%` escape) cannot be normalised, and is then never bypassed.

/// `raw` (query and fragment ignored) normalised, or `None` if it cannot be.
pub fn normalize(raw: &str) -> Option<String> {
    let path = raw.split(['?', '#']).next().unwrap_or("");
    if !path.starts_with('/') {
        return None;
    }
    let decoded = decode_unreserved(path)?;
    let mut segments: Vec<&str> = Vec::new();
    for segment in decoded.split('/') {
        // `..;x` and `.;x` are dot segments to servers that strip path parameters.
        let bare = segment.split(';').next().unwrap_or("");
        match bare {
            "" | "." if segment == bare => {}
            ".." if segment == bare => {
                segments.pop();
            }
            "." | ".." => return None,
            _ => segments.push(segment),
        }
    }
    let mut normalized = String::with_capacity(decoded.len());
    for segment in &segments {
        normalized.push('/');
        normalized.push_str(segment);
    }
    // A trailing slash (or a last `.`/`..` segment, which means a directory) stays.
    let last = decoded.rsplit('/').next().unwrap_or("");
    if segments.is_empty() || matches!(last, "" | "." | "..") {
        normalized.push('/');
    }
    Some(normalized)
}

/// Whether `path` matches `pattern`: exactly, or as a prefix when the pattern ends in `*`.
pub fn matches(pattern: &str, path: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => path.starts_with(prefix),
        None => path == pattern,
    }
}

/// Every path a server could read `raw` as, folded into one: all escapes decoded (broken ones
/// kept as they are), `\` read as `/`, path parameters dropped, dot segments resolved, empty
/// segments dropped, ASCII lower-cased. For choosing the stricter treatment (a flow) where
/// [`normalize`] refuses: `/x/..%2fSIGNUP` is `/signup` to some server, so it is a signup.
pub fn lenient(raw: &str) -> String {
    let path = raw.split(['?', '#']).next().unwrap_or("");
    let bytes = path.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escape = (bytes[i] == b'%')
            .then(|| bytes.get(i + 1..i + 3))
            .flatten()
            .and_then(|hex| u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok());
        match escape {
            Some(value) => {
                decoded.push(value);
                i += 3;
            }
            None => {
                decoded.push(bytes[i]);
                i += 1;
            }
        }
    }
    let text = String::from_utf8_lossy(&decoded).replace('\\', "/");
    let mut segments: Vec<&str> = Vec::new();
    for segment in text.split('/') {
        match segment.split(';').next().unwrap_or("") {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            bare => segments.push(bare),
        }
    }
    let mut folded = String::with_capacity(text.len() + 1);
    for segment in &segments {
        folded.push('/');
        folded.push_str(segment);
    }
    if folded.is_empty() || text.ends_with('/') {
        folded.push('/');
    }
    folded.to_ascii_lowercase()
}

/// Decodes `%XX` escapes of unreserved characters; keeps others (upper-cased hex), refuses
/// escapes of `/` and `\`, broken escapes, backslashes and control characters.
fn decode_unreserved(path: &str) -> Option<String> {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let value = u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?;
            if value.is_ascii_alphanumeric() || b"-._~".contains(&value) {
                out.push(char::from(value));
            } else if value == b'/' || value == b'\\' || value.is_ascii_control() {
                return None;
            } else {
                out.push('%');
                out.push_str(&format!("{value:02X}"));
            }
            i += 3;
            continue;
        }
        // `i` is on a character boundary: escapes are ASCII, and whole characters are taken.
        let c = path[i..].chars().next()?;
        if c == '\\' || c.is_control() {
            return None;
        }
        out.push(c);
        i += c.len_utf8();
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::{lenient, normalize};

    #[test]
    fn lenient_folds_every_reading_a_server_could_make() {
        for (raw, folded) in [
            ("/signup", "/signup"),
            ("/SIGNUP", "/signup"),
            ("/x/..%2fsignup", "/signup"),
            ("/signup/%2f", "/signup/"),
            ("/signup\\", "/signup/"),
            ("/a\\..\\signup?x", "/signup"),
            ("/..;/signup", "/signup"),
            ("//signup//x", "/signup/x"),
            ("/%zz", "/%zz"),
            ("", "/"),
        ] {
            assert_eq!(lenient(raw), folded, "{raw:?}");
        }
    }

    #[test]
    fn resolves_dots_decodes_unreserved_and_collapses_slashes() {
        for (raw, normalized) in [
            ("/", "/"),
            ("/healthz", "/healthz"),
            ("/healthz?probe=1#x", "/healthz"),
            ("/public/../signup", "/signup"),
            ("/public/%2e%2e/signup", "/signup"),
            ("/public/%2E%2e/signup", "/signup"),
            ("/public/.%2e/signup", "/signup"),
            ("/public//..//signup", "/signup"),
            ("/a/./b/../c", "/a/c"),
            ("/../../etc", "/etc"),
            ("/public/", "/public/"),
            ("/public/..", "/"),
            ("/public/x/.", "/public/x/"),
            ("/%68ealthz", "/healthz"),
            ("/my%20file", "/my%20file"),
            ("/my%2a", "/my%2A"),
            ("/caf\u{e9}/menu", "/caf\u{e9}/menu"),
            ("/a;v=1/b", "/a;v=1/b"),
        ] {
            assert_eq!(normalize(raw).as_deref(), Some(normalized), "{raw}");
        }
    }

    #[test]
    fn a_path_a_server_could_read_otherwise_is_not_normalised() {
        for raw in [
            "",
            "public/x",
            "/public%2f..%2fsignup",
            "/public/..%2Fsignup",
            "/public/%5c../signup",
            "/public\\..\\signup",
            "/public/..;/signup",
            "/public/.;x/signup",
            "/public/%zz",
            "/public/%2",
            "/public/%00",
            "/public/\u{7}",
        ] {
            assert_eq!(normalize(raw), None, "{raw:?}");
        }
    }
}
