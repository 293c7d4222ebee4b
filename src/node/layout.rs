//! The layout of the local device, recorded on the device itself: every slice vmthunder carved
//! (the bcache cache set, each image's cache slices, each VM's COW), the template each image
//! was built from and every VM attached. It is what a rebooted host reassembles from, so a
//! VM's COW is found again instead of being carved anew (state_dir may be lost; the device
//! alone is enough).
//!
//! Crash safety as in LVM2's metadata areas: the first MiB of the device holds two copies
//! (slots), each a header (magic, version, generation, payload length, payload and header
//! CRC32) and a JSON payload. Generation `g` is written to slot `g % 2`, so a write never
//! touches the copy that holds the current layout: a power loss mid-write leaves a slot whose
//! checksum fails and the other slot, the old layout, is read. A slot with an unknown version
//! or two damaged slots are errors naming the device: never a silent reset.
use std::{
    collections::BTreeMap,
    fs::File,
    io::ErrorKind,
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::SnapshotMode;
use crate::{
    error::{Error, Kind, Result},
    names::{self, Parsed},
};

/// Sectors at the start of the device that hold the label; slices start after it.
pub const LABEL_SECTORS: u64 = 2048;
const SLOT_BYTES: u64 = (LABEL_SECTORS * 512) / 2;
const MAGIC: &[u8; 8] = b"VMTHLAYO";
/// Bump when the payload changes incompatibly; an older vmthunder then refuses the device.
pub const VERSION: u32 = 1;
/// magic 8, version 4, generation 8, payload length 4, payload crc 4, header crc 4.
const HEADER_BYTES: usize = 32;
/// Writes are whole 4 KiB blocks: a sector-atomic device never mixes two generations' bytes.
const BLOCK: usize = 4096;

/// Whether a slice's contents can be trusted. A slice is recorded `New` before it is used and
/// becomes `Ready` once its head is zeroed and formatted: a crash in between leaves a `New`
/// slice, which is zeroed again (or freed), never loaded as an earlier tenant's cache or COW.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SliceState {
    New,
    Ready,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Slice {
    pub start: u64,
    pub sectors: u64,
    pub state: SliceState,
}

/// An image this node holds a template of, and the source it is rebuilt from after a reboot
/// (the last of the attach's sources: the origin volume, or the parent of last resort).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TemplateRecord {
    pub source: Value,
}

/// `Attaching` until the VM's disk exists, `Attached` while it is the VM's disk (rebuilt after
/// a reboot, its COW never zeroed), `Detaching` once its removal began (finished by recovery).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    Attaching,
    Attached,
    Detaching,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRecord {
    pub image: String,
    pub mode: SnapshotMode,
    pub state: VmState,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Layout {
    /// By dm name (`names`): the cache set, an image's slices, a VM's COW.
    pub slices: BTreeMap<String, Slice>,
    pub templates: BTreeMap<String, TemplateRecord>,
    pub vms: BTreeMap<String, VmRecord>,
}

/// A layout as read, with the generation it was written under.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Label {
    pub generation: u64,
    pub layout: Layout,
}

impl Layout {
    /// Extents `(start, sectors)` in use, the label included.
    pub fn used(&self) -> Vec<(u64, u64)> {
        let mut v: Vec<(u64, u64)> = self.slices.values().map(|s| (s.start, s.sectors)).collect();
        v.push((0, LABEL_SECTORS));
        v.sort();
        v
    }

    pub fn used_sectors(&self) -> u64 {
        self.slices.values().map(|s| s.sectors).sum()
    }

    /// The VMs of `image` in `state`.
    pub fn vms_of(&self, image: &str, state: VmState) -> Vec<String> {
        self.vms.iter().filter(|(_, r)| r.image == image && r.state == state).map(|(v, _)| v.clone()).collect()
    }

    /// Slices whose owner (the node, a recorded template, a recorded VM) is not recorded.
    pub fn orphan_slices(&self) -> Vec<String> {
        self.slices
            .keys()
            .filter(|name| match names::parse_dm_name(name) {
                Some(Parsed::CacheSet) => false,
                Some(Parsed::Template { image, .. }) => !self.templates.contains_key(&image),
                Some(Parsed::Vm { vm, .. }) => !self.vms.contains_key(&vm),
                None => true,
            })
            .cloned()
            .collect()
    }

