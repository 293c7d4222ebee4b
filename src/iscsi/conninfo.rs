//! Cinder / os-brick iSCSI connection info: `{"driver_volume_type": "iscsi", "data": {...}}` or
//! the `data` dict alone, with `target_portal`/`target_iqn`/`target_lun` and optionally the
//! multipath lists `target_portals`/`target_iqns`/`target_luns`, and CHAP in
//! `auth_method`/`auth_username`/`auth_password`.
use serde_json::{Map, Value};

use crate::{
    error::{Error, Result},
    names::validate_iqn,
};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chap {
    pub username: String,
    pub password: String,
}

/// One path to a LUN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// `ip:port` (IPv6 as `[addr]:port`).
    pub portal: String,
    pub iqn: String,
    pub lun: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    pub targets: Vec<Target>,
    pub chap: Option<Chap>,
}

fn bad(msg: String) -> Error {
    Error::invalid(format!("invalid iSCSI connection info: {msg}"))
}

fn get_str<'a>(d: &'a Map<String, Value>, key: &str) -> Result<Option<&'a str>> {
    match d.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(v) => Err(bad(format!("{key} must be a string, got {v}"))),
    }
}

fn lun(v: &Value, key: &str) -> Result<u32> {
    let n = match v {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.parse().ok(),
        _ => None,
    };
    n.filter(|n| *n < 16384).map(|n| n as u32).ok_or_else(|| bad(format!("{key} {v} is not a LUN (0..16383)")))
}

/// `ip:port` with an IPv4 or bracketed IPv6 address; the port defaults to 3260.
pub fn validate_portal(p: &str) -> Result<String> {
    let (host, port) = if let Some(rest) = p.strip_prefix('[') {
        let (h, tail) = rest.split_once(']').ok_or_else(|| bad(format!("portal {p:?}: unclosed '['")))?;
        h.parse::<std::net::Ipv6Addr>().map_err(|_| bad(format!("portal {p:?}: bad IPv6 address")))?;
        (format!("[{h}]"), tail.strip_prefix(':'))
    } else {
        let (h, port) = match p.rsplit_once(':') {
            Some((h, port)) => (h, Some(port)),
            None => (p, None),
        };
        h.parse::<std::net::Ipv4Addr>().map_err(|_| bad(format!("portal {p:?}: expected IPv4:port")))?;
        (h.to_string(), port)
    };
    let port: u16 = match port {
        None => 3260,
        Some(s) => s.parse().ok().filter(|n| *n > 0).ok_or_else(|| bad(format!("portal {p:?}: bad port")))?,
    };
    Ok(format!("{host}:{port}"))
}

fn validate_secret(what: &str, s: &str) -> Result<String> {
    if s.is_empty() || s.len() > 255 || s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(bad(format!("{what} must be 1-255 printable characters without spaces")));
    }
    Ok(s.to_string())
}

impl Source {
    pub fn from_json(v: &Value) -> Result<Source> {
        let top = v.as_object().ok_or_else(|| bad(format!("expected a dict, got {v}")))?;
        let data = match top.get("data") {
            Some(Value::Object(d)) => {
                if let Some(t) = get_str(top, "driver_volume_type")? {
                    if t != "iscsi" {
                        return Err(bad(format!("driver_volume_type {t:?} is not \"iscsi\"")));
                    }
                }
                d
            }
            Some(other) => return Err(bad(format!("data must be a dict, got {other}"))),
            None => top,
        };
        let mut targets = Vec::new();
        match (data.get("target_portals"), data.get("target_iqns"), data.get("target_luns")) {
            (Some(Value::Array(ps)), iqns, luns) => {
                let iqns = iqns.and_then(Value::as_array);
                let luns = luns.and_then(Value::as_array);
                for (i, p) in ps.iter().enumerate() {
                    let portal = p.as_str().ok_or_else(|| bad(format!("target_portals[{i}] must be a string")))?;
                    let iqn = match iqns.and_then(|a| a.get(i)) {
                        Some(v) => v.as_str().ok_or_else(|| bad(format!("target_iqns[{i}] must be a string")))?,
                        None => get_str(data, "target_iqn")?.ok_or_else(|| bad("missing target_iqn".into()))?,
                    };
                    let l = match luns.and_then(|a| a.get(i)) {
                        Some(v) => lun(v, &format!("target_luns[{i}]"))?,
                        None => lun(data.get("target_lun").ok_or_else(|| bad("missing target_lun".into()))?, "target_lun")?,
                    };
                    targets.push(Target { portal: validate_portal(portal)?, iqn: validate_iqn(iqn)?.to_string(), lun: l });
                }
            }
            (Some(other), _, _) => return Err(bad(format!("target_portals must be a list, got {other}"))),
            (None, _, _) => {
                let portal = get_str(data, "target_portal")?.ok_or_else(|| bad("missing target_portal".into()))?;
                let iqn = get_str(data, "target_iqn")?.ok_or_else(|| bad("missing target_iqn".into()))?;
                let l = lun(data.get("target_lun").ok_or_else(|| bad("missing target_lun".into()))?, "target_lun")?;
                targets.push(Target { portal: validate_portal(portal)?, iqn: validate_iqn(iqn)?.to_string(), lun: l });
            }
        }
        if targets.is_empty() {
            return Err(bad("no target portals".into()));
        }
        let chap = match get_str(data, "auth_method")? {
            None | Some("") | Some("None") | Some("none") => None,
            Some(m) if m.eq_ignore_ascii_case("chap") => Some(Chap {
                username: validate_secret("auth_username", get_str(data, "auth_username")?.unwrap_or(""))?,
                password: validate_secret("auth_password", get_str(data, "auth_password")?.unwrap_or(""))?,
            }),
            Some(m) => return Err(bad(format!("auth_method {m:?} not supported (CHAP or none)"))),
        };
        Ok(Source { targets, chap })
    }

