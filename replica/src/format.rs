//! The on-disk format of a replica store, as pure encode/decode functions.
//!
//! A store is a directory:
//!
//! | file                  | contents                                                  |
//! |-----------------------|-----------------------------------------------------------|
//! | `store.meta`          | the manifest (below); rewritten atomically                |
//! | `store.lock`          | empty; `flock`ed while a process has the store open       |
//! | `store.intent`        | write-intent bitmap, one bit per region                   |
//! | `store.stamps`        | region stamps: u64 per region (newest generation written) |
//! | `layer-NNNNNN.data`   | sparse data of layer N: block `b` at byte `b * 4096`      |
//! | `layer-NNNNNN.records`| per-block records of layer N: record `b` at byte `b * 16` |
//!
//! All integers are little-endian.
//!
//! **Manifest** (`store.meta`, format version 3; versions 1 and 2 are read
//! and upgraded on the next rewrite):
//!
//! ```text
//! off  len  field
//!   0    8  magic "JIVAREPL"
//!   8    4  format version (2)
//!  12    4  total length in bytes, including the trailing crc
//!  16    4  block size (4096)
//!  20    4  record size (16)
//!  24    4  intent region size in bytes (1 MiB)
//!  28    4  flags: bit 0 = CLEAN (the last shutdown was clean)
//!  32    8  volume size in bytes
//!  40    8  controller epoch
//!  48    8  next unused layer id
//!  56    2  volume name length (0 = not bound to a volume)
//!  58    2  layer count (>= 1)
//!  60    n  volume name, UTF-8
//!   .  8*k  layer ids, oldest first, the writable head last
//!             (version 2 only, from here:)
//!   .    8  store id (random, chosen at creation)
//!   .    8  generation of the newest generation record received
//!   .    8  epoch of the controller that wrote it
//!   .    4  record flags: bit 0 = CLEAN (that controller stopped cleanly)
//!   .    2  member count m
//!   .    2  rebuild piece count p (0 = no rebuild in progress)
//!   .    8  rebuild progress (regions below it were copied in this pass)
//!   .  8*m  member store ids
//!   . 16*p  rebuild pieces: end region u64, threshold generation u64
//!             (version 3 only, from here:)
//!   .    8  layer id of the snapshot being merged into its child (0 = none)
//!   .    …  per layer except the head, oldest first (the snapshots):
//!             created u64 (unix ms) | flags u8 (bit 0 = SYSTEM)
//!             | name length u8 | name (UTF-8)
//!   .    4  crc32c of every preceding byte
//! ```
//!
//! **Snapshots.** Every layer below the head is a snapshot: its contents
//! are the chain up to and including it. Creating one freezes the head and
//! appends a new empty head. Deleting one merges it into its child: the
//! manifest first records the merge durably, the snapshot's blocks that
//! the child lacks are copied into the child (data made durable before its
//! record, so a record never points at data that is not there), and only
//! then does a manifest rewrite drop the snapshot. Every view (each other
//! snapshot and the head) reads the same at every point; a restart finds
//! the marker and finishes the merge. Layer files not named in the
//! manifest are leftovers of an interrupted create or revert and are
//! deleted at open.
//!
//! The generation record and the rebuild mark are the controller's (see
//! `jiva_core::volume`): which replicas were in step at which generation,
//! and how far a rebuild into this replica got.
//!
//! The manifest is rewritten by writing `store.meta.tmp`, fsyncing it,
//! renaming it over `store.meta` and fsyncing the directory. A manifest
//! with a bad magic or crc is refused, as is one from another version.
//!
//! **Layers.** Reads walk the chain from the head down: a block that is
//! not allocated in a layer is looked up in its parent, and reads as zeros
//! if no layer has it. Only the head is written; parents (snapshots) are
//! read-only.
//!
//! **Block record** (16 bytes per block per layer):
//!
//! ```text
//! off  len  field
//!   0    4  crc32c of the 4 KiB block as stored in the data file
//!   4    2  flags: 1 = ALLOCATED, 2 = ZERO (reads as zeros; data not read)
//!   6   10  reserved, zero (future: encryption tags, compressed lengths)
//! ```
//!
//! An all-zero record means "not allocated in this layer", so a fresh
//! (sparse) or punched records file is all holes. Any other record without
//! ALLOCATED, or with unknown flags or non-zero reserved bytes, is corrupt.
//!
//! **Write-intent bitmap** (`store.intent`): bit `r` (byte `r / 8`, bit
//! `r % 8`) marks region `r`, blocks `r * R .. (r + 1) * R` where `R` is
//! the region size in blocks. The file is `ceil(regions / 64) * 8` bytes.
//! A set bit means writes may have been in flight there, so on open after
//! a crash the records of that region are re-derived from the data for
//! blocks whose checksum does not match (see the `intent` module).
//!
//! **Region stamps** (`store.stamps`): u64 `r` (at byte `8 * r`) is the
//! newest volume generation of any change to region `r` (same regions as
//! the intent bitmap), raised durably before the change is made. A missing
//! file (version 1 stores) reads as all zeros.

