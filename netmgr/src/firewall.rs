//! The host-wide nftables tables of legacy mode, driven through the `nft` program
//! (JSON, via the `nftables` crate):
//!
//! * `beacon_runner_filter` (family `ip`):
//!   - `forward` (policy accept, so other software's forwarding keeps working):
//!     unless guest-to-guest traffic is enabled, drop what the host would route
//!     from the bridge back onto it (guest to guest via the gateway); accept what
//!     comes from the bridge (the guests' NATed egress), accept
//!     established/related traffic to the bridge (replies), drop the rest that goes
//!     to the bridge (new connections into guests from outside);
//!   - `input` (policy accept; our rules match only packets that came in through
//!     the bridge): accept established/related (replies to the host's own
//!     connections to guests), accept the configured [`HostService`]s
//!     (`BEACON_HOST_ACCESS`, default none) and UDP/TCP port 53 of the DNS
//!     servers handed to the guests (`BEACON_DNS`; matters only for one on a host
//!     address), drop everything else from the guests to any host address, not
//!     only the gateway;
//! * `beacon_runner_nat` (family `ip`): masquerade traffic leaving the subnet.
//!
//! The per-TAP anti-spoofing and guest isolation table is [`crate::guard`]'s.
//!
//! [`ensure`] replaces both tables' contents in one atomic batch (add, flush, add
//! chains and rules), so running it any number of times leaves exactly one copy of
//! each rule. [`remove`] deletes every beacon table, the guard's included. Never
//! touches tables it does not own.

use nftables::helper::{self, NftablesError};
use nftables::schema::Nftables;
use serde_json::json;

use crate::config::{HostService, NetConfig, FILTER_TABLE, GUARD_TABLE, NAT_TABLE};
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

pub(crate) fn apply(program: &str, action: &str, doc: serde_json::Value) -> Result<()> {
    let doc: Nftables = serde_json::from_value(doc).map_err(|e| NetError::Nft {
        action: action.to_string(),
        detail: format!("internal ruleset does not match the nftables schema: {e}"),
    })?;
    helper::apply_ruleset_with_args(&doc, Some(program), helper::DEFAULT_ARGS)
        .map_err(|e| map_err(program, action, e))
}

/// The match of one [`HostService`].
fn service_match(service: &HostService) -> Vec<serde_json::Value> {
    let ports = |proto: &str, first: u16, last: u16| {
        let right = if first == last {
            json!(first)
        } else {
            json!({"range": [first, last]})
        };
        vec![json!({"match": {"op": "==",
            "left": {"payload": {"protocol": proto, "field": "dport"}}, "right": right}})]
    };
    match *service {
        HostService::Tcp { first, last } => ports("tcp", first, last),
        HostService::Udp { first, last } => ports("udp", first, last),
        HostService::Icmp => vec![json!({"match": {"op": "==",
            "left": {"payload": {"protocol": "ip", "field": "protocol"}}, "right": "icmp"}})],
    }
}