    /// The connection info a child hands to `attach` (the os-brick shape).
    pub fn to_json(&self) -> Value {
        let t = &self.targets[0];
        let mut data = serde_json::json!({
            "target_portal": t.portal, "target_iqn": t.iqn, "target_lun": t.lun,
            "target_discovered": false,
        });
        if self.targets.len() > 1 {
            data["target_portals"] = self.targets.iter().map(|t| Value::from(t.portal.clone())).collect();
            data["target_iqns"] = self.targets.iter().map(|t| Value::from(t.iqn.clone())).collect();
            data["target_luns"] = self.targets.iter().map(|t| Value::from(t.lun)).collect();
        }
        if let Some(c) = &self.chap {
            data["auth_method"] = "CHAP".into();
            data["auth_username"] = c.username.clone().into();
            data["auth_password"] = c.password.clone().into();
        }
        serde_json::json!({"driver_volume_type": "iscsi", "data": data})
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_cinder_shape_with_chap() {
        let v = json!({"driver_volume_type": "iscsi", "data": {
            "target_portal": "198.18.0.1:3260", "target_iqn": "iqn.2010-10.org.openstack:volume-1",
            "target_lun": 1, "auth_method": "CHAP", "auth_username": "u1", "auth_password": "secret123456"}});
        let s = Source::from_json(&v).unwrap();
        assert_eq!(s.targets, vec![Target { portal: "198.18.0.1:3260".into(), iqn: "iqn.2010-10.org.openstack:volume-1".into(), lun: 1 }]);
        assert_eq!(s.chap.as_ref().unwrap().username, "u1");
        assert_eq!(Source::from_json(&s.to_json()).unwrap(), s, "round trip");
    }

    #[test]
    fn parses_multipath_lists() {
        let v = json!({"target_portals": ["198.18.0.1:3260", "198.18.0.2"], "target_iqns": ["iqn.2010-10.a:x", "iqn.2010-10.a:y"],
                       "target_luns": [0, "2"], "target_iqn": "iqn.2010-10.a:x", "target_lun": 0});
        let s = Source::from_json(&v).unwrap();
        assert_eq!(s.targets[1], Target { portal: "198.18.0.2:3260".into(), iqn: "iqn.2010-10.a:y".into(), lun: 2 });
        assert_eq!(Source::from_json(&s.to_json()).unwrap(), s);
    }

    #[test]
    fn rejects_malformed_naming_the_value() {
        let cases = [
            (json!("x"), "expected a dict"),
            (json!({"driver_volume_type": "rbd", "data": {}}), "\"rbd\""),
            (json!({"target_iqn": "iqn.2010-10.a:x", "target_lun": 0}), "missing target_portal"),
            (json!({"target_portal": "host:3260", "target_iqn": "iqn.2010-10.a:x", "target_lun": 0}), "\"host:3260\""),
            (json!({"target_portal": "198.18.0.1:99999", "target_iqn": "iqn.2010-10.a:x", "target_lun": 0}), "bad port"),
            (json!({"target_portal": "198.18.0.1", "target_iqn": "iqn.2010-10.a:x y", "target_lun": 0}), "\"iqn.2010-10.a:x y\""),
            (json!({"target_portal": "198.18.0.1", "target_iqn": "iqn.2010-10.a:x", "target_lun": -1}), "-1"),
            (json!({"target_portal": "198.18.0.1", "target_iqn": "iqn.2010-10.a:x", "target_lun": 0, "auth_method": "CHAP",
                    "auth_username": "u", "auth_password": "a b"}), "auth_password"),
            (json!({"target_portal": "198.18.0.1", "target_iqn": "iqn.2010-10.a:x", "target_lun": 0, "auth_method": "kerberos"}), "kerberos"),
            (json!({"target_portals": "198.18.0.1", "target_iqn": "iqn.2010-10.a:x", "target_lun": 0}), "must be a list"),
        ];
        for (v, needle) in cases {
            let e = Source::from_json(&v).unwrap_err();
            assert_eq!(e.kind, crate::Kind::InvalidArgument);
            assert!(e.message.contains(needle), "{:?} should mention {needle:?}", e.message);
        }
    }

    #[test]
    fn portals() {
        assert_eq!(validate_portal("198.18.0.1").unwrap(), "198.18.0.1:3260");
        assert_eq!(validate_portal("[fd00::1]:3261").unwrap(), "[fd00::1]:3261");
        assert!(validate_portal("198.18.0.1:3260\n").is_err());
    }
}