use jiva_core::wire::{MAX_MEMBERS, MAX_PIECES, Membership, RebuildMark};

/// A random, non-zero store id.
pub fn new_store_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    // RandomState is seeded from the OS; mix in time and pid for good measure.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
    h.finish().max(1)
}

/// Manifest magic.
pub const MAGIC: [u8; 8] = *b"JIVAREPL";
/// The manifest format this build writes.
pub const FORMAT_VERSION: u32 = 3;
/// Older manifest formats this build still reads.
pub const FORMAT_VERSION_1: u32 = 1;
pub const FORMAT_VERSION_2: u32 = 2;
pub use jiva_core::record::RECORD_SIZE;
/// Default write-intent region: 1 MiB.
pub const DEFAULT_REGION_SIZE: u32 = 1 << 20;
/// Manifest flag: the store was closed cleanly.
pub const FLAG_CLEAN: u32 = 1;
/// Longest volume name accepted.
pub const MAX_VOLUME_NAME: usize = 1024;
/// Largest manifest accepted when reading (room for thousands of snapshots).
pub const MAX_MANIFEST_LEN: usize = 4 << 20;
/// Longest snapshot name.
pub const MAX_SNAPSHOT_NAME: usize = 64;
/// Snapshot flag: made by the system, not a user.
pub const SNAP_SYSTEM: u8 = 1;

pub const MANIFEST_FILE: &str = "store.meta";
pub const MANIFEST_TMP_FILE: &str = "store.meta.tmp";
pub const LOCK_FILE: &str = "store.lock";
pub const INTENT_FILE: &str = "store.intent";
pub const STAMPS_FILE: &str = "store.stamps";

const FIXED_LEN: usize = 60;
/// Fixed part of the version 2 extension.
const EXT_LEN: usize = 40;
const CRC_LEN: usize = 4;

/// Name of layer `id`'s data file.
pub fn data_file_name(id: u64) -> String {
    format!("layer-{id:06}.data")
}

/// Name of layer `id`'s block-record file.
pub fn records_file_name(id: u64) -> String {
    format!("layer-{id:06}.records")
}

/// Byte length of the intent bitmap for `regions` regions.
pub fn intent_len(regions: u64) -> u64 {
    regions.div_ceil(64) * 8
}

/// Why a manifest or record was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("not a jiva store manifest (bad magic)")]
    BadMagic,
    #[error("store format version {0} is not supported (this build reads versions 1 to {FORMAT_VERSION})")]
    UnsupportedVersion(u32),
    #[error("manifest checksum mismatch")]
    BadChecksum,
    #[error("malformed: {0}")]
    Malformed(&'static str),
}

