//! The registry records other hosts publish (python/vmthunder/registry.py): untrusted input.
//! Anyone who can write to the coordination service, or a host with a bug, writes them, so
//! every field is checked once, where records are read, into typed records; a record that
//! fails is skipped by the reader (one log line naming the host and the field), never handed
//! on half-checked. A grant (the connection dict a parent published for us) is used only if it
//! names exactly what we would log in to anyway: one target, LUN 0, the IQN vmthunder derives
//! for that parent and image, on the parent's published export address (`check_grant`).
//!
//! Messages name the host and the field, and show a field's value only where it is no secret
//! (never a grant's content: it carries CHAP credentials).
use std::{collections::BTreeMap, net::Ipv4Addr};

use serde::Serialize;
use serde_json::{Map, Value};

use crate::{
    error::{Error, Result},
    iscsi::Source,
    names,
    placement::{JoinState, ParentRef, Placement, PlacementError},
};

/// Deeper than any tree placement builds (its depth bound is ceil(log_k N) + 1): a record
/// claiming more is corrupt.
pub const MAX_DEPTH: u64 = 255;
/// More parents than placement ever names (`max_parents` is small).
pub const MAX_PARENTS: usize = 16;
const MAX_TEXT: usize = 255;
/// Grants of one record: one per host of the cloud.
pub const MAX_GRANTS: usize = 100_000;

/// A host's record in the hosts group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HostRecord {
    pub host: String,
    /// Its iSCSI initiator name (what relays grant); `None`: it cannot read from relays.
    pub initiator: Option<String>,
    /// Where its exports are reached; `None`: it does not relay.
    pub export_ip: Option<Ipv4Addr>,
    pub failure_domain: Option<String>,
    /// The public key relays seal its grants with (`seal`); `None`: it gets no grants.
    pub grant_key: Option<String>,
}

/// A host's record in an image's group (what the states mean: `placement::protocol`).
#[derive(Debug, Clone, PartialEq)]
pub struct ImageRecord {
    pub host: String,
    /// Published as `state` and, for `Built`, `"built": true` beside `"state": "joining"`.
    pub state: JoinState,
    pub depth: u32,
    /// "origin" or host names, in failover order.
    pub parents: Vec<String>,
    pub failure_domain: Option<String>,
    /// host -> connection dict; checked for its shape here, for its content by `check_grant`
    /// when the recipient uses it.
    pub grants: BTreeMap<String, Value>,
}

impl ImageRecord {
    /// The record as published (what `parse_image_record` reads back).
    pub fn to_wire(&self) -> Value {
        let (state, built) = self.state.to_wire();
        let mut v = serde_json::json!({"host": self.host, "state": state, "depth": self.depth, "parents": self.parents,
                                       "failure_domain": self.failure_domain, "grants": self.grants});
        if built {
            v["built"] = Value::Bool(true);
        }
        v
    }

    /// Its parents and depth as a placement (`parents` as published: the origin is among them).
    pub fn placement(&self) -> Placement {
        Placement { parents: self.parents.iter().cloned().map(ParentRef::from).collect(), depth: self.depth }
    }

    /// This record in `state`, if the protocol lets it follow the record's own
    /// (`JoinState::may_follow`).
    pub fn with_state(&self, state: JoinState) -> std::result::Result<ImageRecord, PlacementError> {
        Ok(ImageRecord { state: JoinState::transition(Some(self.state), state)?, ..self.clone() })
    }
}

fn record_err(host: &str, field: &str, why: impl std::fmt::Display) -> Error {
    Error::invalid(format!("record of host {host:?}: field {field}: {why}"))
}

/// A short, printable rendering of a (non-secret) value for a message.
fn shown(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 60 {
        format!("{}...", s.chars().take(60).collect::<String>())
    } else {
        s
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a dict",
    }
}

fn object<'a>(v: &'a Value) -> Result<&'a Map<String, Value>> {
    v.as_object().ok_or_else(|| Error::invalid(format!("registry record: expected a dict, got {}", type_name(v))))
}

