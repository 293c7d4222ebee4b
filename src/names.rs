//! Validation of every caller-supplied name, and the deterministic, versioned names of the
//! objects vmthunder creates. Names are how a restarted process re-adopts kernel state, so the
//! scheme must be parseable back: ids may not contain `_`, which separates the fields.
use crate::error::{Error, Result};

/// Bump when the layout of a stack changes; old stacks stay recognisable by their prefix.
pub const LAYOUT_VERSION: u32 = 1;
pub const DM_PREFIX: &str = "vmthunder-1_";
/// IQN naming authority for the targets vmthunder exports.
pub const IQN_AUTHORITY: &str = "iqn.2026-11.org.vmthunder";
const MAX_ID_LEN: usize = 40;

/// An image id or a VM id: `[A-Za-z0-9][A-Za-z0-9.-]*`, at most 40 characters, no `..`.
/// Glance and Nova UUIDs fit. Returned unchanged when valid.
pub fn validate_id<'a>(what: &str, id: &'a str) -> Result<&'a str> {
    let bad = |why: &str| Error::invalid(format!("invalid {what} {id:?}: {why}"));
    if id.is_empty() {
        return Err(bad("empty"));
    }
    if id.len() > MAX_ID_LEN {
        return Err(bad(&format!("longer than {MAX_ID_LEN} characters")));
    }
    if !id.as_bytes()[0].is_ascii_alphanumeric() {
        return Err(bad("must start with a letter or digit"));
    }
    if let Some(c) = id.chars().find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '.')) {
        return Err(bad(&format!("character {c:?} not allowed (letters, digits, '-', '.')")));
    }
    if id.contains("..") {
        return Err(bad("'..' not allowed"));
    }
    Ok(id)
}

/// A host name as vmthunder takes it from Nova's (or any) host name: lower case, every run of
/// other characters one '-', no '..', no leading or trailing '-' or '.'; one longer than
/// `MAX_ID_LEN` keeps its start and ends in 8 hex digits of a hash of the whole (FNV-1a), so
/// two long names differing only at the end stay apart. Always passes [`validate_host`].
pub fn host_name_from(raw: &str) -> String {
    let mut name = String::with_capacity(raw.len());
    for c in raw.chars().flat_map(char::to_lowercase) {
        let c = if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' { c } else { '-' };
        if !(c == '-' && name.ends_with('-') || c == '.' && name.ends_with('.')) {
            name.push(c);
        }
    }
    let mut name = name.trim_matches(|c| c == '-' || c == '.').to_string();
    if name.is_empty() {
        name = "host".into();
    }
    if name.len() > MAX_ID_LEN {
        let h = raw.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3));
        name.truncate(MAX_ID_LEN - 9);
        let keep = name.trim_end_matches(|c| c == '-' || c == '.').len();
        name.truncate(keep);
        name = format!("{name}-{:08x}", h as u32);
    }
    name
}

/// A host name as it appears in our target IQNs: lower-case letters, digits, '-', '.'.
pub fn validate_host(host: &str) -> Result<&str> {
    validate_host_as("host", host)
}

/// [`validate_host`], the message naming the value as `what` (a registry's "member id").
pub fn validate_host_as<'a>(what: &str, host: &'a str) -> Result<&'a str> {
    validate_id(what, host)?;
    if host.chars().any(|c| c.is_ascii_uppercase()) {
        return Err(Error::invalid(format!("invalid {what} {host:?}: must be lower case (it becomes part of an IQN)")));
    }
    Ok(host)
}

/// An iSCSI qualified name (RFC 3720 `iqn.` form; `eui.`/`naa.` also accepted).
pub fn validate_iqn(iqn: &str) -> Result<&str> {
    let bad = |why: &str| Error::invalid(format!("invalid IQN {iqn:?}: {why}"));
    if iqn.len() > 223 {
        return Err(bad("longer than 223 bytes"));
    }
    if let Some(rest) = iqn.strip_prefix("iqn.") {
        // iqn.YYYY-MM.reversed.domain[:unique]
        let date = rest.get(..7).ok_or_else(|| bad("missing iqn.YYYY-MM date"))?;
        let b = date.as_bytes();
        let date_ok = b[..4].iter().all(u8::is_ascii_digit) && b[4] == b'-' && b[5..].iter().all(u8::is_ascii_digit);
        if !date_ok || rest.as_bytes().get(7) != Some(&b'.') {
            return Err(bad("expected iqn.YYYY-MM.naming-authority"));
        }
    } else if !(iqn.starts_with("eui.") || iqn.starts_with("naa.")) {
        return Err(bad("must start with iqn., eui. or naa."));
    }
    if let Some(c) = iqn.chars().find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || ".-:".contains(*c))) {
        return Err(bad(&format!("character {c:?} not allowed (lower-case letters, digits, '.', '-', ':')")));
    }
    Ok(iqn)
}

