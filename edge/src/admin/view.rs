//! The admin status as a person reads it: `/status`'s JSON parsed into
//! [`Status`], rendered as the HTML page at `/` and as the text that
//! `burrow status` prints. Pure: the caller passes `now`.

use std::fmt::Write;
use std::time::{Duration, UNIX_EPOCH};

use serde::Deserialize;

use crate::access::login::escape;

/// How often the HTML page reloads itself, in seconds.
pub const PAGE_REFRESH_SECS: u32 = 5;

/// What `/status` reports (the fields a person reads; others are ignored).
#[derive(Debug, Clone, Deserialize)]
pub struct Status {
    pub version: String,
    /// Unix time this edge process started.
    pub started: u64,
    pub agents: Vec<Agent>,
    pub services: Vec<Service>,
    pub certificates: Vec<Certificate>,
    #[serde(default)]
    pub routes: Vec<Route>,
    pub streams_open: i64,
    pub throttled_addresses: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Agent {
    pub name: String,
    pub session: u64,
    pub remote: String,
    /// `quic`, or `tcp` when the agent's network blocks UDP.
    #[serde(default)]
    pub transport: Option<String>,
    /// Unix time the session was welcomed.
    #[serde(default)]
    pub connected_since: Option<u64>,
    /// Why the agent is not on QUIC.
    #[serde(default)]
    pub fallback: Option<String>,
    #[serde(default)]
    pub last_probe: Option<String>,
}

impl Agent {
    fn transport(&self) -> String {
        let t = self.transport.clone().unwrap_or_else(dash);
        match &self.fallback {
            Some(why) => format!("{t} ({why})"),
            None => t,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct Route {
    pub host: String,
    pub requests: u64,
    pub bytes_sent: u64,
    pub ttfb_p50_ms: Option<u64>,
    pub ttfb_p90_ms: Option<u64>,
    pub ttfb_p99_ms: Option<u64>,
}

impl Route {
    fn cells(&self) -> [String; 6] {
        let ttfb = |v: Option<u64>| match v {
            Some(ms) => format!("≤ {ms} ms"),
            None if self.requests > 0 => "> 30 s".into(),
            None => dash(),
        };
        [
            self.host.clone(),
            self.requests.to_string(),
            bytes(self.bytes_sent),
            ttfb(self.ttfb_p50_ms),
            ttfb(self.ttfb_p90_ms),
            ttfb(self.ttfb_p99_ms),
        ]
    }
}

/// A byte count as people read it.
fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct Service {
    pub agent: String,
    pub service: String,
    pub state: String,
    pub waking_since: Option<u64>,
    pub last_wake: Option<LastWake>,
    pub wake_requests: u64,
    pub held: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct LastWake {
    /// Unix time the wake started.
    pub at: u64,
    pub took_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Certificate {
    pub name: String,
    /// Unix time it expires.
    pub not_after: u64,
    pub last_error: Option<String>,
}

impl Status {
    pub fn from_json(value: serde_json::Value) -> Result<Self, serde_json::Error> {
        serde_json::from_value(value)
    }

    /// The self-contained HTML page (inline CSS, no scripts, reloads itself).
    pub fn html(&self, now: u64) -> String {
        let mut o = String::new();
        let _ = write!(
            o,
            "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
             <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
             <meta http-equiv=\"refresh\" content=\"{PAGE_REFRESH_SECS}\">\
             <title>burrow status</title><style>{CSS}</style></head><body>\n\
             <h1>burrow status</h1>\n"
        );

        o.push_str("<section id=\"agents\"><h2>Agents</h2>\n");
        if self.agents.is_empty() {
            o.push_str("<p class=\"none\">No agent connected.</p>\n");
        } else {
            o.push_str(
                "<table><tr><th>Name</th><th>Session</th><th>Connected</th>\
                 <th>Transport</th><th>Address</th><th>Last QUIC probe</th></tr>\n",
            );
            for a in &self.agents {
                let _ = writeln!(
                    o,
                    "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                    escape(&a.name),
                    a.session,
                    escape(&a.connected_since.map_or_else(dash, |t| relative(t, now))),
                    escape(&a.transport()),
                    escape(&a.remote),
                    escape(&a.last_probe.clone().unwrap_or_else(dash)),
                );
            }
            o.push_str("</table>\n");
        }
        o.push_str("</section>\n");

        o.push_str("<section id=\"services\"><h2>Services</h2>\n");
        if self.services.is_empty() {
            o.push_str("<p class=\"none\">No service reported yet.</p>\n");
        } else {
            o.push_str(
                "<table><tr><th>Service</th><th>State</th><th>Waking since</th>\
                 <th>Last wake</th><th>Wake requests</th><th>Held</th></tr>\n",
            );
            for s in &self.services {
                let _ = writeln!(
                    o,
                    "<tr><td>{}/{}</td><td><span class=\"state {}\">{}</span></td>\
                     <td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                    escape(&s.agent),
                    escape(&s.service),
                    state_class(&s.state),
                    escape(&s.state),
                    escape(&s.waking_since.map_or_else(dash, |t| relative(t, now))),
                    escape(&s.last_wake.as_ref().map_or_else(dash, |w| w.describe(now))),
                    s.wake_requests,
                    s.held
                );
            }
            o.push_str("</table>\n");
        }
        o.push_str("</section>\n");

        o.push_str("<section id=\"routes\"><h2>Routes</h2>\n");
        if self.routes.is_empty() {
            o.push_str("<p class=\"none\">No request yet.</p>\n");
        } else {
            o.push_str(
                "<table><tr><th>Host</th><th>Requests</th><th>Sent</th>\
                 <th>First byte p50</th><th>p90</th><th>p99</th></tr>\n",
            );
            for r in &self.routes {
                o.push_str("<tr>");
                for cell in r.cells() {
                    let _ = write!(o, "<td>{}</td>", escape(&cell));
                }
                o.push_str("</tr>\n");
            }
            o.push_str("</table>\n");
        }
        o.push_str("</section>\n");

        o.push_str("<section id=\"certificates\"><h2>Certificates</h2>\n");
        if self.certificates.is_empty() {
            o.push_str("<p class=\"none\">No certificate served yet.</p>\n");
        } else {
            o.push_str("<table><tr><th>Name</th><th>Expires</th><th>Last error</th></tr>\n");
            for c in &self.certificates {
                let _ = writeln!(
                    o,
                    "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
                    escape(&c.name),
                    escape(&relative(c.not_after, now)),
                    escape(c.last_error.as_deref().unwrap_or("-"))
                );
            }
            o.push_str("</table>\n");
        }
        o.push_str("</section>\n");

        let _ = write!(
            o,
            "<section id=\"counters\"><h2>Counters</h2>\n<table>\
             <tr><th>Streams open</th><td>{}</td></tr>\
             <tr><th>Throttled addresses</th><td>{}</td></tr>\
             <tr><th>Started</th><td>{} ({})</td></tr>\
             <tr><th>Version</th><td>{}</td></tr>\
             </table>\n<p class=\"none\">Counters start again when the edge restarts. \
             Also as <a href=\"/status\">JSON</a> and <a href=\"/metrics\">Prometheus text</a>.</p>\n\
             </section>\n</body></html>\n",
            self.streams_open,
            self.throttled_addresses,
            escape(&rfc3339(self.started)),
            escape(&relative(self.started, now)),
            escape(&self.version)
        );
        o
    }

    /// Aligned plain text, what `burrow status` prints.
    pub fn text(&self, now: u64) -> String {
        let mut o = String::new();
        o.push_str("AGENTS\n");
        if self.agents.is_empty() {
            o.push_str("  none connected\n");
        } else {
            let mut rows = vec![row([
                "NAME",
                "SESSION",
                "CONNECTED",
                "TRANSPORT",
                "ADDRESS",
            ])];
            for a in &self.agents {
                rows.push(vec![
                    a.name.clone(),
                    a.session.to_string(),
                    a.connected_since.map_or_else(dash, |t| relative(t, now)),
                    a.transport(),
                    a.remote.clone(),
                ]);
            }
            table(&mut o, &rows);
        }

        o.push_str("\nSERVICES\n");
        if self.services.is_empty() {
            o.push_str("  none reported\n");
        } else {
            let mut rows = vec![row([
                "SERVICE",
                "STATE",
                "WAKING SINCE",
                "LAST WAKE",
                "WAKE REQUESTS",
                "HELD",
            ])];
            for s in &self.services {
                rows.push(vec![
                    format!("{}/{}", s.agent, s.service),
                    s.state.clone(),
                    s.waking_since.map_or_else(dash, |t| relative(t, now)),
                    s.last_wake.as_ref().map_or_else(dash, |w| w.describe(now)),
                    s.wake_requests.to_string(),
                    s.held.to_string(),
                ]);
            }
            table(&mut o, &rows);
        }

        o.push_str("\nROUTES\n");
        if self.routes.is_empty() {
            o.push_str("  no request yet\n");
        } else {
            let mut rows = vec![row(["HOST", "REQUESTS", "SENT", "TTFB P50", "P90", "P99"])];
            for r in &self.routes {
                rows.push(r.cells().to_vec());
            }
            table(&mut o, &rows);
        }

        o.push_str("\nCERTIFICATES\n");
        if self.certificates.is_empty() {
            o.push_str("  none served\n");
        } else {
            let mut rows = vec![row(["NAME", "EXPIRES", "LAST ERROR"])];
            for c in &self.certificates {
                rows.push(vec![
                    c.name.clone(),
                    relative(c.not_after, now),
                    c.last_error.clone().unwrap_or_else(dash),
                ]);
            }
            table(&mut o, &rows);
        }

        o.push_str("\nCOUNTERS\n");
        let rows = vec![
            vec!["streams open".into(), self.streams_open.to_string()],
            vec![
                "throttled addresses".into(),
                self.throttled_addresses.to_string(),
            ],
            vec![
                "started".into(),
                format!(
                    "{} ({})",
                    rfc3339(self.started),
                    relative(self.started, now)
                ),
            ],
            vec!["version".into(), self.version.clone()],
        ];
        table(&mut o, &rows);
        o
    }
}

impl LastWake {
    /// "took 4.2 s, 3 min ago".
    fn describe(&self, now: u64) -> String {
        format!(
            "took {:.1} s, {}",
            Duration::from_millis(self.took_ms).as_secs_f64(),
            relative(self.at, now)
        )
    }
}

const CSS: &str = "body{font-family:system-ui,sans-serif;margin:1rem;color:#222;background:#fafafa}\
h1{font-size:1.3rem}h2{font-size:1.1rem;margin-top:1.5rem}\
table{border-collapse:collapse;width:100%;max-width:60rem;display:block;overflow-x:auto}\
th,td{text-align:left;padding:.3rem .6rem;border-bottom:1px solid #ddd;white-space:nowrap}\
.none{color:#666}.state{padding:.1rem .5rem;border-radius:.6rem;color:#fff;background:#777}\
.up{background:#2a7d2e}.down{background:#b3261e}.waking{background:#b26a00}";

/// The CSS class for a state (a fixed set, so no escaping is needed).
fn state_class(state: &str) -> &'static str {
    match state {
        "up" => "up",
        "down" => "down",
        "waking" => "waking",
        _ => "unknown",
    }
}

fn dash() -> String {
    "-".into()
}

fn row<const N: usize>(cells: [&str; N]) -> Vec<String> {
    cells.iter().map(|c| (*c).to_owned()).collect()
}

/// Writes rows with each column padded to its widest cell, two spaces apart
/// and indented by two.
/// Control characters are dropped so a peer-supplied name cannot drive
/// the terminal.
fn table(out: &mut String, rows: &[Vec<String>]) {
    let clean = |s: &str| s.chars().filter(|c| !c.is_control()).collect::<String>();
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| r.iter().map(|c| clean(c)).collect())
        .collect();
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|i| {
            rows.iter()
                .filter_map(|r| r.get(i))
                .map(|c| c.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for r in &rows {
        let mut line = String::new();
        for (cell, width) in r.iter().zip(&widths) {
            let _ = write!(line, "  {cell:<width$}");
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
}

/// `t` (Unix seconds) relative to `now`: "just now", "3 min ago", "in 42 days".
pub fn relative(t: u64, now: u64) -> String {
    let (span, future) = if t > now {
        (t - now, true)
    } else {
        (now - t, false)
    };
    let amount = match span {
        0..5 => return "just now".into(),
        5..60 => format!("{span} s"),
        60..3_600 => format!("{} min", span / 60),
        3_600..172_800 => format!("{} h", span / 3_600),
        _ => format!("{} days", span / 86_400),
    };
    if future {
        format!("in {amount}")
    } else {
        format!("{amount} ago")
    }
}

/// Unix seconds as an RFC 3339 UTC time.
fn rfc3339(t: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(t)).to_string()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const NOW: u64 = 1_800_000_000;

    fn status() -> Status {
        Status::from_json(serde_json::json!({
            "version": "0.1.0",
            "started": NOW - 180,
            "counters_since": "start",
            "agents": [{"name": "h<o>me", "session": 7, "remote": "192.0.2.1:4433", "services": [],
                        "transport": "tcp", "connected_since": NOW - 90,
                        "fallback": "no QUIC handshake within 2s", "last_probe": null}],
            "services": [
                {"agent": "h<o>me", "service": "ll&ama", "state": "up", "waking_since": null,
                 "last_wake": {"at": NOW - 7_200, "took_ms": 4_200}, "wake_requests": 2, "held": 0},
                {"agent": "h<o>me", "service": "nas", "state": "waking", "waking_since": NOW - 20,
                 "last_wake": null, "wake_requests": 1, "held": 3},
            ],
            "certificates": [{"name": "chat.example.com", "not_after": NOW + 42 * 86_400 + 5,
                              "renew_at": null, "last_error": "rate <limited>", "next_attempt": null}],
            "routes": [{"host": "chat.example.com", "requests": 1234, "bytes_sent": 5_347_738,
                        "ttfb_p50_ms": 25, "ttfb_p90_ms": 100, "ttfb_p99_ms": null}],
            "streams_open": 4,
            "throttled_addresses": 1,
        }))
        .unwrap()
    }

    #[test]
    fn html_escapes_names_and_has_every_section() {
        let page = status().html(NOW);
        assert!(page.contains("h&lt;o&gt;me"), "{page}");
        assert!(page.contains("ll&amp;ama"), "{page}");
        assert!(page.contains("rate &lt;limited&gt;"), "{page}");
        assert!(!page.contains("h<o>me") && !page.contains("<limited>"));
        for id in ["agents", "services", "certificates", "counters"] {
            assert!(page.contains(&format!("<section id=\"{id}\">")), "{id}");
        }
        assert!(page.contains("name=\"viewport\""));
        assert!(page.contains("http-equiv=\"refresh\""));
        assert!(page.contains("<span class=\"state waking\">waking</span>"));
        assert!(page.contains("in 42 days"));
        assert!(page.contains("took 4.2 s, 2 h ago"));
        assert!(page.contains("20 s ago"));
        assert!(page.contains("3 min ago"));
        assert!(
            page.contains("<td>tcp (no QUIC handshake within 2s)</td>"),
            "{page}"
        );
        assert!(page.contains("<td>1 min ago</td>"), "{page}");
        assert!(
            page.contains("<td>chat.example.com</td><td>1234</td><td>5.1 MiB</td><td>≤ 25 ms</td><td>≤ 100 ms</td><td>&gt; 30 s</td>"),
            "{page}"
        );
        // Self-contained: nothing fetched from elsewhere.
        assert!(!page.contains("src=") && !page.contains("<link"));
    }

    #[test]
    fn html_says_when_a_section_is_empty() {
        let mut s = status();
        s.agents.clear();
        s.services.clear();
        s.certificates.clear();
        let page = s.html(NOW);
        assert!(page.contains("No agent connected."));
        assert!(page.contains("No service reported yet."));
        assert!(page.contains("No certificate served yet."));
    }

    #[test]
    fn text_is_aligned() {
        let text = status().text(NOW);
        let lines: Vec<&str> = text.lines().collect();
        let head = lines
            .iter()
            .position(|l| l.contains("WAKING SINCE"))
            .unwrap();
        let col = lines[head].find("STATE").unwrap();
        assert_eq!(lines[head + 1].find("up"), Some(col), "{text}");
        assert_eq!(lines[head + 2].find("waking"), Some(col), "{text}");
        assert!(text.contains("h<o>me/ll&ama"));
        assert!(text.contains("in 42 days"));
        assert!(text.contains("streams open         4"), "{text}");
    }

    #[test]
    fn relative_times() {
        assert_eq!(relative(NOW, NOW), "just now");
        assert_eq!(relative(NOW - 30, NOW), "30 s ago");
        assert_eq!(relative(NOW - 180, NOW), "3 min ago");
        assert_eq!(relative(NOW + 3 * 3_600, NOW), "in 3 h");
        assert_eq!(relative(NOW + 42 * 86_400, NOW), "in 42 days");
    }

    #[test]
    fn text_drops_control_characters() {
        let mut s = status();
        s.certificates[0].last_error = Some("bad\x1b[2Jthing".into());
        assert!(s.text(NOW).contains("bad[2Jthing"));
    }
}