/// The member's host name: the one field every message names, so checked first.
fn host_of(m: &Map<String, Value>) -> Result<String> {
    let h = match m.get("host") {
        Some(Value::String(h)) => h,
        Some(v) => return Err(Error::invalid(format!("registry record: field host: expected a string, got {}", shown(v)))),
        None => return Err(Error::invalid("registry record: field host: missing")),
    };
    names::validate_host(h).map_err(|e| Error::invalid(format!("registry record: field host: {}", e.message)))?;
    Ok(h.clone())
}

/// An optional printable text field (no control characters, bounded).
fn opt_text(m: &Map<String, Value>, host: &str, field: &str) -> Result<Option<String>> {
    match m.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.len() <= MAX_TEXT && !s.chars().any(char::is_control) => Ok(Some(s.clone())),
        Some(Value::String(_)) => Err(record_err(host, field, format!("at most {MAX_TEXT} printable characters"))),
        Some(v) => Err(record_err(host, field, format!("expected a string, got {}", shown(v)))),
    }
}

/// Check a hosts-group record (`{host, initiator, export_ip, failure_domain}`).
pub fn parse_host_record(v: &Value) -> Result<HostRecord> {
    let m = object(v)?;
    let host = host_of(m)?;
    let initiator = match opt_text(m, &host, "initiator")? {
        Some(i) => Some(names::validate_iqn(&i).map_err(|e| record_err(&host, "initiator", e.message))?.to_string()),
        None => None,
    };
    let export_ip = match opt_text(m, &host, "export_ip")? {
        Some(ip) => Some(ip.parse::<Ipv4Addr>().map_err(|_| record_err(&host, "export_ip", format!("{ip:?} is not an IPv4 address")))?),
        None => None,
    };
    let failure_domain = opt_text(m, &host, "failure_domain")?;
    let grant_key = match opt_text(m, &host, "grant_key")? {
        Some(k) => {
            Some(crate::seal::public_key(&k).map(|_| k.to_ascii_lowercase()).map_err(|e| record_err(&host, "grant_key", e.message))?)
        }
        None => None,
    };
    Ok(HostRecord { host, initiator, export_ip, failure_domain, grant_key })
}

/// Check an image-group record (`{host, state, depth, parents, failure_domain, grants, built}`;
/// `built` is read only beside `"state": "joining"`).
pub fn parse_image_record(v: &Value) -> Result<ImageRecord> {
    let m = object(v)?;
    let host = host_of(m)?;
    let built = match m.get("built") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(v) => return Err(record_err(&host, "built", format!("expected a boolean, got {}", shown(v)))),
    };
    let state = match m.get("state") {
        Some(Value::String(s)) => JoinState::from_wire(s, built)
            .ok_or_else(|| record_err(&host, "state", format!("{} is not joining, ready, leaving or failed", shown(&m["state"]))))?,
        Some(v) => return Err(record_err(&host, "state", format!("expected a string, got {}", shown(v)))),
        None => return Err(record_err(&host, "state", "missing")),
    };
    let depth = match m.get("depth") {
        // An integer: 2.0 or "2" is a bug or a forgery, not a depth.
        Some(Value::Number(n)) => n
            .as_u64()
            .filter(|d| (1..=MAX_DEPTH).contains(d))
            .map(|d| d as u32)
            .ok_or_else(|| record_err(&host, "depth", format!("{n} is not an integer in 1..{MAX_DEPTH}")))?,
        Some(v) => return Err(record_err(&host, "depth", format!("expected an integer, got {}", shown(v)))),
        None => return Err(record_err(&host, "depth", "missing")),
    };
    let parents = match m.get("parents") {
        Some(Value::Array(ps)) if ps.len() <= MAX_PARENTS => ps
            .iter()
            .enumerate()
            .map(|(i, p)| match p {
                Value::String(s) if s == "origin" || names::validate_host(s).is_ok() => Ok(s.clone()),
                _ => Err(record_err(&host, &format!("parents[{i}]"), format!("{} is neither \"origin\" nor a host name", shown(p)))),
            })
            .collect::<Result<Vec<_>>>()?,
        Some(Value::Array(_)) => return Err(record_err(&host, "parents", format!("more than {MAX_PARENTS}"))),
        Some(v) => return Err(record_err(&host, "parents", format!("expected a list, got {}", shown(v)))),
        None => return Err(record_err(&host, "parents", "missing")),
    };
    if parents.iter().any(|p| p == &host) {
        return Err(record_err(&host, "parents", "names the host itself"));
    }
    let failure_domain = opt_text(m, &host, "failure_domain")?;
    let grants = match m.get("grants") {
        None | Some(Value::Null) => BTreeMap::new(),
        Some(Value::Object(g)) if g.len() <= MAX_GRANTS => {
            let mut out = BTreeMap::new();
            for (to, grant) in g {
                // The key is shown: it is a host name, the grant's content is not.
                if names::validate_host(to).is_err() {
                    return Err(record_err(&host, "grants", format!("key {to:?} is not a host name")));
                }
                if !grant.is_object() {
                    return Err(record_err(&host, &format!("grants[{to:?}]"), format!("expected a dict, got {}", type_name(grant))));
                }
                out.insert(to.clone(), grant.clone());
            }
            out
        }
        Some(Value::Object(_)) => return Err(record_err(&host, "grants", format!("more than {MAX_GRANTS}"))),
        Some(v) => return Err(record_err(&host, "grants", format!("expected a dict, got {}", type_name(v)))),
    };
    Ok(ImageRecord { host, state, depth, parents, failure_domain, grants })
}