    /// Check what was read: every slice inside the device, after the label, none overlapping,
    /// every name and record one of ours.
    fn check(&self, total_sectors: u64) -> std::result::Result<(), String> {
        let mut ext: Vec<(u64, u64, &str)> = self.slices.iter().map(|(n, s)| (s.start, s.sectors, n.as_str())).collect();
        ext.sort();
        let mut end = LABEL_SECTORS;
        for (start, len, name) in ext {
            if names::parse_dm_name(name).is_none() {
                return Err(format!("slice {name:?} is not a vmthunder device name"));
            }
            if len == 0 || start < end || start.checked_add(len).is_none_or(|e| e > total_sectors) {
                return Err(format!(
                    "slice {name} ({start}+{len} sectors) overlaps another or lies outside the device ({total_sectors} sectors)"
                ));
            }
            end = start + len;
        }
        for (image, _) in &self.templates {
            names::validate_id("image id", image).map_err(|e| e.message)?;
        }
        for (vm, r) in &self.vms {
            names::validate_id("VM id", vm).map_err(|e| e.message)?;
            names::validate_id("image id", &r.image).map_err(|e| e.message)?;
        }
        Ok(())
    }
}

/// What one slot holds.
#[derive(Debug, PartialEq)]
enum Slot {
    /// No magic: never written (a fresh device, or the slot a first write has not reached).
    Empty,
    Valid(Label),
    /// Magic present but the header or payload does not check out (a torn write, or damage).
    Damaged(String),
    /// Written by a vmthunder whose layout version this one does not know.
    Unknown(u32),
}

fn crc(b: &[u8]) -> u32 {
    crc32fast::hash(b)
}

