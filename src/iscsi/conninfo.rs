//! Cinder / os-brick iSCSI connection info: `{"driver_volume_type": "iscsi", "data": {...}}` or
//! the `data` dict alone, with `target_portal`/`target_iqn`/`target_lun` and optionally the
//! multipath lists `target_portals`/`target_iqns`/`target_luns`, and CHAP in
//! `auth_method`/`auth_username`/`auth_password`.
use serde_json::{Map, Value};

use crate::{
    error::{Error, Result},
    names::validate_iqn,
};

#[derive(Clone, PartialEq, Eq)]
pub struct Chap {
    pub username: String,
    pub password: String,
}

/// The password never shows, not even in a debug dump.
impl std::fmt::Debug for Chap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Chap").field("username", &self.username).field("password", &"***").finish()
    }
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

/// What a message may show of a value found where a dict or string was expected: its type
/// only (a list of connection dicts, or a mistyped `auth_password`, carries secrets).
fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a dict",
    }
}

fn get_str<'a>(d: &'a Map<String, Value>, key: &str) -> Result<Option<&'a str>> {
    match d.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(v) => Err(bad(format!("{key} must be a string, got {}", kind_of(v)))),
    }
}

fn lun(v: &Value, key: &str) -> Result<u32> {
    let n = match v {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.parse().ok(),
        _ => None,
    };
    let shown = if matches!(v, Value::Number(_) | Value::String(_)) { v.to_string() } else { kind_of(v).to_string() };
    n.filter(|n| *n < 16384).map(|n| n as u32).ok_or_else(|| bad(format!("{key} {shown} is not a LUN (0..16383)")))
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
        let top = v.as_object().ok_or_else(|| bad(format!("expected a dict, got {}", kind_of(v))))?;
        let data = match top.get("data") {
            Some(Value::Object(d)) => {
                if let Some(t) = get_str(top, "driver_volume_type")? {
                    if t != "iscsi" {
                        return Err(bad(format!("driver_volume_type {t:?} is not \"iscsi\"")));
                    }
                }
                d
            }
            Some(other) => return Err(bad(format!("data must be a dict, got {}", kind_of(other)))),
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
            (Some(other), _, _) => return Err(bad(format!("target_portals must be a list, got {}", kind_of(other)))),
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
            (
                json!({"target_portal": "198.18.0.1", "target_iqn": "iqn.2010-10.a:x", "target_lun": 0, "auth_method": "CHAP",
                    "auth_username": "u", "auth_password": "a b"}),
                "auth_password",
            ),
            (
                json!({"target_portal": "198.18.0.1", "target_iqn": "iqn.2010-10.a:x", "target_lun": 0, "auth_method": "kerberos"}),
                "kerberos",
            ),
            (json!({"target_portals": "198.18.0.1", "target_iqn": "iqn.2010-10.a:x", "target_lun": 0}), "must be a list"),
        ];
        for (v, needle) in cases {
            let e = Source::from_json(&v).unwrap_err();
            assert_eq!(e.kind, crate::Kind::InvalidArgument);
            assert!(e.message.contains(needle), "{:?} should mention {needle:?}", e.message);
        }
    }

    #[test]
    fn messages_never_carry_the_chap_password() {
        let pw = "Sx9PasswordOfTheTenant";
        let base = json!({"target_portal": "198.18.0.1", "target_iqn": "iqn.2010-10.a:x", "target_lun": 0, "auth_method": "CHAP",
                          "auth_username": "u1", "auth_password": pw});
        let mut cases = vec![json!([base.clone()]), json!({"data": [base.clone()]}), json!({"target_portals": base.clone()})];
        for (key, v) in [
            ("auth_password", json!([pw])),
            ("auth_password", json!({"p": pw})),
            ("auth_password", json!(format!("{pw} x"))),
            ("target_lun", json!({"p": pw})),
            ("auth_username", json!([pw])),
        ] {
            let mut c = base.clone();
            c[key] = v;
            cases.push(c);
        }
        for c in cases {
            let e = Source::from_json(&c).unwrap_err();
            assert!(!e.message.contains(pw), "{}", e.message);
        }
    }

    #[test]
    fn portals() {
        assert_eq!(validate_portal("198.18.0.1").unwrap(), "198.18.0.1:3260");
        assert_eq!(validate_portal("[fd00::1]:3261").unwrap(), "[fd00::1]:3261");
        assert!(validate_portal("198.18.0.1:3260\n").is_err());
    }

    mod props {
        use super::super::*;
        use proptest::prelude::*;
        use serde_json::json;

        fn field() -> impl Strategy<Value = Value> {
            prop_oneof![
                Just(Value::Null),
                any::<i64>().prop_map(Value::from),
                any::<bool>().prop_map(Value::from),
                "\\PC{0,30}".prop_map(Value::from),
                "(198\\.18\\.0\\.[0-9]{1,3}|\\[fd00::[0-9a-f]{1,4}\\])(:[0-9]{1,6})?".prop_map(Value::from),
                "iqn\\.20[0-9]{2}-[0-9]{2}\\.[a-z0-9.:-]{1,20}".prop_map(Value::from),
                prop_oneof![Just("CHAP"), Just("none"), Just("iscsi")].prop_map(Value::from),
                prop::collection::vec(prop_oneof![any::<u16>().prop_map(Value::from), "[0-9.:a-z]{0,16}".prop_map(Value::from)], 0..4)
                    .prop_map(Value::Array),
            ]
        }

        fn conninfo() -> impl Strategy<Value = Value> {
            let keys = prop_oneof![
                Just("target_portal"),
                Just("target_iqn"),
                Just("target_lun"),
                Just("target_portals"),
                Just("target_iqns"),
                Just("target_luns"),
                Just("auth_method"),
                Just("auth_username"),
                Just("auth_password"),
                Just("driver_volume_type")
            ];
            let data = prop::collection::btree_map(keys, field(), 0..10)
                .prop_map(|m| Value::Object(m.into_iter().map(|(k, v)| (k.to_string(), v)).collect()))
                .boxed();
            prop_oneof![data.clone(), data.prop_map(|d| json!({"driver_volume_type": "iscsi", "data": d})), field()]
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 2048, ..ProptestConfig::default() })]
            /// No panic; a refusal is InvalidArgument; what parses prints (`to_json`) and parses
            /// back to the same source.
            #[test]
            fn conninfo_never_panics_and_round_trips(v in conninfo()) {
                match Source::from_json(&v) {
                    Ok(s) => prop_assert_eq!(Source::from_json(&s.to_json()).unwrap(), s),
                    Err(e) => prop_assert_eq!(e.kind, crate::Kind::InvalidArgument),
                }
            }

            #[test]
            fn portal_validation_never_panics_and_is_idempotent(p in "\\PC{0,40}") {
                if let Ok(v) = validate_portal(&p) {
                    prop_assert_eq!(validate_portal(&v).unwrap(), v);
                }
            }
        }
    }
}