/// The store manifest (see the module documentation).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    pub block_size: u32,
    pub record_size: u32,
    pub region_size: u32,
    pub clean: bool,
    pub size: u64,
    pub epoch: u64,
    pub next_layer_id: u64,
    pub volume: Option<String>,
    /// Layer ids, oldest first, head last; never empty.
    pub layers: Vec<u64>,
    /// Random id of this store (0 only in a version 1 manifest not yet upgraded).
    pub store_id: u64,
    /// The newest generation record received.
    pub membership: Membership,
    /// A rebuild into this store that has not finished.
    pub rebuild: Option<RebuildMark>,
    /// One per layer except the head, in the same order as `layers`.
    pub snapshots: Vec<SnapshotMeta>,
    /// Layer id of a snapshot whose merge into its child has not finished.
    pub merging: Option<u64>,
}

/// What the manifest keeps about a snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotMeta {
    pub name: String,
    /// Creation time, milliseconds since the Unix epoch.
    pub created_ms: u64,
    /// Made by the system (not by a user).
    pub system: bool,
}

/// Checks a snapshot name: 1 to [`MAX_SNAPSHOT_NAME`] bytes of ASCII
/// letters, digits, `.`, `_`, `-`, not starting with `.` or `-`.
pub fn check_snapshot_name(name: &str) -> Result<(), String> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if name.is_empty() || name.len() > MAX_SNAPSHOT_NAME {
        return Err(format!("snapshot name must be 1 to {MAX_SNAPSHOT_NAME} characters"));
    }
    if !name.chars().all(ok_char) || name.starts_with(['.', '-']) {
        return Err(format!(
            "snapshot name {name:?} may hold only letters, digits, '.', '_' and '-', and not start with '.' or '-'"
        ));
    }
    Ok(())
}

impl Manifest {
    /// A fresh, unbound store of `size` bytes with one layer (id 1).
    pub fn new(size: u64) -> Manifest {
        Manifest {
            block_size: jiva_core::BLOCK_SIZE,
            record_size: RECORD_SIZE,
            region_size: DEFAULT_REGION_SIZE,
            clean: true,
            size,
            epoch: 0,
            next_layer_id: 2,
            volume: None,
            layers: vec![1],
            store_id: new_store_id(),
            membership: Membership::default(),
            rebuild: None,
            snapshots: Vec::new(),
            merging: None,
        }
    }

    /// The writable layer.
    pub fn head(&self) -> u64 {
        *self.layers.last().expect("manifest has at least one layer")
    }
}

/// Encodes `m`. Panics if the name or the layer list exceed what the
/// format can hold (callers validate names first).
pub fn encode_manifest(m: &Manifest) -> Vec<u8> {
    let name = m.volume.as_deref().unwrap_or("").as_bytes();
    assert!(name.len() <= MAX_VOLUME_NAME, "volume name too long");
    assert!(!m.layers.is_empty() && m.layers.len() <= usize::from(u16::MAX), "bad layer count");
    let members = &m.membership.members[..m.membership.members.len().min(MAX_MEMBERS)];
    let pieces: &[(u64, u64)] =
        m.rebuild.as_ref().map_or(&[], |r| &r.pieces[..r.pieces.len().min(MAX_PIECES)]);
    assert_eq!(m.snapshots.len(), m.layers.len() - 1, "one snapshot entry per non-head layer");
    let snaps_len: usize = 8 + m.snapshots.iter().map(|s| 10 + s.name.len().min(255)).sum::<usize>();
    let total = FIXED_LEN
        + name.len()
        + 8 * m.layers.len()
        + EXT_LEN
        + 8 * members.len()
        + 16 * pieces.len()
        + snaps_len
        + CRC_LEN;
    let mut out = Vec::with_capacity(total);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(total as u32).to_le_bytes());
    out.extend_from_slice(&m.block_size.to_le_bytes());
    out.extend_from_slice(&m.record_size.to_le_bytes());
    out.extend_from_slice(&m.region_size.to_le_bytes());
    out.extend_from_slice(&(if m.clean { FLAG_CLEAN } else { 0 }).to_le_bytes());
    out.extend_from_slice(&m.size.to_le_bytes());
    out.extend_from_slice(&m.epoch.to_le_bytes());
    out.extend_from_slice(&m.next_layer_id.to_le_bytes());
    out.extend_from_slice(&(name.len() as u16).to_le_bytes());
    out.extend_from_slice(&(m.layers.len() as u16).to_le_bytes());
    out.extend_from_slice(name);
    for id in &m.layers {
        out.extend_from_slice(&id.to_le_bytes());
    }
    out.extend_from_slice(&m.store_id.to_le_bytes());
    out.extend_from_slice(&m.membership.generation.to_le_bytes());
    out.extend_from_slice(&m.membership.epoch.to_le_bytes());
    out.extend_from_slice(&(if m.membership.clean { FLAG_CLEAN } else { 0 }).to_le_bytes());
    out.extend_from_slice(&(members.len() as u16).to_le_bytes());
    out.extend_from_slice(&(pieces.len() as u16).to_le_bytes());
    out.extend_from_slice(&m.rebuild.as_ref().map_or(0, |r| r.progress).to_le_bytes());
    for id in members {
        out.extend_from_slice(&id.to_le_bytes());
    }
    for (end, t) in pieces {
        out.extend_from_slice(&end.to_le_bytes());
        out.extend_from_slice(&t.to_le_bytes());
    }
    out.extend_from_slice(&m.merging.unwrap_or(0).to_le_bytes());
    for snap in &m.snapshots {
        let name = &snap.name.as_bytes()[..snap.name.len().min(255)];
        out.extend_from_slice(&snap.created_ms.to_le_bytes());
        out.push(if snap.system { SNAP_SYSTEM } else { 0 });
        out.push(name.len() as u8);
        out.extend_from_slice(name);
    }
    let crc = jiva_core::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    debug_assert_eq!(out.len(), total);
    out
}