/// One slot's bytes for `label`, padded to whole blocks.
fn encode(label: &Label) -> Result<Vec<u8>> {
    let payload = serde_json::to_vec(&label.layout).map_err(|e| Error::new(Kind::CacheDevice, format!("encode the layout: {e}")))?;
    let len = HEADER_BYTES + payload.len();
    if len as u64 > SLOT_BYTES {
        return Err(Error::new(Kind::CacheDevice, format!("the layout ({len} bytes) does not fit its {SLOT_BYTES}-byte area")));
    }
    let mut b = Vec::with_capacity(len.div_ceil(BLOCK) * BLOCK);
    b.extend_from_slice(MAGIC);
    b.extend_from_slice(&VERSION.to_le_bytes());
    b.extend_from_slice(&label.generation.to_le_bytes());
    b.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    b.extend_from_slice(&crc(&payload).to_le_bytes());
    let h = crc(&b);
    b.extend_from_slice(&h.to_le_bytes());
    b.extend_from_slice(&payload);
    b.resize(len.div_ceil(BLOCK) * BLOCK, 0);
    Ok(b)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// Decode the start of a slot; `more` reads `n` payload bytes after the header.
fn decode(head: &[u8], total_sectors: u64, more: impl FnOnce(usize) -> std::io::Result<Vec<u8>>) -> Slot {
    if head.len() < HEADER_BYTES || &head[..8] != MAGIC {
        return Slot::Empty;
    }
    if crc(&head[..28]) != u32_at(head, 28) {
        return Slot::Damaged("header checksum mismatch".into());
    }
    let version = u32_at(head, 8);
    if version != VERSION {
        return Slot::Unknown(version);
    }
    let generation = u64::from_le_bytes(head[12..20].try_into().expect("8 bytes"));
    let len = u32_at(head, 20) as usize;
    if (HEADER_BYTES + len) as u64 > SLOT_BYTES {
        return Slot::Damaged(format!("payload length {len} exceeds the slot"));
    }
    let payload = match more(len) {
        Ok(p) => p,
        Err(e) => return Slot::Damaged(format!("read: {e}")),
    };
    if crc(&payload) != u32_at(head, 24) {
        return Slot::Damaged(format!("payload checksum mismatch (generation {generation})"));
    }
    let layout: Layout = match serde_json::from_slice(&payload) {
        Ok(l) => l,
        Err(e) => return Slot::Damaged(format!("payload of generation {generation}: {e}")),
    };
    if let Err(why) = layout.check(total_sectors) {
        return Slot::Damaged(format!("generation {generation}: {why}"));
    }
    Slot::Valid(Label { generation, layout })
}

/// The current layout from both slots (see the module's comment), or why there is none.
fn choose(slots: [Slot; 2], device: &Path) -> Result<Label> {
    let dev = device.display();
    for s in &slots {
        if let Slot::Unknown(v) = s {
            return Err(Error::new(
                Kind::CacheDevice,
                format!("local device {dev} has a vmthunder layout of version {v}, this vmthunder knows version {VERSION}: refusing to use it (upgrade vmthunder)"),
            ));
        }
    }
    match slots {
        [Slot::Empty, Slot::Empty] => Ok(Label::default()),
        [Slot::Valid(a), Slot::Valid(b)] => Ok(if a.generation >= b.generation { a } else { b }),
        [Slot::Valid(a), _] | [_, Slot::Valid(a)] => Ok(a),
        // The first write ever (generation 1) goes to slot 1: torn, the layout before it was empty.
        [Slot::Empty, Slot::Damaged(why)] => {
            log::warn!("local device {dev}: the first layout write was torn ({why}); the device holds nothing yet");
            Ok(Label::default())
        }
        [a, b] => Err(Error::new(
            Kind::CacheDevice,
            format!(
                "local device {dev}: both copies of the vmthunder layout are damaged (slot 0: {}; slot 1: {}): refusing to reset it; \
                 if it is to be wiped, zero its first MiB",
                describe(&a),
                describe(&b)
            ),
        )),
    }
}

fn describe(s: &Slot) -> String {
    match s {
        Slot::Empty => "empty".into(),
        Slot::Valid(l) => format!("generation {}", l.generation),
        Slot::Damaged(w) => w.clone(),
        Slot::Unknown(v) => format!("version {v}"),
    }
}

/// The label area of one local device.
pub struct Store {
    path: PathBuf,
    total_sectors: u64,
}

impl Store {
    pub fn new(path: &Path, total_sectors: u64) -> Self {
        Store { path: path.to_path_buf(), total_sectors }
    }

    fn open(&self, write: bool) -> Result<File> {
        std::fs::OpenOptions::new()
            .read(true)
            .write(write)
            .open(&self.path)
            .map_err(|e| Error::new(Kind::CacheDevice, format!("open local device {}: {e}", self.path.display())))
    }

    pub fn read(&self) -> Result<Label> {
        let f = self.open(false)?;
        let read_slot = |i: u64| -> Result<Slot> {
            let base = i * SLOT_BYTES;
            let mut head = vec![0u8; HEADER_BYTES];
            match f.read_exact_at(&mut head, base) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::UnexpectedEof => return Ok(Slot::Empty),
                Err(e) => return Err(Error::new(Kind::CacheDevice, format!("read the layout of {}: {e}", self.path.display()))),
            }
            Ok(decode(&head, self.total_sectors, |n| {
                let mut p = vec![0u8; n];
                f.read_exact_at(&mut p, base + HEADER_BYTES as u64).map(|_| p)
            }))
        };
        choose([read_slot(0)?, read_slot(1)?], &self.path)
    }

    /// Write `layout` as the generation after `label`'s, durably (flushed to the device), and
    /// make it `label`.
    pub fn write(&self, label: &mut Label, layout: Layout) -> Result<()> {
        layout
            .check(self.total_sectors)
            .map_err(|why| Error::new(Kind::CacheDevice, format!("refusing to record a bad layout on {}: {why}", self.path.display())))?;
        let next = Label { generation: label.generation + 1, layout };
        let bytes = encode(&next)?;
        let f = self.open(true)?;
        f.write_all_at(&bytes, (next.generation % 2) * SLOT_BYTES)
            .and_then(|_| f.sync_all())
            .map_err(|e| Error::new(Kind::CacheDevice, format!("write the layout to {}: {e}", self.path.display())))?;
        *label = next;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const TOTAL: u64 = 1 << 21;

    fn sample() -> Layout {
        let mut l = Layout::default();
        l.slices.insert(names::CACHE_SET_DM_NAME.into(), Slice { start: 2048, sectors: 4096, state: SliceState::Ready });
        l.slices.insert("vmthunder-1_img_vm_vm1_cow".into(), Slice { start: 8192, sectors: 2048, state: SliceState::New });
        l.templates.insert("img".into(), TemplateRecord { source: json!({"driver_volume_type": "iscsi"}) });
        l.vms.insert("vm1".into(), VmRecord { image: "img".into(), mode: SnapshotMode::Dm, state: VmState::Attaching });
        l
    }

    /// A device image in a temporary file.
    struct Dev(PathBuf);
    impl Dev {
        fn new(tag: &str) -> Self {
            let p = std::env::temp_dir().join(format!("vmt-layout-{tag}-{}", std::process::id()));
            let f = File::create(&p).unwrap();
            f.set_len(LABEL_SECTORS * 512 + 4096).unwrap();
            Dev(p)
        }
        fn store(&self) -> Store {
            Store::new(&self.0, TOTAL)
        }
        fn poke(&self, at: u64, bytes: &[u8]) {
            std::fs::OpenOptions::new().write(true).open(&self.0).unwrap().write_all_at(bytes, at).unwrap();
        }
    }
    impl Drop for Dev {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    #[test]
    fn a_fresh_device_reads_empty_and_round_trips() {
        let d = Dev::new("fresh");
        let s = d.store();
        let mut label = s.read().unwrap();
        assert_eq!(label, Label::default());
        s.write(&mut label, sample()).unwrap();
        assert_eq!(label.generation, 1);
        assert_eq!(s.read().unwrap(), label);
    }

    #[test]
    fn generations_alternate_slots_and_the_newest_wins() {
        let d = Dev::new("gens");
        let s = d.store();
        let mut label = s.read().unwrap();
        let mut l = sample();
        for g in 1..=5u64 {
            l.vms.get_mut("vm1").unwrap().state = if g % 2 == 0 { VmState::Attached } else { VmState::Attaching };
            s.write(&mut label, l.clone()).unwrap();
            let read = s.read().unwrap();
            assert_eq!((read.generation, &read.layout), (g, &l));
        }
    }

    #[test]
    fn a_torn_write_leaves_the_old_layout() {
        let d = Dev::new("torn");
        let s = d.store();
        let mut label = s.read().unwrap();
        s.write(&mut label, sample()).unwrap(); // generation 1, slot 1
        let old = label.clone();
        let mut newer = sample();
        newer.vms.get_mut("vm1").unwrap().state = VmState::Attached;
        // Generation 2 goes to slot 0: its header reached the disk, its payload only in part.
        let bytes = encode(&Label { generation: 2, layout: newer }).unwrap();
        d.poke(0, &bytes[..HEADER_BYTES + 10]);
        assert_eq!(s.read().unwrap(), old);
        // Only the header's first bytes: still the old one.
        d.poke(0, &[0u8; 4096]);
        d.poke(0, &bytes[..12]);
        assert_eq!(s.read().unwrap(), old);
    }

    #[test]
    fn a_torn_first_write_is_an_empty_device() {
        let d = Dev::new("first");
        let bytes = encode(&Label { generation: 1, layout: sample() }).unwrap();
        d.poke(SLOT_BYTES, &bytes[..HEADER_BYTES + 5]);
        assert_eq!(d.store().read().unwrap(), Label::default());
    }

    #[test]
    fn bad_checksums_in_both_copies_are_an_error_naming_the_device() {
        let d = Dev::new("bad");
        let s = d.store();
        let mut label = s.read().unwrap();
        s.write(&mut label, sample()).unwrap();
        s.write(&mut label, sample()).unwrap();
        // Flip one payload byte in each slot.
        for slot in 0..2 {
            let mut b = [0u8; 1];
            File::open(&d.0).unwrap().read_exact_at(&mut b, slot * SLOT_BYTES + HEADER_BYTES as u64 + 3).unwrap();
            d.poke(slot * SLOT_BYTES + HEADER_BYTES as u64 + 3, &[b[0] ^ 0x20]);
        }
        let e = s.read().unwrap_err();
        assert_eq!(e.kind, Kind::CacheDevice);
        assert!(e.message.contains(&d.0.display().to_string()) && e.message.contains("checksum"), "{}", e.message);
        // Slot 0 damaged, slot 1 empty: not a torn first write (that goes to slot 1).
        let d2 = Dev::new("bad0");
        let bytes = encode(&Label { generation: 2, layout: sample() }).unwrap();
        d2.poke(0, &bytes[..HEADER_BYTES + 5]);
        assert!(d2.store().read().is_err());
    }

    #[test]
    fn an_unknown_version_is_refused_not_reset() {
        let d = Dev::new("version");
        let mut bytes = encode(&Label { generation: 7, layout: sample() }).unwrap();
        bytes[8..12].copy_from_slice(&2u32.to_le_bytes());
        let h = crc(&bytes[..28]);
        bytes[28..32].copy_from_slice(&h.to_le_bytes());
        d.poke(SLOT_BYTES, &bytes);
        let e = d.store().read().unwrap_err();
        assert!(e.message.contains("version 2") && e.message.contains(&d.0.display().to_string()), "{}", e.message);
        // Also beside a valid older copy: the newer vmthunder's layout is not silently dropped.
        let s = d.store();
        let mut label = Label { generation: 1, layout: Layout::default() };
        s.write(&mut label, sample()).unwrap(); // generation 2 -> slot 0
        assert!(s.read().is_err());
    }

    #[test]
    fn overlapping_or_out_of_range_slices_are_damage() {
        let mut l = sample();
        l.slices.insert("vmthunder-1_img_bdev".into(), Slice { start: 3000, sectors: 10, state: SliceState::Ready });
        assert!(l.check(TOTAL).unwrap_err().contains("overlaps"));
        let mut l = sample();
        l.slices.insert("vmthunder-1_img_bdev".into(), Slice { start: TOTAL - 1, sectors: 10, state: SliceState::Ready });
        assert!(l.check(TOTAL).is_err());
        let mut l = sample();
        l.slices.insert("vmthunder-1_img_bdev".into(), Slice { start: 0, sectors: 10, state: SliceState::Ready });
        assert!(l.check(TOTAL).is_err(), "the label area is never a slice");
        let d = Dev::new("refuse");
        let s = d.store();
        let mut label = s.read().unwrap();
        let mut bad = sample();
        bad.slices.insert("not-ours".into(), Slice { start: 100_000, sectors: 10, state: SliceState::Ready });
        assert!(s.write(&mut label, bad).is_err());
        assert_eq!(label.generation, 0, "nothing written");
    }

    #[test]
    fn orphans_are_slices_without_their_owner() {
        let mut l = sample();
        assert!(l.orphan_slices().is_empty());
        l.vms.clear();
        assert_eq!(l.orphan_slices(), vec!["vmthunder-1_img_vm_vm1_cow".to_string()]);
    }

    #[test]
    fn decoding_arbitrary_bytes_never_panics() {
        use proptest::prelude::*;
        proptest!(|(tail in proptest::collection::vec(any::<u8>(), 0..200), gen in any::<u64>(), len in any::<u32>())| {
            let mut head = MAGIC.to_vec();
            head.extend_from_slice(&VERSION.to_le_bytes());
            head.extend_from_slice(&gen.to_le_bytes());
            head.extend_from_slice(&len.to_le_bytes());
            head.extend_from_slice(&[0u8; 4]);
            let h = crc(&head);
            head.extend_from_slice(&h.to_le_bytes());
            let t = tail.clone();
            let _ = decode(&head, TOTAL, |n| Ok(t.into_iter().cycle().take(n.min(4096)).collect()));
        });
    }
}
