//! Executing one CNI plugin binary per the CNI spec: `CNI_*` environment, the
//! network configuration on stdin, the result (or a CNI error object) on stdout.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

use crate::error::{NetError, Result};

/// ADD, DEL or CHECK.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CniCommand {
    Add,
    Del,
    Check,
}

impl CniCommand {
    pub fn as_str(self) -> &'static str {
        match self {
            CniCommand::Add => "ADD",
            CniCommand::Del => "DEL",
            CniCommand::Check => "CHECK",
        }
    }
}

/// What every plugin invocation of one sandbox shares.
#[derive(Debug, Clone)]
pub struct Invocation<'a> {
    pub bin_dir: &'a Path,
    pub container_id: &'a str,
    /// Empty when the namespace is already gone (DEL after a crash).
    pub netns: &'a str,
    pub ifname: &'a str,
}

/// Run plugin `ty` with `stdin`; returns its parsed stdout (`Value::Null` when empty,
/// as DEL and CHECK print nothing).
pub fn exec(inv: &Invocation<'_>, command: CniCommand, ty: &str, stdin: &Value) -> Result<Value> {
    let bin: PathBuf = inv.bin_dir.join(ty);
    if !bin.is_file() {
        return Err(NetError::CniPluginMissing {
            plugin: ty.to_string(),
            bin_dir: inv.bin_dir.to_path_buf(),
        });
    }
    let fail = |detail: String, stderr: String| NetError::CniPlugin {
        plugin: ty.to_string(),
        command: command.as_str(),
        detail,
        stderr,
    };
    let mut child = Command::new(&bin)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("CNI_COMMAND", command.as_str())
        .env("CNI_CONTAINERID", inv.container_id)
        .env("CNI_NETNS", inv.netns)
        .env("CNI_IFNAME", inv.ifname)
        .env("CNI_PATH", inv.bin_dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            fail(
                format!("cannot start {}: {e}", bin.display()),
                String::new(),
            )
        })?;
    let body = serde_json::to_vec(stdin).map_err(|e| fail(e.to_string(), String::new()))?;
    if let Some(mut pipe) = child.stdin.take() {
        // A plugin may exit before reading everything; its exit status tells.
        let _ = pipe.write_all(&body);
    }
    let out = child
        .wait_with_output()
        .map_err(|e| fail(format!("waiting for it: {e}"), String::new()))?;
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    let stdout = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() {
        // CNI errors are a JSON object {code, msg, details} on stdout.
        let detail = serde_json::from_str::<Value>(&stdout)
            .ok()
            .and_then(|v| {
                v["msg"].as_str().map(|m| {
                    format!(
                        "{} (code {}) {}",
                        m,
                        v["code"],
                        v["details"].as_str().unwrap_or("")
                    )
                })
            })
            .unwrap_or_else(|| format!("exited with {}: {stdout}", out.status));
        return Err(fail(detail, stderr));
    }
    if stdout.is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_str(&stdout)
        .map_err(|e| fail(format!("printed a result that is not JSON: {e}"), stderr))
}