/// The batch that (re)creates the filter and NAT tables for `cfg` (bridge,
/// subnet, `host_access`, and DNS: guests may reach port 53 of the DNS servers
/// they are given, which only matters when one is an address of this host).
pub fn ruleset(cfg: &NetConfig) -> serde_json::Value {
    let (bridge, subnet, prefix) = (cfg.bridge.as_str(), cfg.subnet(), cfg.prefix);
    let net = json!({"prefix": {"addr": subnet.to_string(), "len": prefix}});
    let table = |name: &str| json!({"family": "ip", "name": name});
    let from_bridge =
        json!({"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": bridge}});
    let to_bridge =
        json!({"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": bridge}});
    let established = json!({"match": {"op": "in", "left": {"ct": {"key": "state"}},
        "right": ["established", "related"]}});
    let rule = |chain: &str, expr: Vec<serde_json::Value>| json!({"add": {"rule": {"family": "ip", "table": FILTER_TABLE, "chain": chain, "expr": expr}}});
    let accept = json!({"accept": null});
    let drop = json!({"drop": null});
    let mut cmds = vec![
        json!({"add": {"table": table(FILTER_TABLE)}}),
        json!({"flush": {"table": table(FILTER_TABLE)}}),
        json!({"add": {"chain": {"family": "ip", "table": FILTER_TABLE, "name": "forward",
            "type": "filter", "hook": "forward", "prio": 0, "policy": "accept"}}}),
    ];
    if !cfg.guest_to_guest {
        // A guest that sends to another guest's IP via the gateway's MAC is routed
        // back onto the bridge by the host: the guard's bridge rules never see it.
        cmds.push(rule(
            "forward",
            vec![from_bridge.clone(), to_bridge.clone(), drop.clone()],
        ));
    }
    cmds.extend([
        rule("forward", vec![from_bridge.clone(), accept.clone()]),
        rule(
            "forward",
            vec![to_bridge.clone(), established.clone(), accept.clone()],
        ),
        rule("forward", vec![to_bridge, drop.clone()]),
        json!({"add": {"chain": {"family": "ip", "table": FILTER_TABLE, "name": "input",
            "type": "filter", "hook": "input", "prio": 0, "policy": "accept"}}}),
        rule(
            "input",
            vec![from_bridge.clone(), established, accept.clone()],
        ),
    ]);
    for service in &cfg.host_access {
        let mut expr = vec![from_bridge.clone()];
        expr.extend(service_match(service));
        expr.push(accept.clone());
        cmds.push(rule("input", expr));
    }
    // DNS the guests were told to use. A server elsewhere is forwarded and never
    // meets this chain; one on a host address (a resolver on the gateway) must
    // answer, or the guests' DNS would be broken by default.
    for server in &cfg.dns {
        let daddr = json!({"match": {"op": "==",
            "left": {"payload": {"protocol": "ip", "field": "daddr"}},
            "right": server.to_string()}});
        for dns in [
            HostService::Udp {
                first: 53,
                last: 53,
            },
            HostService::Tcp {
                first: 53,
                last: 53,
            },
        ] {
            let mut expr = vec![from_bridge.clone(), daddr.clone()];
            expr.extend(service_match(&dns));
            expr.push(accept.clone());
            cmds.push(rule("input", expr));
        }
    }
    cmds.push(rule("input", vec![from_bridge, drop]));
    cmds.extend([
        json!({"add": {"table": table(NAT_TABLE)}}),
        json!({"flush": {"table": table(NAT_TABLE)}}),
        json!({"add": {"chain": {"family": "ip", "table": NAT_TABLE, "name": "postrouting",
            "type": "nat", "hook": "postrouting", "prio": 100, "policy": "accept"}}}),
        json!({"add": {"rule": {"family": "ip", "table": NAT_TABLE, "chain": "postrouting", "expr": [
            {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right": net}},
            {"match": {"op": "!=", "left": {"payload": {"protocol": "ip", "field": "daddr"}}, "right": net}},
            {"masquerade": null}]}}}),
    ]);
    json!({ "nftables": cmds })
}

/// Create or refresh the filter and NAT tables (idempotent, atomic).
pub fn ensure(cfg: &NetConfig) -> Result<()> {
    apply(
        &cfg.nft_program,
        "creating the beacon nftables tables",
        ruleset(cfg),
    )
}

/// Every table this crate owns, as (family, name).
const OWN_TABLES: [(&str, &str); 3] = [
    ("ip", FILTER_TABLE),
    ("ip", NAT_TABLE),
    ("bridge", GUARD_TABLE),
];

/// Names of the beacon tables (filter, NAT, guard) present in the current
/// namespace, sorted.
pub fn present_tables(program: &str) -> Result<Vec<String>> {
    let out = helper::get_current_ruleset_raw(Some(program), ["list", "tables"])
        .map_err(|e| map_err(program, "listing nftables tables", e))?;
    let doc: serde_json::Value = serde_json::from_str(&out).map_err(|e| NetError::Nft {
        action: "listing nftables tables".into(),
        detail: e.to_string(),
    })?;
    let mut names = Vec::new();
    for obj in doc["nftables"].as_array().into_iter().flatten() {
        let table = &obj["table"];
        if let (Some(family), Some(name)) = (table["family"].as_str(), table["name"].as_str()) {
            if OWN_TABLES.contains(&(family, name)) {
                names.push(name.to_string());
            }
        }
    }
    names.sort();
    Ok(names)
}

/// Whether every beacon table exists.
pub fn all_tables_present(program: &str) -> Result<bool> {
    Ok(present_tables(program)?.len() == OWN_TABLES.len())
}

