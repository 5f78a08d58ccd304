//! The `burrow` package: the CLI binary over the proto, edge and agent
//! crates, and the demo (which tests reuse as a sample upstream).

#![forbid(unsafe_code)]

pub mod demo;