/// Decodes a manifest, checking magic, version, length and crc, and the
/// structural invariants (non-empty, unique, non-zero layer ids below
/// `next_layer_id`; a UTF-8 name).
pub fn decode_manifest(buf: &[u8]) -> Result<Manifest, FormatError> {
    if buf.len() < 12 || buf[..8] != MAGIC {
        return Err(FormatError::BadMagic);
    }
    let version = u32_at(buf, 8);
    if !(FORMAT_VERSION_1..=FORMAT_VERSION).contains(&version) {
        return Err(FormatError::UnsupportedVersion(version));
    }
    if buf.len() < FIXED_LEN + CRC_LEN {
        return Err(FormatError::Malformed("manifest too short"));
    }
    if u32_at(buf, 12) as usize != buf.len() {
        return Err(FormatError::Malformed("manifest length field does not match"));
    }
    let (body, crc) = buf.split_at(buf.len() - CRC_LEN);
    if jiva_core::crc32c(body) != u32_at(crc, 0) {
        return Err(FormatError::BadChecksum);
    }
    let name_len = usize::from(u16_at(buf, 56));
    let layer_count = usize::from(u16_at(buf, 58));
    let ext_at = FIXED_LEN + name_len + 8 * layer_count;
    let (ext_len, member_count, piece_count) = if version == FORMAT_VERSION_1 {
        (0, 0, 0)
    } else {
        if buf.len() < ext_at + EXT_LEN + CRC_LEN {
            return Err(FormatError::Malformed("manifest field lengths do not add up"));
        }
        let members = usize::from(u16_at(buf, ext_at + 28));
        let pieces = usize::from(u16_at(buf, ext_at + 30));
        (EXT_LEN + 8 * members + 16 * pieces, members, pieces)
    };
    let snaps_at = ext_at + ext_len;
    let exact = version != FORMAT_VERSION;
    if (exact && snaps_at + CRC_LEN != buf.len()) || snaps_at + CRC_LEN > buf.len() {
        return Err(FormatError::Malformed("manifest field lengths do not add up"));
    }
    if member_count > MAX_MEMBERS || piece_count > MAX_PIECES {
        return Err(FormatError::Malformed("too many members or rebuild pieces"));
    }
    if name_len > MAX_VOLUME_NAME {
        return Err(FormatError::Malformed("volume name too long"));
    }
    if layer_count == 0 {
        return Err(FormatError::Malformed("no layers"));
    }
    let flags = u32_at(buf, 28);
    if flags & !FLAG_CLEAN != 0 {
        return Err(FormatError::Malformed("unknown manifest flags"));
    }
    let volume = match name_len {
        0 => None,
        n => Some(
            std::str::from_utf8(&buf[FIXED_LEN..FIXED_LEN + n])
                .map_err(|_| FormatError::Malformed("volume name is not UTF-8"))?
                .to_owned(),
        ),
    };
    let ids_at = FIXED_LEN + name_len;
    let layers: Vec<u64> = (0..layer_count).map(|i| u64_at(buf, ids_at + 8 * i)).collect();
    let next_layer_id = u64_at(buf, 48);
    let mut sorted = layers.clone();
    sorted.sort_unstable();
    sorted.dedup();
    if sorted.len() != layers.len() || sorted[0] == 0 || *sorted.last().unwrap_or(&0) >= next_layer_id {
        return Err(FormatError::Malformed("bad layer ids"));
    }
    let (store_id, membership, rebuild) = if version == FORMAT_VERSION_1 {
        (0, Membership::default(), None)
    } else {
        let e = ext_at;
        let rec_flags = u32_at(buf, e + 24);
        if rec_flags & !FLAG_CLEAN != 0 {
            return Err(FormatError::Malformed("unknown generation record flags"));
        }
        let ids_at = e + EXT_LEN;
        let members = (0..member_count).map(|i| u64_at(buf, ids_at + 8 * i)).collect();
        let pieces_at = ids_at + 8 * member_count;
        let pieces: Vec<(u64, u64)> = (0..piece_count)
            .map(|i| (u64_at(buf, pieces_at + 16 * i), u64_at(buf, pieces_at + 16 * i + 8)))
            .collect();
        let rebuild = if pieces.is_empty() {
            None
        } else {
            let mark = RebuildMark { progress: u64_at(buf, e + 32), pieces };
            let valid = mark.pieces.last().is_some_and(|&(end, _)| end == u64::MAX)
                && mark.pieces.windows(2).all(|w| w[0].0 < w[1].0);
            if !valid {
                return Err(FormatError::Malformed("rebuild pieces"));
            }
            Some(mark)
        };
        let membership = Membership {
            generation: u64_at(buf, e + 8),
            epoch: u64_at(buf, e + 16),
            clean: rec_flags & FLAG_CLEAN != 0,
            members,
        };
        (u64_at(buf, e), membership, rebuild)
    };
    let (snapshots, merging) = if version == FORMAT_VERSION {
        decode_snapshots(&buf[snaps_at..buf.len() - CRC_LEN], &layers)?
    } else {
        // Older stores had no snapshots; name any extra layer after its id.
        let snaps = layers[..layers.len() - 1]
            .iter()
            .map(|id| SnapshotMeta { name: format!("layer-{id}"), created_ms: 0, system: false })
            .collect();
        (snaps, None)
    };
    Ok(Manifest {
        store_id,
        membership,
        rebuild,
        snapshots,
        merging,
        block_size: u32_at(buf, 16),
        record_size: u32_at(buf, 20),
        region_size: u32_at(buf, 24),
        clean: flags & FLAG_CLEAN != 0,
        size: u64_at(buf, 32),
        epoch: u64_at(buf, 40),
        next_layer_id,
        volume,
        layers,
    })
}