/// An absolute path with no `..`, whitespace or control characters (it reaches dm tables,
/// configfs and command lines).
pub fn validate_path<'a>(what: &str, path: &'a str) -> Result<&'a str> {
    let bad = |why: &str| Error::invalid(format!("invalid {what} {path:?}: {why}"));
    if !path.starts_with('/') {
        return Err(bad("must be an absolute path"));
    }
    if path.split('/').any(|c| c == "..") {
        return Err(bad("'..' not allowed"));
    }
    if path.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(bad("whitespace and control characters not allowed"));
    }
    Ok(path)
}

/// The role of one device-mapper device in an image's stack on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// dm-multipath over the iSCSI sessions to the parents.
    Paths,
    /// dm-linear slice of the local cache device: cache metadata.
    CacheMeta,
    /// dm-linear slice of the local cache device: cached blocks.
    CacheData,
    /// The cache-on-read device (template volume).
    Cache,
    /// snapshot-origin over the cache; what LIO exports to children.
    Origin,
    /// bcache engine: the backing device, a local 8 KiB head (bcache's superblock) followed by
    /// the paths device, so no metadata is ever written to the parent.
    Bdev,
}

impl Role {
    pub const ALL: [Role; 6] = [Role::Paths, Role::CacheMeta, Role::CacheData, Role::Cache, Role::Origin, Role::Bdev];
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Paths => "paths",
            Role::CacheMeta => "cmeta",
            Role::CacheData => "cdata",
            Role::Cache => "cache",
            Role::Origin => "origin",
            Role::Bdev => "bdev",
        }
    }
}

/// Role of a per-VM device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum VmRole {
    /// dm-linear slice of the local device holding the snapshot's exceptions.
    Cow,
    /// The dm-snapshot the VM boots from.
    Snap,
}

impl VmRole {
    pub fn as_str(self) -> &'static str {
        match self {
            VmRole::Cow => "cow",
            VmRole::Snap => "snap",
        }
    }
}

pub fn template_dm_name(image: &str, role: Role) -> String {
    format!("{DM_PREFIX}{image}_{}", role.as_str())
}

pub fn vm_dm_name(image: &str, vm: &str, role: VmRole) -> String {
    format!("{DM_PREFIX}{image}_vm_{vm}_{}", role.as_str())
}

/// The node-wide bcache cache set's slice of the local device (shared by every image, like the
/// original design's "flashcache group").
pub const CACHE_SET_DM_NAME: &str = "vmthunder-1_node_cset";

/// What a dm name of ours stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    CacheSet,
    Template { image: String, role: Role },
    Vm { image: String, vm: String, role: VmRole },
}

/// Parse one of our dm names back; `None` for names that are not ours (or of another layout).
pub fn parse_dm_name(name: &str) -> Option<Parsed> {
    if name == CACHE_SET_DM_NAME {
        return Some(Parsed::CacheSet);
    }
    let rest = name.strip_prefix(DM_PREFIX)?;
    let fields: Vec<&str> = rest.split('_').collect();
    match fields.as_slice() {
        [image, role] => {
            let role = Role::ALL.into_iter().find(|r| r.as_str() == *role)?;
            validate_id("image", image).ok()?;
            Some(Parsed::Template { image: image.to_string(), role })
        }
        [image, "vm", vm, role] => {
            let role = [VmRole::Cow, VmRole::Snap].into_iter().find(|r| r.as_str() == *role)?;
            validate_id("image", image).ok()?;
            validate_id("vm", vm).ok()?;
            Some(Parsed::Vm { image: image.to_string(), vm: vm.to_string(), role })
        }
        _ => None,
    }
}

/// The IQN this node exports an image under: `iqn.2026-11.org.vmthunder:<host>:<image>`, the
/// image id with each upper-case letter written as `:` and its lower-case form (IQNs are lower
/// case). Injective: `:` appears in neither hosts nor ids, so the first `:` after the
/// authority ends the host and every later one marks a capital (`parse_template_iqn` inverts
/// it): "Img" and "img" get different targets, and a relay's target names exactly one host and
/// one image. Lower-case ids (Glance and Cinder UUIDs) appear unchanged.
pub fn template_iqn(host: &str, image: &str) -> String {
    let mut iqn = format!("{IQN_AUTHORITY}:{host}:");
    for c in image.chars() {
        if c.is_ascii_uppercase() {
            iqn.push(':');
        }
        iqn.push(c.to_ascii_lowercase());
    }
    iqn
}

