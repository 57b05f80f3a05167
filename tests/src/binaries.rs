//! Where the tests find the workspace's binaries: an environment variable the
//! Makefile sets, else Cargo's build directory.

use crate::cluster::workspace_dir;
use anyhow::bail;
use std::path::PathBuf;

/// A binary of the workspace: `$env_var` when set, else `<target>/debug/<name>`
/// (`$CARGO_TARGET_DIR`, else the workspace's `target`).
fn built_binary(env_var: &str, name: &str) -> anyhow::Result<PathBuf> {
    let path = match std::env::var_os(env_var) {
        Some(path) if !path.is_empty() => PathBuf::from(path),
        _ => match std::env::var_os("CARGO_TARGET_DIR") {
            Some(dir) if !dir.is_empty() => PathBuf::from(dir),
            _ => workspace_dir().join("target"),
        }
        .join("debug")
        .join(name),
    };
    if !path.is_file() {
        bail!(
            "the binary {} does not exist; build it with `cargo build -p {name}` \
             or set {env_var} (`make integration-test` does both)",
            path.display()
        );
    }
    Ok(path)
}

pub(crate) fn operator_binary() -> anyhow::Result<PathBuf> {
    built_binary("SHOAL_OPERATOR_BIN", "shoal-operator")
}

pub(crate) fn agent_binary() -> anyhow::Result<PathBuf> {
    built_binary("SHOAL_AGENT_BIN", "shoal-agent")
}

/// The `kubectl-shoal` plugin binary: `$SHOAL_KUBECTL_SHOAL_BIN`, else
/// `target/debug/kubectl-shoal` (`cargo build --workspace --bins` builds it).
pub fn kubectl_shoal_binary() -> anyhow::Result<PathBuf> {
    built_binary("SHOAL_KUBECTL_SHOAL_BIN", "kubectl-shoal")
}

/// The `shoal-agent` binary (`$SHOAL_AGENT_BIN`, else `target/debug/shoal-agent`),
/// for tests that run it in standalone mode (`--model NAME=PATH`).
pub fn shoal_agent_binary() -> anyhow::Result<PathBuf> {
    agent_binary()
}