/// Delete every beacon table (filter, NAT, guard); absent tables are fine.
pub fn remove(program: &str) -> Result<()> {
    let present = present_tables(program)?;
    let cmds: Vec<_> = OWN_TABLES
        .iter()
        .filter(|(_, name)| present.iter().any(|p| p == name))
        .map(|(family, name)| json!({"delete": {"table": {"family": family, "name": name}}}))
        .collect();
    if cmds.is_empty() {
        return Ok(());
    }
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

    fn config(host_access: &str, dns: &[&str]) -> NetConfig {
        let mut cfg = NetConfig::legacy(&beacon_paths::BeaconPaths::under(std::path::Path::new(
            "/x",
        )));
        cfg.host_access = HostService::parse_list(host_access).unwrap();
        cfg.dns = dns.iter().map(|d| d.parse().unwrap()).collect();
        cfg
    }

    #[test]
    fn ruleset_matches_the_nftables_schema() {
        let doc = ruleset(&config("", &[]));
        let parsed: Nftables = serde_json::from_value(doc).unwrap();
        // Tables 2 x (add, flush), 3 chains, forward 4 rules (guests isolated),
        // input 2, NAT 1.
        assert_eq!(parsed.objects.len(), 14);
        let text = serde_json::to_string(&parsed).unwrap();
        assert!(text.contains("beacon_runner_filter") && text.contains("masquerade"));
        assert!(text.contains("\"hook\":\"input\""), "{text}");
    }

    #[test]
    fn host_access_becomes_one_input_rule_each() {
        let doc = ruleset(&config("udp/53,tcp/8000-8010,icmp", &[]));
        let parsed: Nftables = serde_json::from_value(doc.clone()).unwrap();
        assert_eq!(parsed.objects.len(), 17);
        let input: Vec<&serde_json::Value> = doc["nftables"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["add"]["rule"]["chain"] == "input")
            .collect();
        assert_eq!(input.len(), 5, "established, 3 services, drop");
        let text = |i: usize| input[i].to_string();
        assert!(
            text(1).contains("\"udp\"") && text(1).contains("\"right\":53"),
            "{}",
            text(1)
        );
        assert!(text(2).contains("\"range\":[8000,8010]"), "{}", text(2));
        assert!(text(3).contains("\"icmp\""), "{}", text(3));
        assert!(text(4).contains("\"drop\""), "{}", text(4));
        // Every input rule matches only traffic from the bridge.
        let first = |r: &serde_json::Value| r["add"]["rule"]["expr"][0]["match"].clone();
        assert!(input.iter().all(|r| first(r)
            == json!({"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "beacon0"})));
    }

    #[test]
    fn guests_may_reach_port_53_of_their_dns_servers_only() {
        let doc = ruleset(&config("", &["10.88.0.1", "192.0.2.53"]));
        let parsed: Nftables = serde_json::from_value(doc.clone()).unwrap();
        assert_eq!(parsed.objects.len(), 18);
        let input: Vec<String> = doc["nftables"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["add"]["rule"]["chain"] == "input")
            .map(|r| r["add"]["rule"]["expr"].to_string())
            .collect();
        assert_eq!(input.len(), 6, "established, 2 servers x (udp, tcp), drop");
        for (i, (server, proto)) in [
            ("10.88.0.1", "udp"),
            ("10.88.0.1", "tcp"),
            ("192.0.2.53", "udp"),
            ("192.0.2.53", "tcp"),
        ]
        .iter()
        .enumerate()
        {
            let rule = &input[i + 1];
            assert!(rule.contains(&format!("\"right\":\"{server}\"")), "{rule}");
            assert!(
                rule.contains(&format!("\"protocol\":\"{proto}\"")),
                "{rule}"
            );
            assert!(rule.contains("\"right\":53"), "{rule}");
        }
    }

    #[test]
    fn missing_nft_is_a_clear_error() {
        let mut cfg = config("", &[]);
        cfg.nft_program = "/nonexistent/nft".into();
        let err = ensure(&cfg).unwrap_err();
        assert!(matches!(err, NetError::NftMissing { .. }), "{err}");
        assert!(err.to_string().contains("apt-get install nftables"));
    }
}
