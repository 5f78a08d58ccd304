//! Loading TOML configs so that every mistake is reported as
//! `file:line:col: reason`, and the value types both configs share.

use std::fmt;
use std::net::IpAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};

pub use toml::Spanned;

/// A config file that could not be used. Its `Display` is what the operator
/// sees: the file, the position when known, and the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub path: PathBuf,
    /// 1-based line and column.
    pub position: Option<(usize, usize)>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.position {
            Some((line, col)) => {
                write!(f, "{}:{line}:{col}: {}", self.path.display(), self.message)
            }
            None => write!(f, "{}: {}", self.path.display(), self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

/// The text of one config file, kept to turn byte spans into positions.
#[derive(Debug, Clone)]
pub struct Source {
    pub path: PathBuf,
    pub text: String,
}

impl Source {
    pub fn read(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            path: path.to_owned(),
            position: None,
            message: format!("cannot read: {e}"),
        })?;
        Ok(Self {
            path: path.to_owned(),
            text,
        })
    }

    pub fn new(path: impl Into<PathBuf>, text: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            text: text.into(),
        }
    }

    /// Deserializes the whole file; serde's errors carry their span.
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T, ConfigError> {
        toml::from_str(&self.text).map_err(|e| ConfigError {
            path: self.path.clone(),
            position: e.span().map(|s| self.position(s.start)),
            message: e.message().trim_end().to_owned(),
        })
    }

    /// An error at a span of the file (from a [`Spanned`] value).
    pub fn error_at(&self, span: Range<usize>, message: impl Into<String>) -> ConfigError {
        ConfigError {
            path: self.path.clone(),
            position: Some(self.position(span.start)),
            message: message.into(),
        }
    }

    /// An error about the file as a whole (a missing section, say).
    pub fn error(&self, message: impl Into<String>) -> ConfigError {
        ConfigError {
            path: self.path.clone(),
            position: None,
            message: message.into(),
        }
    }

    /// 1-based line and column (in characters) of a byte offset.
    pub fn position(&self, offset: usize) -> (usize, usize) {
        let mut offset = offset.min(self.text.len());
        while !self.text.is_char_boundary(offset) {
            offset -= 1;
        }
        let before = &self.text[..offset];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let col = before[line_start..].chars().count() + 1;
        (line, col)
    }

    /// Resolves a path from the config relative to the config's directory.
    pub fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_owned()
        } else {
            self.path.parent().unwrap_or(Path::new(".")).join(p)
        }
    }
}

/// Worker threads when the config says nothing. One thread carries a
/// tunnel's bytes with the fewest handoffs: each QUIC connection is driven
/// by one task anyway, and on a 2-core machine a second worker mostly adds
/// wake-ups and cross-core traffic (measured in the benchmark: 1 GiB
/// download 248 -> 306 MB/s, edge and agent CPU per GiB 15-20% lower).
pub const DEFAULT_THREADS: usize = 1;
/// The most worker threads a config may ask for.
pub const MAX_THREADS: usize = 256;

/// The `threads` setting at `key`: worker threads for the runtime.
pub fn threads(
    src: &Source,
    value: Option<&Spanned<usize>>,
    key: &str,
) -> Result<usize, ConfigError> {
    match value {
        None => Ok(DEFAULT_THREADS),
        Some(v) if (1..=MAX_THREADS).contains(v.get_ref()) => Ok(*v.get_ref()),
        Some(v) => Err(src.error_at(v.span(), format!("{key}: between 1 and {MAX_THREADS}"))),
    }
}

/// Durations in a config are capped here: longer is a typo, and a runtime
/// that adds one to an `Instant` must not overflow.
pub const MAX_CONFIG_DURATION: Duration = Duration::from_secs(7 * 24 * 3600);
/// The least a duration may be where zero makes no sense (a timeout that
/// fires at once, a retry that never waits).
pub const NONZERO: Duration = Duration::from_millis(1);

/// The duration at `key` (spanned, so errors point at the value): it must
/// lie between `min` and [`MAX_CONFIG_DURATION`]. Every duration key of
/// both configs goes through here.
pub fn duration(
    src: &Source,
    value: &Spanned<HumanDuration>,
    key: &str,
    min: Duration,
) -> Result<Duration, ConfigError> {
    let d = value.get_ref().0;
    if (min..=MAX_CONFIG_DURATION).contains(&d) {
        return Ok(d);
    }
    let max = format!("{} days", MAX_CONFIG_DURATION.as_secs() / 86_400);
    let message = if min.is_zero() {
        format!("{key}: at most {max}")
    } else {
        format!(
            "{key}: between {} and {max}",
            humantime::format_duration(min)
        )
    };
    Err(src.error_at(value.span(), message))
}

