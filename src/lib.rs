//! The `burrow` package: the CLI binary over the proto, edge and agent
//! crates, the demo (which tests reuse as a sample upstream), and the
//! admin client behind `burrow status`.

#![forbid(unsafe_code)]

pub mod demo;
pub mod status;
