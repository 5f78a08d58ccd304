//! Where the release `burrow` binary is: where `--burrow` says, else
//! beside this executable (target/release/burrow). The benches build
//! nothing themselves.

use std::path::{Path, PathBuf};

pub fn burrow_binary(
    given: Option<&Path>,
) -> Result<PathBuf, Box<dyn std::error::Error + Send + Sync>> {
    let path = match given {
        Some(p) => p.to_owned(),
        None => std::env::current_exe()?
            .parent()
            .ok_or("executable has no folder")?
            .join("burrow"),
    };
    if !path.is_file() {
        return Err(format!(
            "no burrow binary at {}; build it first with `cargo build --release` (or pass --burrow PATH)",
            path.display()
        )
        .into());
    }
    Ok(path)
}
