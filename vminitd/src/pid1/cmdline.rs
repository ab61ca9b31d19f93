//! Kernel command-line parameters vminitd reads as PID 1 (`beacon.*`).
//! A guest-facing parser: unknown keys are ignored, malformed values are
//! reported and skipped, nothing panics.
//!
//! | parameter | meaning |
//! |---|---|
//! | `beacon.hostname=NAME` | hostname |
//! | `beacon.ip=ADDR/PREFIX` | IPv4 address of `eth0` |
//! | `beacon.gw=ADDR` | default gateway (via `eth0`) |
//! | `beacon.dns=ADDR[,ADDR...]` | nameservers for /etc/resolv.conf |
//! | `beacon.share=TAG:NAME[:ro]` | virtio-fs `TAG` mounted at `<shares>/NAME` |
//! | `beacon.blk=DEVICE:NAME` | EROFS on `/dev/DEVICE` mounted read-only at `<shares>/NAME` |
//! | `beacon.log=FILTER` | log filter (default `info`) |

use std::net::Ipv4Addr;

/// One file system to mount under the shares directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Share {
    /// virtio-fs: mount tag, directory name, read-only.
    VirtioFs {
        tag: String,
        name: String,
        readonly: bool,
    },
    /// EROFS image on a virtio-blk device (`vda`), directory name.
    Erofs { device: String, name: String },
}

/// Everything PID 1 takes from the command line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BootParams {
    pub hostname: Option<String>,
    /// Address and prefix length of eth0.
    pub ip: Option<(Ipv4Addr, u8)>,
    pub gateway: Option<Ipv4Addr>,
    pub dns: Vec<Ipv4Addr>,
    pub shares: Vec<Share>,
    pub log: Option<String>,
}

/// A share or host name must be one plain path component.
fn plain_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

/// Splits a command line into words, honouring double quotes.
fn words(cmdline: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for ch in cmdline.chars() {
        match ch {
            '"' => quoted = !quoted,
            c if c.is_whitespace() && !quoted => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

fn parse_cidr(v: &str) -> Option<(Ipv4Addr, u8)> {
    let (a, p) = v.split_once('/')?;
    let prefix: u8 = p.parse().ok()?;
    (prefix <= 32).then_some((a.parse().ok()?, prefix))
}

fn parse_share(v: &str) -> Option<Share> {
    let mut parts = v.split(':');
    let tag = parts.next()?;
    let name = parts.next()?;
    let readonly = match parts.next() {
        None => false,
        Some("ro") => true,
        Some(_) => return None,
    };
    if parts.next().is_some() || !plain_name(tag) || !plain_name(name) {
        return None;
    }
    Some(Share::VirtioFs {
        tag: tag.into(),
        name: name.into(),
        readonly,
    })
}

fn parse_blk(v: &str) -> Option<Share> {
    let (device, name) = v.split_once(':')?;
    (plain_name(device) && plain_name(name)).then(|| Share::Erofs {
        device: device.into(),
        name: name.into(),
    })
}

/// Parses `/proc/cmdline` text. Returns the parameters and a list of
/// complaints about values that were skipped.
pub fn parse(cmdline: &str) -> (BootParams, Vec<String>) {
    let mut p = BootParams::default();
    let mut bad = Vec::new();
    for w in words(cmdline) {
        let Some((k, v)) = w.split_once('=') else {
            continue;
        };
        let ok = match k {
            "beacon.hostname" => {
                plain_name(v) && {
                    p.hostname = Some(v.into());
                    true
                }
            }
            "beacon.ip" => parse_cidr(v).map(|c| p.ip = Some(c)).is_some(),
            "beacon.gw" => v.parse().map(|g| p.gateway = Some(g)).is_ok(),
            "beacon.dns" => {
                let parsed: Result<Vec<Ipv4Addr>, _> = v.split(',').map(str::parse).collect();
                parsed.map(|d| p.dns.extend(d)).is_ok()
            }
            "beacon.share" => parse_share(v).map(|s| p.shares.push(s)).is_some(),
            "beacon.blk" => parse_blk(v).map(|s| p.shares.push(s)).is_some(),
            "beacon.log" => {
                p.log = Some(v.into());
                true
            }
            _ => true,
        };
        if !ok {
            bad.push(format!("ignoring malformed {k}={v:?}"));
        }
    }
    (p, bad)
}

/// /etc/resolv.conf text for `dns`.
pub fn resolv_conf(dns: &[Ipv4Addr]) -> String {
    dns.iter().map(|d| format!("nameserver {d}\n")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_command_line() {
        let (p, bad) = parse(
            "console=ttyS0 reboot=k panic=1 beacon.hostname=box1 beacon.ip=10.88.0.5/16 \
             beacon.gw=10.88.0.1 beacon.dns=1.1.1.1,8.8.8.8 beacon.share=rootfs0:c1 \
             beacon.share=ro1:data:ro beacon.blk=vda:img beacon.log=debug",
        );
        assert!(bad.is_empty(), "{bad:?}");
        assert_eq!(p.hostname.as_deref(), Some("box1"));
        assert_eq!(p.ip, Some((Ipv4Addr::new(10, 88, 0, 5), 16)));
        assert_eq!(p.gateway, Some(Ipv4Addr::new(10, 88, 0, 1)));
        assert_eq!(
            p.dns,
            [Ipv4Addr::new(1, 1, 1, 1), Ipv4Addr::new(8, 8, 8, 8)]
        );
        assert_eq!(
            p.shares,
            [
                Share::VirtioFs {
                    tag: "rootfs0".into(),
                    name: "c1".into(),
                    readonly: false
                },
                Share::VirtioFs {
                    tag: "ro1".into(),
                    name: "data".into(),
                    readonly: true
                },
                Share::Erofs {
                    device: "vda".into(),
                    name: "img".into()
                },
            ]
        );
        assert_eq!(p.log.as_deref(), Some("debug"));
        assert_eq!(
            resolv_conf(&p.dns),
            "nameserver 1.1.1.1\nnameserver 8.8.8.8\n"
        );
    }

    #[test]
    fn malformed_values_are_skipped_not_fatal() {
        let (p, bad) = parse(
            "beacon.ip=10.0.0.1/33 beacon.gw=nope beacon.dns=1.1.1.1,x \
             beacon.share=../etc:x beacon.share=t:.. beacon.share=t:n:rw beacon.blk=vda \
             beacon.hostname=a/b beacon.ip=10.0.0.2",
        );
        assert_eq!(p, BootParams::default());
        assert_eq!(bad.len(), 9, "{bad:?}");
    }

    #[test]
    fn quotes_and_empty() {
        assert_eq!(words(r#"a="b c" d"#), ["a=b c", "d"]);
        assert_eq!(parse("").0, BootParams::default());
        assert_eq!(parse("   \n").0, BootParams::default());
    }
}
