//! Grants sealed for their recipient. A relay publishes one grant per host (its ACL's CHAP
//! credentials) in a registry record every member reads; sealed, only the host it is for can
//! read the secret. Each host keeps an X25519 key pair in its state dir (made once, 0600) and
//! publishes the public half in its hosts-group record (`grant_key`); a relay seals the grant
//! with it (libsodium's sealed box: an ephemeral key per grant, XSalsa20-Poly1305), the
//! recipient opens it with its secret key. Anyone may seal for a key, so an opened grant is
//! still checked like any other (`records::check_grant`): sealing hides, it does not vouch.
use std::{
    io::{Read, Write},
    os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt},
    path::Path,
};

use crypto_box::{aead::OsRng, PublicKey, SecretKey, KEY_SIZE};
use serde_json::Value;

use crate::error::{Error, Kind, Result};

/// The key pair's file under the state dir: the 32 bytes of the secret key.
pub const KEY_FILE: &str = "grant-box.key";

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(what: &str, s: &str) -> Result<Vec<u8>> {
    if s.len() % 2 != 0 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Error::invalid(format!("{what}: expected hexadecimal digits")));
    }
    Ok((0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("checked hex")).collect())
}

/// A published public key: 64 hex digits.
pub fn public_key(hex_key: &str) -> Result<PublicKey> {
    let b: [u8; KEY_SIZE] =
        unhex("grant key", hex_key)?.try_into().map_err(|_| Error::invalid(format!("grant key: expected {} hex digits", 2 * KEY_SIZE)))?;
    Ok(PublicKey::from_bytes(b))
}

