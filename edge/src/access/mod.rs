//! Who may reach a route: client addresses (allow/deny, trusted proxies),
//! basic auth with argon2id, signed session cookies, a login page for
//! browsers, API keys for apps that send a Bearer token, and brute-force
//! throttling.

pub mod api_key;
pub mod auth;
pub mod gate;
pub mod ip;
pub mod login;
pub mod path;
pub mod pattern;
pub mod session;
pub mod throttle;

pub use ip::{ClientIpHeader, Decision, DenyReason, IpRules, client_ip};
