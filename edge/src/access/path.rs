//! The one canonical form of a request path. The edge decides on it (public
//! paths, its own `/.burrow/` pages) and forwards it, so a service that
//! normalises paths (nginx, Caddy, Apache, Tomcat) cannot be led somewhere
//! the edge did not look: `/static/../api` and `/static/%2e%2e/api` are
//! both `/api` here, and that is what the service receives.
//!
//! The form (RFC 3986 6.2.2): percent-encoded unreserved characters are
//! decoded, other escapes keep their bytes with upper-case hex, and dot
//! segments are removed (RFC 3986 5.2.4; `..` above the root stays at the
//! root). On a route behind auth, an encoded slash or backslash, an encoded
//! NUL, a literal backslash, and a dot segment with path parameters
//! (`..;x`, which Tomcat treats as `..`) are refused: they are read as
//! separators by some services and not by others, so no one form is safe.

use std::fmt;

/// Why a path was refused (the client gets 400 with this text).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    /// Not an origin-form path, or a malformed `%` escape.
    Malformed,
    /// An encoded `/`, `\` or NUL, or a literal `\`, on a protected route.
    AmbiguousSeparator,
    /// `..;x` or `.;x`: a dot segment in Tomcat's eyes, not in ours.
    DotSegmentWithParameters,
}

impl PathError {
    /// What the client is told.
    pub fn message(self) -> &'static str {
        match self {
            Self::Malformed => "malformed request path",
            Self::AmbiguousSeparator => "encoded slash or backslash in the request path",
            Self::DotSegmentWithParameters => "dot segment with parameters in the request path",
        }
    }
}

impl fmt::Display for PathError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.message())
    }
}

/// How strict to be: routes behind auth refuse what a service might read
/// as a separator; open routes forward it (canonicalised) as it came.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strictness {
    Protected,
    Open,
}

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Decodes the escapes of unreserved characters and upper-cases the rest.
fn normalise_escapes(raw: &str, strict: Strictness) -> Result<String, PathError> {
    let bytes = raw.as_bytes();
    let mut out = String::with_capacity(raw.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b'%' => {
                let (Some(hi), Some(lo)) = (
                    bytes.get(i + 1).copied().and_then(hex_value),
                    bytes.get(i + 2).copied().and_then(hex_value),
                ) else {
                    return Err(PathError::Malformed);
                };
                let decoded = hi << 4 | lo;
                if unreserved(decoded) {
                    out.push(char::from(decoded));
                } else {
                    if strict == Strictness::Protected && matches!(decoded, b'/' | b'\\' | 0) {
                        return Err(PathError::AmbiguousSeparator);
                    }
                    out.push('%');
                    out.push(char::from(bytes[i + 1].to_ascii_uppercase()));
                    out.push(char::from(bytes[i + 2].to_ascii_uppercase()));
                }
                i += 3;
            }
            b'\\' if strict == Strictness::Protected => {
                return Err(PathError::AmbiguousSeparator);
            }
            // `http::Uri` admits only visible ASCII here; anything else is
            // not a path we produced a form for.
            0x21..=0x7e => {
                out.push(char::from(b));
                i += 1;
            }
            _ => return Err(PathError::Malformed),
        }
    }
    Ok(out)
}

/// Whether a normalised path holds `%25` followed by the escape of `/`,
/// `\\`, `.` or NUL: one decoding more (some services decode twice) and
/// it is a separator or a dot segment the edge never saw.
fn double_encoded_separator(escaped: &str) -> bool {
    escaped.match_indices("%25").any(|(i, _)| {
        let hex = escaped.get(i + 3..i + 5).unwrap_or("");
        matches!(u8::from_str_radix(hex, 16), Ok(b'/' | b'\\' | b'.' | 0))
    })
}

/// RFC 3986 5.2.4 on an absolute path whose escapes are normalised.
fn remove_dot_segments(path: &str, strict: Strictness) -> Result<String, PathError> {
    let mut kept: Vec<&str> = Vec::new();
    let mut segments = path[1..].split('/').peekable();
    // A path ending in a dot segment names a directory: keep the slash.
    let mut trailing_slash = false;
    while let Some(seg) = segments.next() {
        let last = segments.peek().is_none();
        if strict == Strictness::Protected {
            let bare = seg.split(';').next().unwrap_or(seg);
            if bare != seg && (bare == "." || bare == "..") {
                return Err(PathError::DotSegmentWithParameters);
            }
        }
        match seg {
            "." => trailing_slash = last,
            ".." => {
                kept.pop();
                trailing_slash = last;
            }
            s => {
                kept.push(s);
                trailing_slash = false;
            }
        }
    }
    let mut out = String::with_capacity(path.len());
    for seg in &kept {
        out.push('/');
        out.push_str(seg);
    }
    if trailing_slash || out.is_empty() {
        out.push('/');
    }
    Ok(out)
}