/// [`duration`] for an optional key, `default` when it is absent.
pub fn duration_or(
    src: &Source,
    value: Option<&Spanned<HumanDuration>>,
    key: &str,
    min: Duration,
    default: Duration,
) -> Result<Duration, ConfigError> {
    value.map_or(Ok(default), |v| duration(src, v, key, min))
}

/// A duration written with units: `"500ms"`, `"30s"`, `"3m"`, `"1h 30m"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct HumanDuration(pub Duration);

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s)
            .map(HumanDuration)
            .map_err(|e| {
                serde::de::Error::custom(format!(
                    "invalid duration {s:?} ({e}); write e.g. \"30s\" or \"5m\""
                ))
            })
    }
}

/// An IPv4 or IPv6 network in CIDR notation; a bare address is a /32 or /128.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr(pub ipnet::IpNet);

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        // An IPv4 client seen on a dual-stack socket is matched as IPv4.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        self.0.contains(&ip)
    }
}

impl FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Ok(net) = s.parse::<ipnet::IpNet>() {
            // Host bits set ("10.0.0.1/8") are almost always a typo.
            if net.trunc() != net {
                return Err(format!(
                    "{s:?} has host bits set; did you mean {}?",
                    net.trunc()
                ));
            }
            return Ok(Self(net));
        }
        s.parse::<IpAddr>()
            .map(|ip| Self(ipnet::IpNet::from(ip)))
            .map_err(|_| {
                format!("invalid CIDR {s:?}; write e.g. \"203.0.113.0/24\" or \"2001:db8::/32\"")
            })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Sample {
        name: String,
        wait: Option<HumanDuration>,
        nets: Option<Vec<Cidr>>,
    }

    #[test]
    fn unknown_key_reports_line_and_column() {
        let src = Source::new("x.toml", "name = \"a\"\n  nmae = \"b\"\n");
        let err = src.parse::<Sample>().unwrap_err();
        assert_eq!(err.position, Some((2, 3)), "{err}");
        assert!(
            err.to_string()
                .starts_with("x.toml:2:3: unknown field `nmae`"),
            "{err}"
        );
    }

    #[test]
    fn bad_values_point_at_the_value() {
        let src = Source::new("x.toml", "name = \"a\"\nwait = \"soon\"\n");
        let err = src.parse::<Sample>().unwrap_err();
        assert_eq!(err.position, Some((2, 8)), "{err}");
        assert!(err.message.contains("invalid duration"), "{err}");

        let src = Source::new("x.toml", "name = \"a\"\nnets = [\"10.0.0.1/8\"]\n");
        let err = src.parse::<Sample>().unwrap_err();
        assert!(err.message.contains("did you mean 10.0.0.0/8"), "{err}");
    }

    #[test]
    fn truncated_file_is_an_error_with_position() {
        let src = Source::new("x.toml", "name = \"a\nwait = ");
        let err = src.parse::<Sample>().unwrap_err();
        assert!(err.position.is_some(), "{err}");
    }

    #[test]
    fn durations_are_bounded_at_the_value() {
        #[derive(Deserialize)]
        struct D {
            wait: Spanned<HumanDuration>,
        }
        let check = |text: &str, min: Duration| {
            let src = Source::new("x.toml", text);
            let d: D = src.parse().unwrap();
            duration(&src, &d.wait, "a.wait", min).map_err(|e| e.to_string())
        };
        assert_eq!(check("wait = \"7d\"", NONZERO), Ok(MAX_CONFIG_DURATION));
        assert_eq!(
            check("wait = \"99999999999d\"", NONZERO),
            Err("x.toml:1:8: a.wait: between 1ms and 7 days".to_owned())
        );
        assert_eq!(
            check("wait = \"0s\"", NONZERO),
            Err("x.toml:1:8: a.wait: between 1ms and 7 days".to_owned())
        );
        assert_eq!(check("wait = \"0s\"", Duration::ZERO), Ok(Duration::ZERO));
        assert_eq!(
            check("wait = \"8d\"", Duration::ZERO),
            Err("x.toml:1:8: a.wait: at most 7 days".to_owned())
        );
    }

    #[test]
    fn positions_count_characters() {
        let src = Source::new("x", "é = 1\nab");
        assert_eq!(src.position(0), (1, 1));
        assert_eq!(src.position(2), (1, 2));
        assert_eq!(src.position(7), (2, 1));
        assert_eq!(src.position(999), (2, 3));
    }
}