/// The version 3 snapshot section (without the crc).
fn decode_snapshots(mut buf: &[u8], layers: &[u64]) -> Result<(Vec<SnapshotMeta>, Option<u64>), FormatError> {
    let short = FormatError::Malformed("snapshot section too short");
    let (merging, rest) = buf.split_first_chunk::<8>().ok_or(short.clone())?;
    buf = rest;
    let merging = match u64::from_le_bytes(*merging) {
        0 => None,
        id if layers[..layers.len() - 1].contains(&id) => Some(id),
        _ => return Err(FormatError::Malformed("merge marker names no snapshot")),
    };
    let mut snaps = Vec::with_capacity(layers.len() - 1);
    for _ in 1..layers.len() {
        let (head, rest) = buf.split_first_chunk::<10>().ok_or(short.clone())?;
        let created_ms = u64::from_le_bytes(head[..8].try_into().expect("8 bytes"));
        let (flags, len) = (head[8], usize::from(head[9]));
        if flags & !SNAP_SYSTEM != 0 {
            return Err(FormatError::Malformed("unknown snapshot flags"));
        }
        let name = rest.get(..len).ok_or(short.clone())?;
        let name =
            std::str::from_utf8(name).map_err(|_| FormatError::Malformed("snapshot name is not UTF-8"))?;
        if snaps.iter().any(|s: &SnapshotMeta| s.name == name) {
            return Err(FormatError::Malformed("duplicate snapshot name"));
        }
        snaps.push(SnapshotMeta { name: name.to_owned(), created_ms, system: flags & SNAP_SYSTEM != 0 });
        buf = &rest[len..];
    }
    if !buf.is_empty() {
        return Err(FormatError::Malformed("manifest field lengths do not add up"));
    }
    Ok((snaps, merging))
}