/// This host's secret key from `state_dir`, made on first use: written to a new private file
/// (0600, never through a link) and linked into place, so two processes starting at once agree
/// on one key and neither reads a half-written file.
pub fn node_key(state_dir: &Path) -> Result<SecretKey> {
    let err = |what: String| Error::new(Kind::InvalidArgument, what);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(state_dir)
        .map_err(|e| err(format!("state dir {}: {e}", state_dir.display())))?;
    let path = state_dir.join(KEY_FILE);
    let nofollow = libc::O_NOFOLLOW | libc::O_CLOEXEC;
    if std::fs::symlink_metadata(&path).is_err() {
        let tmp = state_dir.join(format!(".{KEY_FILE}.{}", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        let key = SecretKey::generate(&mut OsRng);
        let written = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(nofollow)
            .open(&tmp)
            .and_then(|mut f| f.write_all(&key.to_bytes()).and_then(|_| f.sync_all()))
            .and_then(|_| match std::fs::hard_link(&tmp, &path) {
                Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => Err(e),
                _ => Ok(()), // made, or another process made it first: read below
            });
        let _ = std::fs::remove_file(&tmp);
        written.map_err(|e| err(format!("make {}: {e}", path.display())))?;
    }
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nofollow)
        .open(&path)
        .map_err(|e| err(format!("{}: {e} (links are not followed)", path.display())))?;
    let meta = f.metadata().map_err(|e| err(format!("{}: {e}", path.display())))?;
    if !meta.is_file() || meta.permissions().mode() & 0o077 != 0 {
        return Err(err(format!("{} must be a regular file only its owner can read (mode 0600)", path.display())));
    }
    let mut b = [0u8; KEY_SIZE];
    let mut rest = Vec::new();
    f.read_exact(&mut b).and_then(|_| f.read_to_end(&mut rest)).map_err(|e| err(format!("{}: {e}", path.display())))?;
    if !rest.is_empty() {
        return Err(err(format!("{}: longer than a key ({KEY_SIZE} bytes)", path.display())));
    }
    Ok(SecretKey::from_bytes(b))
}

/// The public key this host publishes (64 hex digits).
pub fn node_public_key(state_dir: &Path) -> Result<String> {
    Ok(hex(node_key(state_dir)?.public_key().as_bytes()))
}

/// `grant` sealed for the holder of `recipient_key`: `{"sealed": "<hex>"}`.
pub fn seal(grant: &Value, recipient_key: &str) -> Result<Value> {
    let pk = public_key(recipient_key)?;
    let sealed =
        pk.seal(&mut OsRng, grant.to_string().as_bytes()).map_err(|_| Error::new(Kind::InvalidArgument, "sealing a grant failed"))?;
    Ok(serde_json::json!({ "sealed": hex(&sealed) }))
}

/// Whether a grant is sealed (else it is a plain connection dict).
pub fn is_sealed(grant: &Value) -> bool {
    grant.get("sealed").is_some()
}

/// Open a grant sealed for this host. Fails, without saying more, when it was sealed for
/// another key, altered, or is not a connection dict inside.
pub fn open(sealed: &Value, key: &SecretKey) -> Result<Value> {
    let bad = |why: &str| Error::invalid(format!("sealed grant: {why}"));
    let obj = sealed.as_object().filter(|o| o.len() == 1).ok_or_else(|| bad("expected {\"sealed\": hex}"))?;
    let text = obj.get("sealed").and_then(Value::as_str).ok_or_else(|| bad("\"sealed\" must be a string"))?;
    if text.len() > 16384 {
        return Err(bad("longer than any grant"));
    }
    let plain = key
        .unseal(&unhex("sealed grant", text)?)
        .map_err(|_| bad("cannot be opened with this host's key (sealed for another host, or altered)"))?;
    let v: Value = serde_json::from_slice(&plain).map_err(|_| bad("not JSON inside"))?;
    if !v.is_object() {
        return Err(bad("not a connection dict inside"));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn dir(tag: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("vmthunder-seal-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn only_the_recipient_opens_a_grant_and_the_secret_is_not_in_the_record() {
        let (a, b) = (dir("a"), dir("b"));
        let grant = json!({"target_portal": "198.18.0.2:3260", "auth_password": "Pw9SecretOfTheAcl"});
        let sealed = seal(&grant, &node_public_key(&a).unwrap()).unwrap();
        assert!(!sealed.to_string().contains("Pw9SecretOfTheAcl"));
        assert_eq!(open(&sealed, &node_key(&a).unwrap()).unwrap(), grant);
        let e = open(&sealed, &node_key(&b).unwrap()).unwrap_err();
        assert!(e.message.contains("another host"), "{}", e.message);
        // a flipped byte is refused too
        let mut t = sealed["sealed"].as_str().unwrap().to_string();
        let last = if t.ends_with('0') { "1" } else { "0" };
        t.replace_range(t.len() - 1.., last);
        assert!(open(&json!({"sealed": t}), &node_key(&a).unwrap()).is_err());
        for d in [a, b] {
            std::fs::remove_dir_all(d).unwrap();
        }
    }

    #[test]
    fn the_key_is_made_once_private_and_never_read_through_a_link() {
        let d = dir("key");
        let k1 = node_public_key(&d).unwrap();
        assert_eq!(node_public_key(&d).unwrap(), k1, "kept");
        let mode = std::fs::metadata(d.join(KEY_FILE)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::remove_file(d.join(KEY_FILE)).unwrap();
        std::os::unix::fs::symlink(d.join("elsewhere"), d.join(KEY_FILE)).unwrap();
        assert!(node_key(&d).is_err(), "a link is not followed");
        assert!(!d.join("elsewhere").exists());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn malformed_sealed_grants_are_typed_errors() {
        let d = dir("bad");
        let k = node_key(&d).unwrap();
        for v in [
            json!({"sealed": "zz"}),
            json!({"sealed": "00"}),
            json!({"sealed": 3}),
            json!({"sealed": "00", "x": 1}),
            json!([]),
            json!({"sealed": "a".repeat(20000)}),
        ] {
            assert_eq!(open(&v, &k).unwrap_err().kind, Kind::InvalidArgument, "{v}");
        }
        assert!(seal(&json!({}), "00").is_err());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