/// Accept `grant` (what `parent` published for us to read `image`) only if it names exactly
/// one target, LUN 0, the IQN vmthunder derives for `parent` and `image`, on a portal at
/// `export_ip` (the parent's published export address). Returns the normalised connection
/// dict. A forged or corrupted grant could otherwise log this node in to another image's
/// export, or to any target reachable from it, with one login thread per target it lists.
pub fn check_grant(grant: &Value, parent: &str, image: &str, export_ip: Option<&str>) -> Result<Value> {
    let bad = |why: String| Error::invalid(format!("grant of host {parent:?} for image {image:?}: {why}"));
    names::validate_host(parent)?;
    names::validate_id("image id", image)?;
    let ip: Ipv4Addr = export_ip
        .ok_or_else(|| bad("the host publishes no export address".into()))?
        .parse()
        .map_err(|_| bad("the host's published export address is not an IPv4 address".into()))?;
    // Source's messages name fields, never the CHAP secret.
    let src = Source::from_json(grant).map_err(|e| bad(e.message))?;
    let [t] = src.targets.as_slice() else {
        return Err(bad(format!("{} targets, expected exactly one", src.targets.len())));
    };
    if t.lun != 0 {
        return Err(bad(format!("LUN {}, expected 0", t.lun)));
    }
    let want = names::template_iqn(parent, image);
    if t.iqn != want {
        return Err(bad(format!("target {:?}, expected {want:?}", t.iqn)));
    }
    let at = t.portal.rsplit_once(':').map(|(h, _)| h).unwrap_or("");
    if at.parse::<Ipv4Addr>().ok() != Some(ip) {
        return Err(bad(format!("portal {:?} is not at the host's export address {ip}", t.portal)));
    }
    Ok(src.to_json())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn grant(portal: &str, iqn: &str, lun: u32) -> Value {
        json!({"driver_volume_type": "iscsi", "data": {"target_portal": portal, "target_iqn": iqn, "target_lun": lun,
               "auth_method": "CHAP", "auth_username": "vmtabc", "auth_password": "S3cretS3cretS3cr"}})
    }

    #[test]
    fn a_grant_for_the_parents_own_export_is_accepted() {
        let iqn = names::template_iqn("cn2", "img");
        let g = check_grant(&grant("198.18.0.2:3260", &iqn, 0), "cn2", "img", Some("198.18.0.2")).unwrap();
        assert_eq!(Source::from_json(&g).unwrap().targets[0].iqn, iqn);
    }

    #[test]
    fn forged_grants_are_refused_naming_what_is_wrong() {
        let iqn = names::template_iqn("cn2", "img");
        let two = json!({"data": {"target_portals": ["198.18.0.2:3260", "198.18.0.2:3261"], "target_iqns": [iqn, iqn],
                                  "target_luns": [0, 0], "target_iqn": iqn, "target_lun": 0}});
        let cases = [
            (grant("198.18.0.2:3260", &names::template_iqn("cn2", "other"), 0), "target"), // another image's export
            (grant("198.18.0.2:3260", &names::template_iqn("cn3", "img"), 0), "target"),   // another host's
            (grant("198.18.0.2:3260", "iqn.2010-10.org.openstack:volume-1", 0), "target"), // any target
            (grant("198.18.0.9:3260", &iqn, 0), "portal"),                                 // elsewhere
            (grant("198.18.0.2:3260", &iqn, 3), "LUN 3"),
            (two, "2 targets"),
            (json!({"target_portal": "198.18.0.2"}), "missing target_iqn"),
            (json!("x"), "expected a dict"),
        ];
        for (g, needle) in cases {
            let e = check_grant(&g, "cn2", "img", Some("198.18.0.2")).unwrap_err();
            assert_eq!(e.kind, crate::Kind::InvalidArgument);
            assert!(e.message.contains(needle) && e.message.contains("\"cn2\""), "{:?} should mention {needle:?}", e.message);
            assert!(!e.message.contains("S3cret"), "{}", e.message);
        }
        let e = check_grant(&grant("198.18.0.2:3260", &iqn, 0), "cn2", "img", None).unwrap_err();
        assert!(e.message.contains("no export address"), "{}", e.message);
    }

    #[test]
    fn records_parse_and_bad_fields_are_named() {
        let r = parse_image_record(&json!({"host": "cn2", "state": "ready", "depth": 2, "parents": ["cn1", "origin"],
                                           "failure_domain": "r1", "grants": {"cn3": {"target_iqn": "x"}}, "extra": 1}))
        .unwrap();
        assert_eq!((r.state, r.depth, r.parents.len()), (JoinState::Ready, 2, 2));
        let built = |state: &str, built: bool| {
            parse_image_record(&json!({"host": "cn2", "state": state, "depth": 1, "parents": ["origin"], "built": built})).unwrap().state
        };
        assert_eq!(
            (built("joining", true), built("joining", false), built("ready", true)),
            (JoinState::Built, JoinState::Joining, JoinState::Ready)
        );
        let h = parse_host_record(&json!({"host": "cn2", "initiator": "iqn.1993-08.org.debian:01:cn2", "export_ip": "198.18.0.2",
                                          "failure_domain": null}))
        .unwrap();
        assert_eq!(h.export_ip, Some(Ipv4Addr::new(198, 18, 0, 2)));
        let base = json!({"host": "cn2", "state": "ready", "depth": 2, "parents": ["origin"]});
        let with = |k: &str, v: Value| {
            let mut r = base.clone();
            r[k] = v;
            r
        };
        for (rec, field) in [
            (with("depth", json!("2")), "field depth"),
            (with("depth", json!(2.5)), "field depth"),
            (with("depth", json!(0)), "field depth"),
            (with("depth", json!(1u64 << 40)), "field depth"),
            (with("state", json!("bogus")), "field state"),
            (with("parents", json!("origin")), "field parents"),
            (with("parents", json!(["origin", 3])), "field parents[1]"),
            (with("parents", json!(["cn2"])), "field parents"),
            (with("grants", json!(["cn3"])), "field grants"),
            (with("grants", json!({"cn3": "password"})), "field grants[\"cn3\"]"),
            (with("grants", json!({"CN 3": {}})), "field grants"),
            (with("built", json!("yes")), "field built"),
            (with("failure_domain", json!({"a": 1})), "field failure_domain"),
        ] {
            let e = parse_image_record(&rec).unwrap_err();
            assert!(e.message.contains(field) && e.message.contains("\"cn2\""), "{rec} -> {}", e.message);
            assert!(!e.message.contains("password"), "{}", e.message);
        }
        for (rec, field) in [
            (json!({"host": "cn2", "initiator": "not an iqn"}), "field initiator"),
            (json!({"host": "cn2", "initiator": 7}), "field initiator"),
            (json!({"host": "cn2", "export_ip": "198.18.0.300"}), "field export_ip"),
            (json!({"host": "CN2"}), "field host"),
            (json!({"initiator": "iqn.1993-08.org.debian:01:cn2"}), "field host"),
        ] {
            let e = parse_host_record(&rec).unwrap_err();
            assert!(e.message.contains(field), "{rec} -> {}", e.message);
        }
    }

    mod props {
        use super::super::*;
        use proptest::prelude::*;
        use serde_json::json;

        /// Arbitrary JSON, biased towards the fields records have.
        fn json_value() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::from),
                any::<i64>().prop_map(Value::from),
                any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(Value::from),
                "\\PC{0,12}".prop_map(Value::from),
                prop_oneof![
                    Just("origin"),
                    Just("ready"),
                    Just("joining"),
                    Just("cn1"),
                    Just("198.18.0.2"),
                    Just("iqn.1993-08.org.debian:01:cn2")
                ]
                .prop_map(Value::from),
            ];
            leaf.prop_recursive(3, 24, 6, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                    prop::collection::btree_map(
                        prop_oneof![
                            Just("host".to_string()),
                            Just("state".to_string()),
                            Just("depth".to_string()),
                            Just("parents".to_string()),
                            Just("grants".to_string()),
                            Just("built".to_string()),
                            Just("initiator".to_string()),
                            Just("export_ip".to_string()),
                            "[a-z0-9]{1,4}"
                        ],
                        inner,
                        0..6
                    )
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
                ]
            })
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]
            /// No panic on anything a peer could publish; an error is InvalidArgument, and a
            /// record accepted once is accepted again as we serialise it (what Python gets).
            #[test]
            fn record_parsers_never_panic_and_accepted_records_round_trip(v in json_value(), host in "[a-z0-9]{1,6}") {
                let mut v = v;
                if let Value::Object(m) = &mut v {
                    m.entry("host").or_insert_with(|| Value::from(host.clone()));
                }
                for r in [parse_image_record(&v).map(|r| r.to_wire()),
                          parse_host_record(&v).map(|r| serde_json::to_value(r).unwrap())] {
                    match r {
                        Ok(_) => {}
                        Err(e) => prop_assert_eq!(e.kind, crate::Kind::InvalidArgument),
                    }
                }
                if let Ok(r) = parse_image_record(&v) {
                    let again = parse_image_record(&r.to_wire()).unwrap();
                    prop_assert_eq!(again, r);
                }
                if let Ok(r) = parse_host_record(&v) {
                    let again = parse_host_record(&serde_json::to_value(&r).unwrap()).unwrap();
                    prop_assert_eq!(again, r);
                }
                let _ = check_grant(&v, "cn2", "img", Some("198.18.0.2"));
            }

            /// Only the one exact grant shape passes, whatever a forger varies.
            #[test]
            fn check_grant_accepts_only_the_parents_own_target(
                host in prop_oneof![Just("cn2"), Just("cn3")], image in prop_oneof![Just("img"), Just("Img"), Just("img2")],
                ip in prop_oneof![Just("198.18.0.2"), Just("198.18.0.3")], port in 1u16.., lun in 0u32..3,
            ) {
                let g = json!({"target_portal": format!("{ip}:{port}"), "target_iqn": names::template_iqn(host, image),
                               "target_lun": lun});
                let ok = check_grant(&g, "cn2", "img", Some("198.18.0.2")).is_ok();
                prop_assert_eq!(ok, host == "cn2" && image == "img" && ip == "198.18.0.2" && lun == 0);
            }
        }
    }
}