pub use jiva_core::record::{BlockRecord, REC_ALLOCATED, REC_ZERO, encode_record, zero_block_crc};

/// Decodes the record in the first [`RECORD_SIZE`] bytes of `buf`.
pub fn decode_record(buf: &[u8]) -> Result<BlockRecord, FormatError> {
    jiva_core::record::decode_record(buf).map_err(FormatError::Malformed)
}

fn u16_at(buf: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([buf[at], buf[at + 1]])
}

fn u32_at(buf: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(buf[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(buf: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(buf[at..at + 8].try_into().expect("8 bytes"))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn manifest() -> impl Strategy<Value = Manifest> {
        (
            any::<u32>(),
            any::<u32>(),
            any::<u32>(),
            any::<bool>(),
            any::<u64>(),
            any::<u64>(),
            proptest::option::of("[a-zA-Z0-9._-]{1,40}"),
            proptest::collection::btree_set(1u64..1_000_000, 1..8),
            (
                any::<u64>(),
                any::<u64>(),
                any::<u64>(),
                any::<bool>(),
                proptest::collection::vec(any::<u64>(), 0..10),
            ),
            proptest::option::of((
                any::<u64>(),
                proptest::collection::btree_map(0u64..u64::MAX, any::<u64>(), 0..5),
                any::<u64>(),
            )),
        )
            .prop_flat_map(|(bs, rs, region, clean, size, epoch, volume, ids, rec, reb)| {
                let (store_id, generation, gen_epoch, rec_clean, members) = rec;
                let membership = Membership { generation, epoch: gen_epoch, clean: rec_clean, members };
                let rebuild = reb.map(|(progress, ends, last)| {
                    let mut pieces: Vec<(u64, u64)> = ends.into_iter().collect();
                    pieces.push((u64::MAX, last));
                    RebuildMark { progress, pieces }
                });
                let ids: Vec<u64> = ids.into_iter().collect();
                let max = *ids.last().unwrap();
                (Just(ids).prop_shuffle(), (max + 1)..=u64::MAX).prop_map(move |(layers, next)| Manifest {
                    block_size: bs,
                    record_size: rs,
                    region_size: region,
                    clean,
                    size,
                    epoch,
                    next_layer_id: next,
                    volume: volume.clone(),
                    store_id,
                    membership: membership.clone(),
                    rebuild: rebuild.clone(),
                    snapshots: (1..layers.len())
                        .map(|i| SnapshotMeta {
                            name: format!("snap-{i}"),
                            created_ms: epoch ^ i as u64,
                            system: i % 2 == 0,
                        })
                        .collect(),
                    merging: (layers.len() > 1 && clean).then(|| layers[0]),
                    layers,
                })
            })
    }

    proptest! {
        #[test]
        fn manifest_round_trips(m in manifest()) {
            let bytes = encode_manifest(&m);
            prop_assert_eq!(decode_manifest(&bytes).unwrap(), m);
        }

        #[test]
        fn manifest_decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode_manifest(&bytes);
        }

        #[test]
        fn manifest_corruption_is_detected(m in manifest(), at in any::<prop::sample::Index>(), bit in 0u8..8) {
            let mut bytes = encode_manifest(&m);
            let i = at.index(bytes.len());
            bytes[i] ^= 1 << bit;
            prop_assert!(decode_manifest(&bytes).is_err());
        }

        #[test]
        fn truncated_manifest_is_refused(m in manifest(), cut in any::<prop::sample::Index>()) {
            let bytes = encode_manifest(&m);
            prop_assert!(decode_manifest(&bytes[..cut.index(bytes.len())]).is_err());
        }

        #[test]
        fn record_round_trips(crc in any::<u32>(), zero in any::<bool>()) {
            let rec = BlockRecord { crc, flags: REC_ALLOCATED | if zero { REC_ZERO } else { 0 } };
            let mut buf = [0xffu8; 16];
            encode_record(&rec, &mut buf);
            prop_assert_eq!(decode_record(&buf).unwrap(), rec);
        }

        #[test]
        fn record_decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..32)) {
            let _ = decode_record(&bytes);
        }
    }

    #[test]
    fn all_zero_record_is_unallocated() {
        let rec = decode_record(&[0u8; 16]).unwrap();
        assert_eq!(rec, BlockRecord::UNALLOCATED);
        assert!(!rec.is_allocated());
    }

    #[test]
    fn garbage_records_are_refused() {
        let mut buf = [0u8; 16];
        buf[0] = 1; // crc without ALLOCATED
        assert!(decode_record(&buf).is_err());
        let mut buf = [0u8; 16];
        buf[4] = 0x81;
        assert!(decode_record(&buf).is_err());
        let mut buf = [0u8; 16];
        buf[4] = 1;
        buf[15] = 1;
        assert!(decode_record(&buf).is_err());
    }

    #[test]
    fn other_versions_are_refused_clearly() {
        let mut bytes = encode_manifest(&Manifest::new(1 << 20));
        bytes[8] = 4;
        assert_eq!(decode_manifest(&bytes), Err(FormatError::UnsupportedVersion(4)));
        assert_eq!(decode_manifest(b"hello world, this is not a manifest"), Err(FormatError::BadMagic));
    }

    #[test]
    fn version_1_manifests_are_read() {
        // A version 1 manifest: the fixed part, a name, one layer, the crc.
        let m = Manifest {
            store_id: 0,
            membership: Membership::default(),
            rebuild: None,
            ..Manifest::new(1 << 20)
        };
        let v2 = encode_manifest(&Manifest { volume: Some("vol".into()), ..m.clone() });
        let mut v1 = v2[..FIXED_LEN + 3 + 8].to_vec();
        v1[8..12].copy_from_slice(&FORMAT_VERSION_1.to_le_bytes());
        let total = (v1.len() + CRC_LEN) as u32;
        v1[12..16].copy_from_slice(&total.to_le_bytes());
        let crc = jiva_core::crc32c(&v1);
        v1.extend_from_slice(&crc.to_le_bytes());
        let got = decode_manifest(&v1).unwrap();
        assert_eq!(got, Manifest { volume: Some("vol".into()), ..m });
    }

    #[test]
    fn snapshot_names_are_checked() {
        assert!(check_snapshot_name("daily-2026.11.21_0").is_ok());
        for bad in ["", "-x", ".x", "a b", "vol@s", "a/b", &"x".repeat(65)] {
            assert!(check_snapshot_name(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn merge_marker_must_name_a_snapshot() {
        let mut m = Manifest::new(1 << 20);
        m.layers = vec![1, 2];
        m.next_layer_id = 3;
        m.snapshots = vec![SnapshotMeta { name: "a".into(), created_ms: 1, system: false }];
        m.merging = Some(2); // the head is never merged
        assert!(decode_manifest(&encode_manifest(&m)).is_err());
        m.merging = Some(1);
        assert_eq!(decode_manifest(&encode_manifest(&m)).unwrap(), m);
    }

    #[test]
    fn zero_record_carries_zero_crc() {
        assert_eq!(BlockRecord::zero().crc, jiva_core::crc32c(&[0u8; 4096]));
        assert!(BlockRecord::zero().is_zero());
    }
}
