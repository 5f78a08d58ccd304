//! The login page the edge serves to browsers (installed PWAs cannot answer
//! a basic-auth prompt), and the small form parsing it needs.

use std::fmt::Write;

/// Where the login form posts; reserved on every route with auth.
pub const LOGIN_PATH: &str = "/.burrow/login";
/// A POST from the site's own pages ends the session; a GET shows the
/// button that posts.
pub const LOGOUT_PATH: &str = "/.burrow/logout";
/// The most form bytes read from a login POST.
pub const MAX_FORM: usize = 8 * 1024;

/// Escapes text for HTML content and quoted attribute values.
pub(crate) fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Only local paths are followed after login (no open redirects).
pub fn safe_next(next: &str) -> &str {
    // Browsers drop tabs and newlines from URLs, so "/\t/evil.example"
    // would become "//evil.example": no control characters at all.
    if next.starts_with('/')
        && !next.starts_with("//")
        && !next.starts_with("/\\")
        && !next.chars().any(char::is_control)
    {
        next
    } else {
        "/"
    }
}

const HEAD: &str = "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>Sign in</title>\
<style>body{font:16px/1.5 system-ui,sans-serif;background:#101418;color:#e8ecef;display:grid;place-items:center;min-height:100vh;margin:0}\
form{background:#182028;padding:2rem;border-radius:.75rem;display:grid;gap:.75rem;min-width:16rem}\
input,button{font:inherit;font-size:16px;min-height:44px;box-sizing:border-box}\
input{padding:.6rem;border-radius:.4rem;border:1px solid #2a333b;background:#101418;color:inherit}\
button{padding:.6rem 1rem;border:0;border-radius:.4rem;background:#2f7de1;color:#fff}.err{color:#ff8a80}</style></head><body>";

/// The page behind [`LOGOUT_PATH`]: one button that posts to it, so no
/// other site can sign the user out with a link or an image.
pub fn logout_page(host: &str) -> String {
    let mut html = String::from(HEAD);
    let _ = write!(
        html,
        "<form method=\"post\" action=\"{LOGOUT_PATH}\"><h1 style=\"font-size:1.2rem;margin:0\">Sign out of {}?</h1>\
<button id=\"sign-out\">Sign out</button></form></body></html>",
        escape(host)
    );
    html
}

pub fn page(host: &str, next: &str, error: Option<&str>) -> String {
    let mut html = String::from(HEAD);
    let _ = write!(
        html,
        "<form method=\"post\" action=\"{LOGIN_PATH}\"><h1 style=\"font-size:1.2rem;margin:0\">Sign in to {}</h1>",
        escape(host)
    );
    if let Some(e) = error {
        let _ = write!(html, "<p class=\"err\" id=\"error\">{}</p>", escape(e));
    }
    let _ = write!(
        html,
        "<input name=\"user\" id=\"user\" placeholder=\"User\" autocomplete=\"username\" autocapitalize=\"none\" autocorrect=\"off\" spellcheck=\"false\" required autofocus>\
<input name=\"password\" id=\"password\" type=\"password\" placeholder=\"Password\" autocomplete=\"current-password\" required>\
<input type=\"hidden\" name=\"next\" value=\"{}\"><button id=\"sign-in\">Sign in</button></form></body></html>",
        escape(safe_next(next))
    );
    html
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = s.get(i + 1..i + 3)?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

/// The value of `name` in an `application/x-www-form-urlencoded` body.
pub fn form_value(body: &str, name: &str) -> Option<String> {
    body.split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| percent_decode(k).as_deref() == Some(name))
        .and_then(|(_, v)| percent_decode(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms_decode_and_next_stays_local() {
        let body = "user=al%C3%AFce&password=p%26ss+word&next=%2Fchat%3Fa%3D1";
        assert_eq!(form_value(body, "user").as_deref(), Some("alïce"));
        assert_eq!(form_value(body, "password").as_deref(), Some("p&ss word"));
        assert_eq!(form_value(body, "next").as_deref(), Some("/chat?a=1"));
        assert_eq!(form_value("a=%zz", "a"), None);
        assert_eq!(safe_next("//evil.example/"), "/");
        assert_eq!(safe_next("https://evil.example/"), "/");
        assert_eq!(safe_next("/ok"), "/ok");
        assert_eq!(safe_next("/\t/evil.example"), "/");
        assert_eq!(safe_next("/\r\n/x"), "/");
        assert!(!page("h", "\"><script>", Some("<b>")).contains("<script>"));
        // Phones: no zoom on focus (16 px), 44 px targets, no capitals or
        // corrections forced into the user name.
        let p = page("h", "/", None);
        for needle in [
            "font-size:16px",
            "min-height:44px",
            "autocapitalize=\"none\"",
            "autocorrect=\"off\"",
            "spellcheck=\"false\"",
        ] {
            assert!(p.contains(needle), "{needle}");
        }
    }
}