/// `(host, image)` of an IQN made by `template_iqn`; `None` for any other IQN.
pub fn parse_template_iqn(iqn: &str) -> Option<(String, String)> {
    let rest = iqn.strip_prefix(IQN_AUTHORITY)?.strip_prefix(':')?;
    let (host, encoded) = rest.split_once(':')?;
    let mut image = String::with_capacity(encoded.len());
    let mut chars = encoded.chars();
    while let Some(c) = chars.next() {
        match c {
            ':' => match chars.next() {
                Some(l) if l.is_ascii_lowercase() => image.push(l.to_ascii_uppercase()),
                _ => return None,
            },
            c if c.is_ascii_uppercase() => return None,
            c => image.push(c),
        }
    }
    validate_host(host).ok()?;
    validate_id("image", &image).ok()?;
    Some((host.to_string(), image))
}

/// Whether `iqn` is some node's relay export of exactly `image` (not of an image whose id
/// merely ends like it, nor differs from it in case).
pub fn is_relay_of(iqn: &str, image: &str) -> bool {
    parse_template_iqn(iqn).is_some_and(|(_, i)| i == image)
}

/// IQN of a plain volume exported with `export_volume` (an origin where there is no Cinder).
pub fn volume_iqn(name: &str) -> String {
    format!("{IQN_AUTHORITY}.volume:{}", name.to_ascii_lowercase())
}

