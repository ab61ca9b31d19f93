//! The two nftables tables of legacy mode, driven through the `nft` program (JSON,
//! via the `nftables` crate):
//!
//! * `beacon_runner_filter`: accept forwarding from the bridge and replies to it;
//! * `beacon_runner_nat`: masquerade traffic leaving the subnet.
//!
//! [`ensure`] replaces both tables' contents in one atomic batch (add, flush, add
//! chains and rules), so running it any number of times leaves exactly one copy of
//! each rule. [`remove`] deletes them. Never touches tables it does not own.

use std::net::Ipv4Addr;

use nftables::helper::{self, NftablesError};
use nftables::schema::Nftables;
use serde_json::json;

use crate::config::{FILTER_TABLE, NAT_TABLE};
use crate::error::{NetError, Result};

fn map_err(program: &str, action: &str, e: NftablesError) -> NetError {
    match e {
        NftablesError::NftExecution { inner, .. }
            if inner.kind() == std::io::ErrorKind::NotFound =>
        {
            NetError::NftMissing {
                program: program.to_string(),
            }
        }
        NftablesError::NftFailed { stdout, stderr, .. } => NetError::Nft {
            action: action.to_string(),
            detail: nft_failure_detail(&stdout, &stderr),
        },
        other => NetError::Nft {
            action: action.to_string(),
            detail: other.to_string(),
        },
    }
}

/// What nft said when it failed: its stderr, else its stdout (nft prints some
/// errors there), else a note that it said nothing.
fn nft_failure_detail(stdout: &str, stderr: &str) -> String {
    [stderr.trim(), stdout.trim()]
        .into_iter()
        .find(|s| !s.is_empty())
        .map(str::to_string)
        .unwrap_or_else(|| "nft exited with an error and printed nothing (run it by hand with the same ruleset: `beacon-net reconcile` refreshes the tables)".to_string())
}

fn apply(program: &str, action: &str, doc: serde_json::Value) -> Result<()> {
    let doc: Nftables = serde_json::from_value(doc).map_err(|e| NetError::Nft {
        action: action.to_string(),
        detail: format!("internal ruleset does not match the nftables schema: {e}"),
    })?;
    helper::apply_ruleset_with_args(&doc, Some(program), helper::DEFAULT_ARGS)
        .map_err(|e| map_err(program, action, e))
}

/// The batch that (re)creates both tables.
pub fn ruleset(bridge: &str, subnet: Ipv4Addr, prefix: u8) -> serde_json::Value {
    let net = json!({"prefix": {"addr": subnet.to_string(), "len": prefix}});
    let table = |name: &str| json!({"family": "ip", "name": name});
    json!({"nftables": [
        {"add": {"table": table(FILTER_TABLE)}},
        {"flush": {"table": table(FILTER_TABLE)}},
        {"add": {"chain": {"family": "ip", "table": FILTER_TABLE, "name": "forward",
            "type": "filter", "hook": "forward", "prio": 0, "policy": "accept"}}},
        {"add": {"rule": {"family": "ip", "table": FILTER_TABLE, "chain": "forward", "expr": [
            {"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": bridge}},
            {"accept": null}]}}},
        {"add": {"rule": {"family": "ip", "table": FILTER_TABLE, "chain": "forward", "expr": [
            {"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": bridge}},
            {"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": ["established", "related"]}},
            {"accept": null}]}}},
        {"add": {"table": table(NAT_TABLE)}},
        {"flush": {"table": table(NAT_TABLE)}},
        {"add": {"chain": {"family": "ip", "table": NAT_TABLE, "name": "postrouting",
            "type": "nat", "hook": "postrouting", "prio": 100, "policy": "accept"}}},
        {"add": {"rule": {"family": "ip", "table": NAT_TABLE, "chain": "postrouting", "expr": [
            {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right": net}},
            {"match": {"op": "!=", "left": {"payload": {"protocol": "ip", "field": "daddr"}}, "right": net}},
            {"masquerade": null}]}}},
    ]})
}

/// Create or refresh both tables (idempotent, atomic).
pub fn ensure(program: &str, bridge: &str, subnet: Ipv4Addr, prefix: u8) -> Result<()> {
    apply(
        program,
        "creating the beacon nftables tables",
        ruleset(bridge, subnet, prefix),
    )
}

/// Names of the beacon tables present in the current namespace.
pub fn present_tables(program: &str) -> Result<Vec<String>> {
    let out = helper::get_current_ruleset_raw(Some(program), ["list", "tables"])
        .map_err(|e| map_err(program, "listing nftables tables", e))?;
    let doc: serde_json::Value = serde_json::from_str(&out).map_err(|e| NetError::Nft {
        action: "listing nftables tables".into(),
        detail: e.to_string(),
    })?;
    let mut names = Vec::new();
    for obj in doc["nftables"].as_array().into_iter().flatten() {
        if let (Some("ip"), Some(name)) = (
            obj["table"]["family"].as_str(),
            obj["table"]["name"].as_str(),
        ) {
            if name == FILTER_TABLE || name == NAT_TABLE {
                names.push(name.to_string());
            }
        }
    }
    names.sort();
    Ok(names)
}

/// Delete both tables; absent tables are fine.
pub fn remove(program: &str) -> Result<()> {
    let present = present_tables(program)?;
    if present.is_empty() {
        return Ok(());
    }
    let cmds: Vec<_> = present
        .iter()
        .map(|name| json!({"delete": {"table": {"family": "ip", "name": name}}}))
        .collect();
    apply(
        program,
        "deleting the beacon nftables tables",
        json!({"nftables": cmds}),
    )
}

/// Turn on IPv4 forwarding in the current namespace (needed for NAT).
pub fn enable_ip_forward() -> Result<()> {
    let path = "/proc/sys/net/ipv4/ip_forward";
    if std::fs::read_to_string(path).is_ok_and(|v| v.trim() == "1") {
        return Ok(());
    }
    std::fs::write(path, "1").map_err(|source| NetError::Io {
        path: path.into(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nft_failure_detail_is_never_empty() {
        assert_eq!(nft_failure_detail("", " bad rule \n"), "bad rule");
        assert_eq!(nft_failure_detail("from stdout", ""), "from stdout");
        assert!(nft_failure_detail("", "").contains("printed nothing"));
    }

    #[test]
    fn ruleset_matches_the_nftables_schema() {
        let doc = ruleset("beacon0", "10.88.0.0".parse().unwrap(), 16);
        let parsed: Nftables = serde_json::from_value(doc).unwrap();
        assert_eq!(parsed.objects.len(), 9);
        let text = serde_json::to_string(&parsed).unwrap();
        assert!(text.contains("beacon_runner_filter") && text.contains("masquerade"));
    }

    #[test]
    fn missing_nft_is_a_clear_error() {
        let err = ensure(
            "/nonexistent/nft",
            "beacon0",
            "10.88.0.0".parse().unwrap(),
            16,
        )
        .unwrap_err();
        assert!(matches!(err, NetError::NftMissing { .. }), "{err}");
        assert!(err.to_string().contains("apt-get install nftables"));
    }
}
