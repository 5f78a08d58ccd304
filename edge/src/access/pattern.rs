//! `public_paths` patterns: their grammar, parsing (at config load) and
//! matching against a request's path.
//!
//! A pattern starts with `/` and is one of:
//!
//! - an exact path: `/manifest.json` matches that path only;
//! - a prefix: a path ending in one `*`, which stands for anything,
//!   slashes included. `/static/*` matches `/static/` and everything below
//!   it; `/app*` matches `/app`, `/apple` and `/app/x`.
//!
//! Patterns are matched against the canonical path
//! ([`super::path`]: escapes of unreserved characters decoded, dot segments
//! resolved), so a pattern is written the way that form reads. Refused, with the reason: `*` anywhere
//! but at the end (or `**`), `?`, `#`, `%`, `\`, whitespace, control
//! characters, empty segments (`//`), dot segments (`/./`, `/../`, a
//! trailing `/.` or `/..`), and `/*` alone (write `auth = "none"` to make
//! a whole route public).

use std::fmt;

/// The grammar in one sentence, appended to every parse error.
pub const GRAMMAR: &str = "a public path is an exact path (\"/manifest.json\") or a prefix \
     ending in one '*' (\"/static/*\"), matched against the canonical request path";

/// One parsed `public_paths` entry.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicPath {
    text: String,
    kind: Kind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Exact,
    /// Matches paths starting with the text minus its trailing `*`.
    Prefix,
}

impl PublicPath {
    pub fn parse(s: &str) -> Result<Self, String> {
        Self::check(s).map_err(|why| format!("{s:?}: {why}; {GRAMMAR}"))
    }

    fn check(s: &str) -> Result<Self, &'static str> {
        let Some(rest) = s.strip_prefix('/') else {
            return Err("must start with '/'");
        };
        let (body, kind) = match s.strip_suffix('*') {
            Some(prefix) => (prefix, Kind::Prefix),
            None => (s, Kind::Exact),
        };
        if body.contains('*') {
            return Err(if s.contains("**") {
                "'**' is not supported: one trailing '*' already matches every level below"
            } else {
                "'*' may only be the last character"
            });
        }
        if let Some(why) = s.chars().find_map(|c| match c {
            '?' => Some("'?' is not supported (the query is never part of the path)"),
            '#' => Some("'#' is not supported (a fragment is never sent)"),
            '%' => Some("'%' escapes are not supported in a public path; cover such names with a prefix ending in '*'"),
            '\\' => Some("'\\' is not a path separator"),
            c if c.is_whitespace() => Some("whitespace is not allowed"),
            c if c.is_control() => Some("control characters are not allowed"),
            // What is left of a canonical path: unreserved characters,
            // sub-delims, ':' and '@' (RFC 3986 pchar), and '/'.
            c if !(c.is_ascii_alphanumeric() || "-._~!$&'()*+,;=:@/".contains(c)) => {
                Some("a canonical path never has this character unescaped")
            }
            _ => None,
        }) {
            return Err(why);
        }
        if kind == Kind::Prefix && s == "/*" {
            return Err("\"/*\" would make the whole route public; write auth = \"none\" instead");
        }
        // Whole segments: for a prefix, the last one is unfinished ("/a/.*"
        // may match "/a/.well-known") and is not checked.
        let rest = &rest[..rest.len() - (s.len() - body.len())];
        let mut segments: Vec<&str> = rest.split('/').collect();
        if kind == Kind::Prefix {
            segments.pop();
        }
        let last = segments.len().saturating_sub(1);
        for (i, seg) in segments.iter().enumerate() {
            match *seg {
                // A trailing slash leaves one empty last segment: "/static/".
                "" if i < last || kind == Kind::Prefix => {
                    return Err("empty segments ('//') never match a canonical path");
                }
                "." | ".." => {
                    return Err("dot segments ('.' and '..') never match a canonical path");
                }
                _ => {}
            }
        }
        Ok(Self {
            text: s.to_owned(),
            kind,
        })
    }

    /// Whether `canonical_path` ([`super::path::canonical`], without dot
    /// segments, without query) is public under this pattern.
    pub fn matches(&self, canonical_path: &str) -> bool {
        match self.kind {
            Kind::Exact => canonical_path == self.text,
            Kind::Prefix => canonical_path.starts_with(&self.text[..self.text.len() - 1]),
        }
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl fmt::Display for PublicPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for PublicPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicPath({:?})", self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> PublicPath {
        PublicPath::parse(s).unwrap()
    }

    #[test]
    fn exact_paths_match_only_themselves() {
        let m = p("/manifest.json");
        assert!(m.matches("/manifest.json"));
        assert!(!m.matches("/manifest.json.bak"));
        assert!(!m.matches("/manifest"));
        assert!(!m.matches("/"));
        let dir = p("/static/");
        assert!(dir.matches("/static/"));
        assert!(!dir.matches("/static/a"));
        assert!(p("/").matches("/"));
        assert!(!p("/").matches("/a"));
    }

    #[test]
    fn a_trailing_star_matches_everything_below() {
        let s = p("/static/*");
        assert!(s.matches("/static/"));
        assert!(s.matches("/static/app.js"));
        assert!(s.matches("/static/js/deep/app.js"));
        assert!(!s.matches("/static"));
        assert!(!s.matches("/staticx"));
        let app = p("/app*");
        for yes in ["/app", "/apple", "/app/x"] {
            assert!(app.matches(yes), "{yes}");
        }
        assert!(!app.matches("/ap"));
        assert!(p("/.well-known/*").matches("/.well-known/assetlinks.json"));
        assert!(p("/a/.*").matches("/a/.hidden"));
        assert_eq!(p("/static/*").to_string(), "/static/*");
        assert_eq!(format!("{:?}", p("/x")), "PublicPath(\"/x\")");
    }

    #[test]
    fn unsupported_patterns_say_why_and_give_the_grammar() {
        let cases = [
            ("", "must start with '/'"),
            ("static/*", "must start with '/'"),
            ("*.js", "must start with '/'"),
            ("/static/**", "'**' is not supported"),
            ("/**", "'**' is not supported"),
            ("/*.js", "'*' may only be the last"),
            ("/a/*/b", "'*' may only be the last"),
            ("/a?b", "'?'"),
            ("/a#b", "'#'"),
            ("/caf%C3%A9", "escapes are not supported"),
            ("/a\\b", "'\\'"),
            ("/a b", "whitespace"),
            ("/a\tb", "whitespace"),
            ("/a\u{1}", "control"),
            ("/caf\u{e9}", "never has this character"),
            ("/a<b>", "never has this character"),
            ("//a", "empty segments"),
            ("/a//b", "empty segments"),
            ("/a//*", "empty segments"),
            ("//", "empty segments"),
            ("/./a", "dot segments"),
            ("/a/../b", "dot segments"),
            ("/a/.", "dot segments"),
            ("/a/..", "dot segments"),
            ("/../*", "dot segments"),
            ("/*", "auth = \"none\""),
        ];
        for (s, why) in cases {
            let err = PublicPath::parse(s).unwrap_err();
            assert!(err.contains(why), "{s:?}: {err}");
            assert!(err.ends_with(GRAMMAR), "{s:?}: {err}");
        }
    }
}