/// Name of the LIO iblock backstore (configfs directory) for an image.
pub fn backstore_name(image: &str) -> String {
    format!("{DM_PREFIX}{image}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_from_nova_are_valid_and_long_ones_stay_apart() {
        assert_eq!(host_name_from("cn1"), "cn1");
        assert_eq!(host_name_from("Compute_1.Example.COM"), "compute-1.example.com");
        assert_eq!(host_name_from("-a..b_"), "a.b");
        assert_eq!(host_name_from("__"), "host");
        let a = host_name_from("rack12-compute-node-0042.dc1.example.org.internal");
        let b = host_name_from("rack12-compute-node-0042.dc1.example.org.internal2");
        assert_ne!(a, b);
        for n in [a, b, host_name_from("-.-x_-_.y"), host_name_from(&"Ü".repeat(60))] {
            assert!(n.len() <= MAX_ID_LEN && validate_host(&n).is_ok(), "{n}");
        }
    }

    #[test]
    fn ids_accept_uuids_and_reject_dangerous_names() {
        assert!(validate_id("image", "3f1c2a6e-8f7b-4c1d-9e2f-0a1b2c3d4e5f").is_ok());
        assert!(validate_id("vm", "vm1.a").is_ok());
        for bad in ["", "a/b", "..", "a..b", "a b", "a\nb", "_x", "a_b", "-a", ".a", "é", &"x".repeat(41)] {
            let e = validate_id("image", bad).unwrap_err();
            assert_eq!(e.kind, crate::error::Kind::InvalidArgument, "{bad:?}");
            assert!(e.message.contains(&format!("{bad:?}")), "message names the value: {}", e.message);
        }
    }

    #[test]
    fn iqns() {
        assert!(validate_iqn("iqn.2010-10.org.openstack:volume-00000001").is_ok());
        assert!(validate_iqn("iqn.2026-11.org.vmthunder:cn1.img").is_ok());
        for bad in [
            "",
            "iqn",
            "iqn.20x0-10.org",
            "iqn.2010-10org",
            "iqn.2010-10.org:Upper",
            "iqn.2010-10.a b",
            "iqn.2010-10.a/b",
            "iqn.2010-10.a\n",
            "foo.2010-10.a",
        ] {
            assert!(validate_iqn(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn paths() {
        assert!(validate_path("cache device", "/dev/sdb").is_ok());
        for bad in ["dev/sdb", "/dev/../etc/passwd", "/dev/s b", "/dev/sd\nb"] {
            assert!(validate_path("cache device", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn names_round_trip() {
        for role in Role::ALL {
            let n = template_dm_name("img-1.a", role);
            assert!(n.len() < 128);
            assert_eq!(parse_dm_name(&n), Some(Parsed::Template { image: "img-1.a".into(), role }));
        }
        for role in [VmRole::Cow, VmRole::Snap] {
            let n = vm_dm_name("3f1c2a6e-8f7b-4c1d-9e2f-0a1b2c3d4e5f", "0a1b2c3d-8f7b-4c1d-9e2f-3f1c2a6e4e5f", role);
            assert!(n.len() < 128, "dm names are limited to 127 bytes");
            assert_eq!(
                parse_dm_name(&n),
                Some(Parsed::Vm {
                    image: "3f1c2a6e-8f7b-4c1d-9e2f-0a1b2c3d4e5f".into(),
                    vm: "0a1b2c3d-8f7b-4c1d-9e2f-3f1c2a6e4e5f".into(),
                    role
                })
            );
        }
        assert_eq!(parse_dm_name(CACHE_SET_DM_NAME), Some(Parsed::CacheSet));
        assert_eq!(parse_dm_name("vg0-lv0"), None);
        assert_eq!(parse_dm_name("vmthunder-1_img_bogus"), None);
        assert_eq!(parse_dm_name("vmthunder-0_img_cache"), None);
    }

    #[test]
    fn iqn_of_template_is_valid() {
        let iqn = template_iqn("cn-1", "3F1C2A6E-8f7b");
        assert_eq!(validate_iqn(&iqn), Ok(iqn.as_str()));
        assert_eq!(iqn, "iqn.2026-11.org.vmthunder:cn-1:3:f1:c2:a6:e-8f7b");
        assert_eq!(template_iqn("cn1", "3f1c-8f7b"), "iqn.2026-11.org.vmthunder:cn1:3f1c-8f7b", "lower case unchanged");
    }

    #[test]
    fn image_ids_differing_in_case_or_split_differently_get_different_iqns() {
        // Before: both lower-cased to "...:cn1.img", and host "a.b" + image "c" equalled
        // host "a" + image "b.c".
        assert_ne!(template_iqn("cn1", "Img"), template_iqn("cn1", "img"));
        assert_ne!(template_iqn("cn1", "iMg"), template_iqn("cn1", "imG"));
        assert_ne!(template_iqn("a.b", "c"), template_iqn("a", "b.c"));
    }

    #[test]
    fn template_iqns_parse_back_and_nothing_else_does() {
        for (h, i) in [("cn1", "img"), ("cn-1.example.org", "3F1C2A6E-8f7b.A"), ("a", "Z")] {
            assert_eq!(parse_template_iqn(&template_iqn(h, i)), Some((h.to_string(), i.to_string())));
        }
        for other in [
            "iqn.2026-11.org.vmthunder:cn1.img",
            "iqn.2026-11.org.vmthunder:cn1:img:",
            "iqn.2026-11.org.vmthunder:cn1:i::mg",
            "iqn.2026-11.org.vmthunder:cn1:i:9",
            "iqn.2026-11.org.vmthunder.volume:x",
            "iqn.2010-10.org.openstack:volume-1",
            "iqn.2026-11.org.vmthunder:CN1:img",
            "iqn.2026-11.org.vmthunder:cn1:a..b",
        ] {
            assert_eq!(parse_template_iqn(other), None, "{other}");
        }
    }

    #[test]
    fn a_relay_session_belongs_to_the_exact_image_only() {
        let of_ab = template_iqn("cn2", "a.b");
        assert!(is_relay_of(&of_ab, "a.b"));
        assert!(!is_relay_of(&of_ab, "b"), "recovering b must not catch a.b's session");
        assert!(!is_relay_of(&template_iqn("cn2", "B"), "b"));
        assert!(!is_relay_of("iqn.2010-10.org.openstack:volume-b", "b"));
    }

    mod props {
        use super::super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]
            /// Injective: the IQN gives back exactly the host and image it was made of.
            #[test]
            fn template_iqn_round_trips(host in "[a-z0-9][a-z0-9.-]{0,20}", image in "[A-Za-z0-9][A-Za-z0-9.-]{0,39}") {
                prop_assume!(validate_host(&host).is_ok() && validate_id("image", &image).is_ok());
                let iqn = template_iqn(&host, &image);
                prop_assert!(validate_iqn(&iqn).is_ok(), "{iqn}");
                prop_assert_eq!(parse_template_iqn(&iqn), Some((host, image)));
            }

            #[test]
            fn parse_template_iqn_never_panics(s in "\\PC{0,80}") {
                let _ = parse_template_iqn(&s);
                let _ = parse_dm_name(&s);
            }
        }
    }
}