/// The canonical form of `raw`, an origin-form path without its query.
pub fn canonical(raw: &str, strict: Strictness) -> Result<String, PathError> {
    if !raw.starts_with('/') {
        return Err(PathError::Malformed);
    }
    // Most paths have no escape, backslash or dot segment: already canonical.
    if !raw.contains("/.")
        && !raw
            .bytes()
            .any(|b| matches!(b, b'%' | b'\\') || !(0x21..=0x7e).contains(&b))
    {
        return Ok(raw.to_owned());
    }
    let escaped = normalise_escapes(raw, strict)?;
    if strict == Strictness::Protected && double_encoded_separator(&escaped) {
        return Err(PathError::AmbiguousSeparator);
    }
    remove_dot_segments(&escaped, strict)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(raw: &str) -> Result<String, PathError> {
        canonical(raw, Strictness::Protected)
    }

    #[test]
    fn dot_segments_and_their_encodings_resolve() {
        for raw in [
            "/static/../api/chats",
            "/static/%2e%2e/api/chats",
            "/static/%2E%2E/api/chats",
            "/static/.%2e/api/chats",
            "/static/./../api/./chats",
            "/../../api/chats",
            "/%2e%2e/api/chats",
            "/static/x/../../api/chats",
        ] {
            assert_eq!(p(raw).as_deref(), Ok("/api/chats"), "{raw}");
        }
        assert_eq!(p("/static/.").as_deref(), Ok("/static/"));
        assert_eq!(p("/static/..").as_deref(), Ok("/"));
        assert_eq!(p("/").as_deref(), Ok("/"));
        assert_eq!(p("/..").as_deref(), Ok("/"));
        assert_eq!(p("/a/").as_deref(), Ok("/a/"));
        assert_eq!(p("/a//b").as_deref(), Ok("/a//b"), "empty segments stay");
        assert_eq!(p("/a/...").as_deref(), Ok("/a/..."), "not a dot segment");
    }

    #[test]
    fn unreserved_escapes_decode_and_others_are_upper_cased() {
        assert_eq!(p("/%61pi/%7euser").as_deref(), Ok("/api/~user"));
        assert_eq!(p("/a%20b%3f").as_deref(), Ok("/a%20b%3F"));
        assert_eq!(p("/caf%c3%a9").as_deref(), Ok("/caf%C3%A9"));
        // The form is a fixed point.
        for raw in ["/a%20b%3f/../c", "/x/%2e/y"] {
            let once = p(raw).unwrap();
            assert_eq!(p(&once).unwrap(), once);
        }
    }

    #[test]
    fn separators_in_disguise_are_refused_on_protected_routes_only() {
        for raw in [
            "/static%2f..%2fapi",
            "/static/..%2Fapi",
            "/static/..%5capi",
            "/static\\..\\api",
            "/a%00b",
            "/static/..%252F..%252Fapi",
            "/static/%252e%252e/api",
            "/static/%25%32%66api",
        ] {
            assert_eq!(p(raw), Err(PathError::AmbiguousSeparator), "{raw}");
            assert!(canonical(raw, Strictness::Open).is_ok(), "{raw}");
        }
        assert_eq!(
            canonical("/a%2fb/../c", Strictness::Open).as_deref(),
            Ok("/c")
        );
        for raw in [
            "/static/..;/api",
            "/static/.;x/api",
            "/static/%2e%2e;a=b/api",
        ] {
            assert_eq!(p(raw), Err(PathError::DotSegmentWithParameters), "{raw}");
        }
        assert_eq!(p("/a;b/c").as_deref(), Ok("/a;b/c"));
    }

    #[test]
    fn malformed_paths_are_refused() {
        for raw in ["", "api", "*", "/a%", "/a%2", "/a%zz", "/a b", "/a\u{e9}"] {
            assert_eq!(p(raw), Err(PathError::Malformed), "{raw:?}");
        }
    }
}
