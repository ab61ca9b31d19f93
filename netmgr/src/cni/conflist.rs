//! Loading the CNI network configuration list (`*.conflist`, or a single-plugin
//! `*.conf`) named by `BEACON_CNI_NETWORK` from the configuration folder, and
//! building each plugin's stdin document.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::error::{NetError, Result};

/// A parsed network configuration list.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfList {
    pub name: String,
    pub cni_version: String,
    /// Each plugin's configuration object, in chain order.
    pub plugins: Vec<Value>,
    /// Where it was read from.
    pub path: PathBuf,
}

impl ConfList {
    /// Parse one document (`path` only names it in errors).
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let err = |detail: String| NetError::CniConfig {
            path: path.to_path_buf(),
            detail,
        };
        let doc: Value =
            serde_json::from_str(text).map_err(|e| err(format!("does not parse as JSON: {e}")))?;
        let name = doc["name"]
            .as_str()
            .ok_or_else(|| err("has no string \"name\"".into()))?
            .to_string();
        let cni_version = doc["cniVersion"].as_str().unwrap_or("0.4.0").to_string();
        let plugins = match doc.get("plugins") {
            Some(Value::Array(list)) => list.clone(),
            Some(_) => return Err(err("\"plugins\" is not an array".into())),
            // A single-plugin .conf file.
            None => vec![doc.clone()],
        };
        if plugins.is_empty() {
            return Err(err("has no plugins".into()));
        }
        for (i, p) in plugins.iter().enumerate() {
            let ty = p["type"].as_str().unwrap_or("");
            if ty.is_empty() || ty.contains('/') || ty.contains("..") {
                return Err(err(format!("plugin {i} has no valid \"type\"")));
            }
        }
        Ok(ConfList {
            name,
            cni_version,
            plugins,
            path: path.to_path_buf(),
        })
    }

    /// Find the list named `network` in `dir` (files in name order, first match wins).
    pub fn load(dir: &Path, network: &str) -> Result<Self> {
        let entries = std::fs::read_dir(dir).map_err(|e| NetError::CniConfig {
            path: dir.to_path_buf(),
            detail: format!("cannot read the folder: {e}"),
        })?;
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                matches!(
                    p.extension().and_then(|e| e.to_str()),
                    Some("conflist" | "conf" | "json")
                )
            })
            .collect();
        files.sort();
        let mut first_error = None;
        for file in files {
            let text = std::fs::read_to_string(&file).map_err(|e| NetError::CniConfig {
                path: file.clone(),
                detail: e.to_string(),
            })?;
            match Self::parse(&text, &file) {
                Ok(list) if list.name == network => return Ok(list),
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "skipping CNI configuration");
                    first_error.get_or_insert(e);
                }
            }
        }
        Err(first_error.unwrap_or_else(|| NetError::CniConfig {
            path: dir.to_path_buf(),
            detail: format!(
                "no configuration list named {network:?}: add one or set BEACON_CNI_NETWORK"
            ),
        }))
    }

    /// The stdin document of plugin `i`: its own config plus the list's name and
    /// version, and the previous plugin's result when there is one.
    pub fn plugin_stdin(&self, i: usize, prev_result: Option<&Value>) -> Value {
        let mut conf = self.plugins[i].clone();
        if let Value::Object(map) = &mut conf {
            map.insert("name".into(), json!(self.name));
            map.insert("cniVersion".into(), json!(self.cni_version));
            if let Some(prev) = prev_result {
                map.insert("prevResult".into(), prev.clone());
            }
        }
        conf
    }

    /// The whole list as JSON (stored with a lease so DEL works after a config change).
    pub fn to_json(&self) -> Value {
        json!({"name": self.name, "cniVersion": self.cni_version, "plugins": self.plugins})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_lists_and_single_confs() {
        let p = Path::new("x.conflist");
        let l = ConfList::parse(
            r#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"bridge"},{"type":"firewall"}]}"#,
            p,
        )
        .unwrap();
        assert_eq!(l.plugins.len(), 2);
        let stdin = l.plugin_stdin(1, Some(&json!({"ips": []})));
        assert_eq!(stdin["name"], "n");
        assert_eq!(stdin["cniVersion"], "1.0.0");
        assert_eq!(stdin["prevResult"], json!({"ips": []}));
        let single = ConfList::parse(r#"{"name":"s","type":"bridge"}"#, p).unwrap();
        assert_eq!(single.plugins.len(), 1);
    }

    #[test]
    fn bad_lists_name_the_file() {
        let p = Path::new("/etc/cni/net.d/bad.conflist");
        for text in [
            "{not json",
            r#"{"plugins":[]}"#,
            r#"{"name":"n","plugins":[]}"#,
            r#"{"name":"n","plugins":[{"type":"../../bin/sh"}]}"#,
            r#"{"name":"n","plugins":"x"}"#,
        ] {
            let err = ConfList::parse(text, p).unwrap_err();
            assert!(err.to_string().contains("bad.conflist"), "{err}");
        }
    }
}
