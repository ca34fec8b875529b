//! The logical unit: executes parsed commands against a [`BlockDevice`] and
//! keeps the SCSI state that belongs to the unit rather than to a
//! connection (unit attentions per I_T nexus, SPC-2 and persistent
//! reservations, mode parameters).
//!
//! Geometry: 512-byte logical blocks on a device whose size is a multiple
//! of 4 KiB, reported as 8 logical blocks per physical block. Unaligned
//! writes are the device's business (it does read-modify-write).
//!
//! Ordering: commands run concurrently (every task is SIMPLE). COMPARE AND
//! WRITE holds a unit-wide exclusive lock that every other write-type
//! command takes shared, so the compare and the write are atomic with
//! respect to writes through this unit.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::{Bytes, BytesMut};
use jiva_core::{BlockDevice, ExtentState, MAX_IO_BYTES, ZeroFlags};

use crate::cdb::{Command, OpInfo, Rw, SUPPORTED, Width};
use crate::nexus::Nexus;
use crate::pages::{self, Identity, LOGICAL_BLOCK, ModeSenseArgs, ModeState, VpdParams};
use crate::pr::{self, PrError, PrState, ProutParams};
use crate::sense::{Access, Asc, Sense, Status, key, sense_for};

const BS: u64 = LOGICAL_BLOCK as u64;
/// Largest transfer in logical blocks (MAXIMUM TRANSFER LENGTH).
pub const MAX_TRANSFER_BLOCKS: u32 = MAX_IO_BYTES / LOGICAL_BLOCK;
/// Most bytes of block status examined by one GET LBA STATUS.
const LBA_STATUS_WINDOW: u64 = 1 << 30;
/// Size of the buffer used to write a WRITE SAME pattern.
const WRITE_SAME_CHUNK: u64 = 1 << 20;

/// The result of one command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub status: Status,
    /// Sense data, with CHECK CONDITION.
    pub sense: Option<Sense>,
    /// Encode the sense in descriptor format (the control page's D_SENSE).
    pub descriptor_sense: bool,
    /// Data-In, already cut to the command's allocation length.
    pub data: Bytes,
    /// Bytes of Data-Out the CDB asks for (for the transport's residuals).
    pub data_out_len: u64,
}

impl Outcome {
    fn good(data: Bytes) -> Outcome {
        Outcome { status: Status::Good, sense: None, descriptor_sense: false, data, data_out_len: 0 }
    }

    fn check(sense: Sense) -> Outcome {
        Outcome {
            status: Status::CheckCondition,
            sense: Some(sense),
            descriptor_sense: false,
            data: Bytes::new(),
            data_out_len: 0,
        }
    }

    fn conflict() -> Outcome {
        Outcome {
            status: Status::ReservationConflict,
            sense: None,
            descriptor_sense: false,
            data: Bytes::new(),
            data_out_len: 0,
        }
    }

    /// Encoded sense data (empty without sense).
    pub fn sense_data(&self) -> Vec<u8> {
        self.sense.map(|s| s.encode(self.descriptor_sense)).unwrap_or_default()
    }
}

/// Why a command failed.
enum Fail {
    Check(Sense),
    Conflict,
}

impl From<Sense> for Fail {
    fn from(s: Sense) -> Fail {
        Fail::Check(s)
    }
}

type Exec = Result<Bytes, Fail>;

#[derive(Default)]
struct NexusState {
    /// Sessions (transport connections of this nexus) attached.
    attached: usize,
    attentions: VecDeque<Asc>,
}

#[derive(Default)]
struct State {
    mode: ModeState,
    pr: PrState,
    /// Holder of an SPC-2 RESERVE.
    reserved_by: Option<Nexus>,
    nexuses: HashMap<Nexus, NexusState>,
}

impl State {
    /// Queues a unit attention for an attached nexus.
    fn attention(&mut self, n: &Nexus, asc: Asc) {
        if let Some(ns) = self.nexuses.get_mut(n)
            && !ns.attentions.contains(&asc)
            && ns.attentions.len() < 16
        {
            ns.attentions.push_back(asc);
        }
    }

    fn attention_others(&mut self, except: Option<&Nexus>, asc: Asc) {
        let others: Vec<Nexus> = self.nexuses.keys().filter(|n| Some(*n) != except).cloned().collect();
        for n in others {
            self.attention(&n, asc);
        }
    }
}

/// One logical unit backed by a block device.
pub struct LogicalUnit<D: BlockDevice> {
    device: Arc<D>,
    identity: Identity,
    blocks: u64,
    state: Mutex<State>,
    caw: tokio::sync::RwLock<()>,
}

impl<D: BlockDevice> std::fmt::Debug for LogicalUnit<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogicalUnit").field("identity", &self.identity).field("blocks", &self.blocks).finish()
    }
}

/// How a command touches the medium, for reservation checks.
fn access_of(cmd: &Command) -> pr::Access {
    use pr::Access as A;
    match cmd {
        Command::TestUnitReady
        | Command::RequestSense { .. }
        | Command::Inquiry { .. }
        | Command::ReportLuns { .. }
        | Command::ReadCapacity10 { .. }
        | Command::ReadCapacity16 { .. }
        | Command::PersistentReserveIn { .. }
        | Command::PersistentReserveOut { .. }
        | Command::ReportSupportedOpcodes { .. }
        | Command::PreventAllow { prevent: 0 } => A::Any,
        Command::Read(_)
        | Command::Verify { .. }
        | Command::PreFetch { .. }
        | Command::GetLbaStatus { .. }
        | Command::ModeSense { .. } => A::Read,
        _ => A::Write,
    }
}

/// Bytes of Data-Out the command transfers.
fn data_out_len(cmd: &Command) -> u64 {
    match *cmd {
        Command::Write(rw) | Command::WriteVerify { rw, .. } => u64::from(rw.blocks) * BS,
        Command::Verify { blocks, bytchk: 1, .. } => u64::from(blocks) * BS,
        Command::Verify { bytchk: 3, .. } => BS,
        Command::WriteSame { ndob: false, .. } => BS,
        Command::Unmap { len, .. } | Command::ModeSelect { len, .. } => u64::from(len),
        Command::PersistentReserveOut { len, .. } => u64::from(len),
        Command::CompareAndWrite { blocks, .. } => 2 * u64::from(blocks) * BS,
        _ => 0,
    }
}

/// Byte of the CDB holding the transfer length (for field pointers).
fn length_byte(width: Width) -> u16 {
    match width {
        Width::W6 => 4,
        Width::W10 => 7,
        Width::W12 => 6,
        Width::W16 => 10,
    }
}

fn cut(mut data: Vec<u8>, alloc: usize) -> Bytes {
    data.truncate(alloc);
    Bytes::from(data)
}

impl<D: BlockDevice> LogicalUnit<D> {
    pub fn new(device: Arc<D>, identity: Identity) -> LogicalUnit<D> {
        let blocks = device.size() / BS;
        LogicalUnit {
            device,
            identity,
            blocks,
            state: Mutex::new(State::default()),
            caw: tokio::sync::RwLock::new(()),
        }
    }

    pub fn device(&self) -> &Arc<D> {
        &self.device
    }

    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// Capacity in logical blocks.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the state half
        // updated in a way that matters more than refusing all service.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An I_T nexus came into existence (an iSCSI session logged in).
    pub fn attach(&self, nexus: &Nexus) {
        self.state().nexuses.entry(nexus.clone()).or_default().attached += 1;
    }

    /// An I_T nexus went away: its SPC-2 reservation and unit attentions go
    /// with it (persistent reservations stay).
    pub fn detach(&self, nexus: &Nexus) {
        let mut st = self.state();
        if let Some(ns) = st.nexuses.get_mut(nexus) {
            ns.attached = ns.attached.saturating_sub(1);
            if ns.attached == 0 {
                st.nexuses.remove(nexus);
                if st.reserved_by.as_ref() == Some(nexus) {
                    st.reserved_by = None;
                }
            }
        }
    }

    /// LOGICAL UNIT RESET (or a target reset, which resets our only unit):
    /// releases the SPC-2 reservation and tells every other nexus.
    pub fn reset(&self, issuer: Option<&Nexus>, target_reset: bool) {
        let mut st = self.state();
        st.reserved_by = None;
        let asc = if target_reset { Asc::POWER_ON_RESET } else { Asc::BUS_DEVICE_RESET };
        st.attention_others(issuer, asc);
    }

    fn thin(&self) -> bool {
        self.device.capabilities().trim
    }

    fn write_protected(&self, st: &State) -> bool {
        self.device.capabilities().read_only || st.mode.swp
    }

    /// Executes one CDB for `nexus`. `data_out` holds the Data-Out the
    /// initiator sent (possibly more or less than the CDB asks for: only
    /// whole blocks actually received are written).
    pub async fn execute(&self, nexus: &Nexus, cdb: &[u8], data_out: Bytes) -> Outcome {
        let parsed = Command::parse(cdb);
        let (descriptor, pre) = {
            let mut st = self.state();
            let pre = match &parsed {
                Err(sense) => Some(Outcome::check(*sense)),
                Ok(cmd) => self.precheck(&mut st, nexus, cmd),
            };
            (st.mode.d_sense, pre)
        };
        let mut out = match (pre, parsed) {
            (Some(out), _) => out,
            (None, Err(sense)) => Outcome::check(sense),
            (None, Ok(cmd)) => {
                let out_len = data_out_len(&cmd);
                let mut out = match self.run(nexus, cmd, data_out).await {
                    Ok(data) => Outcome::good(data),
                    Err(Fail::Check(sense)) => Outcome::check(sense),
                    Err(Fail::Conflict) => Outcome::conflict(),
                };
                out.data_out_len = out_len;
                out
            }
        };
        out.descriptor_sense = descriptor;
        out
    }

    /// Unit attention and reservation checks, before the command runs.
    fn precheck(&self, st: &mut State, nexus: &Nexus, cmd: &Command) -> Option<Outcome> {
        let reports_ua = !matches!(
            cmd,
            Command::Inquiry { .. } | Command::ReportLuns { .. } | Command::RequestSense { .. }
        );
        if reports_ua && let Some(asc) = st.nexuses.get_mut(nexus).and_then(|ns| ns.attentions.pop_front()) {
            let mut out = Outcome::check(Sense::new(key::UNIT_ATTENTION, asc));
            out.data_out_len = data_out_len(cmd);
            return Some(out);
        }
        // SPC-2 reservation held by another nexus.
        if let Some(holder) = &st.reserved_by
            && holder != nexus
        {
            let allowed = matches!(
                cmd,
                Command::Inquiry { .. }
                    | Command::ReportLuns { .. }
                    | Command::RequestSense { .. }
                    | Command::Release { .. }
                    | Command::ReadCapacity10 { .. }
                    | Command::ReadCapacity16 { .. }
                    | Command::PersistentReserveIn { .. }
                    | Command::ReportSupportedOpcodes { .. }
            );
            if !allowed {
                return Some(Outcome::conflict());
            }
        }
        if !st.pr.allows(nexus, access_of(cmd)) {
            return Some(Outcome::conflict());
        }
        None
    }

    async fn run(&self, nexus: &Nexus, cmd: Command, data_out: Bytes) -> Exec {
        match cmd {
            Command::TestUnitReady => Ok(Bytes::new()),
            Command::RequestSense { desc, alloc } => {
                let asc = self.state().nexuses.get_mut(nexus).and_then(|ns| ns.attentions.pop_front());
                let sense = match asc {
                    Some(asc) => Sense::new(key::UNIT_ATTENTION, asc),
                    None => Sense::new(key::NO_SENSE, Asc::NONE),
                };
                Ok(cut(sense.encode(desc), usize::from(alloc)))
            }
            Command::Inquiry { evpd, page, alloc } => {
                let data = if !evpd {
                    if page != 0 {
                        return Err(Sense::invalid_cdb(2, None).into());
                    }
                    pages::standard_inquiry(&self.identity)
                } else {
                    let p = VpdParams { thin: self.thin(), max_transfer_blocks: MAX_TRANSFER_BLOCKS };
                    pages::vpd(page, &self.identity, nexus, p).ok_or(Sense::invalid_cdb(2, None))?
                };
                Ok(cut(data, usize::from(alloc)))
            }
            Command::ReportLuns { select, alloc } => report_luns(select, alloc),
            Command::ModeSense { width, dbd, llbaa, pc, page, subpage, alloc } => {
                let st = self.state();
                let args = ModeSenseArgs { ten: width != Width::W6, dbd, llbaa, pc, page, subpage };
                let data = pages::mode_sense(args, &st.mode, self.blocks, self.write_protected(&st))?;
                Ok(cut(data, usize::from(alloc)))
            }
            Command::ModeSelect { width, pf, sp, len } => {
                if sp {
                    return Err(Sense::invalid_cdb(1, Some(0)).into());
                }
                if len == 0 {
                    return Ok(Bytes::new());
                }
                if !pf {
                    return Err(Sense::invalid_cdb(1, Some(4)).into());
                }
                let params = &data_out[..data_out.len().min(usize::from(len))];
                if params.len() < usize::from(len) {
                    return Err(Sense::illegal(Asc::PARAMETER_LIST_LENGTH_ERROR).into());
                }
                let mut st = self.state();
                let next = pages::mode_select(params, width != Width::W6, &st.mode)?;
                if next != st.mode {
                    st.mode = next;
                    st.attention_others(Some(nexus), Asc::MODE_PARAMETERS_CHANGED);
                }
                Ok(Bytes::new())
            }
            Command::StartStopUnit { power_condition, no_flush, start, .. } => {
                if !matches!(power_condition, 0 | 1 | 2 | 3 | 5 | 7 | 0xa | 0xb) {
                    return Err(Sense::invalid_cdb(4, Some(4)).into());
                }
                // Stopping flushes the cache unless told not to; the unit
                // itself never stops (it has no medium to spin down).
                if power_condition == 0 && !start && !no_flush {
                    self.flush().await?;
                }
                Ok(Bytes::new())
            }
            Command::PreventAllow { .. } => Ok(Bytes::new()),
            Command::Reserve { .. } => {
                let mut st = self.state();
                if st.pr.active() {
                    return Err(Fail::Conflict);
                }
                match &st.reserved_by {
                    Some(h) if h != nexus => Err(Fail::Conflict),
                    _ => {
                        st.reserved_by = Some(nexus.clone());
                        Ok(Bytes::new())
                    }
                }
            }
            Command::Release { .. } => {
                let mut st = self.state();
                if st.pr.active() {
                    return Err(Fail::Conflict);
                }
                if st.reserved_by.as_ref() == Some(nexus) {
                    st.reserved_by = None;
                }
                Ok(Bytes::new())
            }
            Command::ReadCapacity10 { lba, pmi } => {
                if !pmi && lba != 0 {
                    return Err(Sense::invalid_cdb(2, None).into());
                }
                Ok(Bytes::from(pages::read_capacity_10(self.blocks)))
            }
            Command::ReadCapacity16 { alloc } => {
                Ok(cut(pages::read_capacity_16(self.blocks, self.thin()), alloc as usize))
            }
            Command::GetLbaStatus { lba, alloc } => self.lba_status(lba, alloc).await,
            Command::Read(rw) => self.read(rw).await,
            Command::Write(rw) => self.write(rw, data_out).await,
            Command::WriteVerify { rw, bytchk } => {
                let n = self.check_write(rw, &data_out)?;
                if n == 0 {
                    return Ok(Bytes::new());
                }
                let data = data_out.slice(..(n * BS) as usize);
                self.write(Rw { blocks: n as u32, ..rw }, data.clone()).await?;
                if bytchk {
                    let back = self.read_blocks(rw.lba, n).await?;
                    if let Some(at) = mismatch(&back, &data) {
                        return Err(miscompare(at).into());
                    }
                }
                Ok(Bytes::new())
            }
            Command::Verify { width, lba, blocks, protect, bytchk, .. } => {
                self.verify(width, lba, blocks, protect, bytchk, data_out).await
            }
            Command::SyncCache { lba, blocks, .. } => {
                self.check_range(lba, u64::from(blocks))?;
                self.flush().await?;
                Ok(Bytes::new())
            }
            Command::PreFetch { lba, blocks, .. } => {
                self.check_range(lba, u64::from(blocks))?;
                Ok(Bytes::new())
            }
            Command::WriteSame { width, lba, blocks, unmap, anchor, ndob, protect } => {
                self.write_same(width, lba, blocks, unmap, anchor, ndob, protect, data_out).await
            }
            Command::Unmap { anchor, len } => self.unmap(anchor, len, data_out).await,
            Command::CompareAndWrite { lba, blocks, fua, protect, .. } => {
                self.compare_and_write(lba, blocks, fua, protect, data_out).await
            }
            Command::PersistentReserveIn { action, alloc } => {
                let data = self.state().pr.read(action).ok_or(Sense::invalid_cdb(1, Some(0)))?;
                Ok(cut(data, usize::from(alloc)))
            }
            Command::PersistentReserveOut { action, scope, kind, len } => {
                self.prout(nexus, action, scope, kind, len, &data_out)
            }
            Command::ReportSupportedOpcodes { rctd, options, opcode, action, alloc } => {
                report_opcodes(rctd, options, opcode, action)
                    .map(|d| cut(d, alloc as usize))
                    .map_err(Fail::from)
            }
        }
    }

    fn check_range(&self, lba: u64, blocks: u64) -> Result<(), Sense> {
        match lba.checked_add(blocks) {
            Some(end) if end <= self.blocks => Ok(()),
            _ => Err(Sense::lba_out_of_range()),
        }
    }

    /// Range and length checks shared by block commands.
    fn check_io(&self, width: Width, lba: u64, blocks: u32, protect: u8) -> Result<(), Sense> {
        if protect != 0 {
            return Err(Sense::invalid_cdb(1, Some(5)));
        }
        self.check_range(lba, u64::from(blocks))?;
        if blocks > MAX_TRANSFER_BLOCKS {
            return Err(Sense::invalid_cdb(length_byte(width), None));
        }
        Ok(())
    }

    /// Checks a write; returns how many blocks of data actually arrived.
    fn check_write(&self, rw: Rw, data_out: &Bytes) -> Result<u64, Sense> {
        if self.write_protected(&self.state()) {
            return Err(Sense::new(key::DATA_PROTECT, Asc::WRITE_PROTECTED));
        }
        self.check_io(rw.width, rw.lba, rw.blocks, rw.protect)?;
        Ok(u64::from(rw.blocks).min(data_out.len() as u64 / BS))
    }

    async fn flush(&self) -> Result<(), Sense> {
        self.device.flush().await.map_err(|e| sense_for(e.kind(), Access::Write))
    }

    async fn read_blocks(&self, lba: u64, blocks: u64) -> Result<Bytes, Sense> {
        self.device
            .read(lba * BS, (blocks * BS) as usize)
            .await
            .map_err(|e| sense_for(e.kind(), Access::Read))
    }

    async fn read(&self, rw: Rw) -> Exec {
        self.check_io(rw.width, rw.lba, rw.blocks, rw.protect)?;
        if rw.blocks == 0 {
            return Ok(Bytes::new());
        }
        Ok(self.read_blocks(rw.lba, u64::from(rw.blocks)).await?)
    }

    async fn write(&self, rw: Rw, data_out: Bytes) -> Exec {
        let n = self.check_write(rw, &data_out)?;
        if n == 0 {
            return Ok(Bytes::new());
        }
        let data = data_out.slice(..(n * BS) as usize);
        let native_fua = self.device.capabilities().fua;
        {
            let _shared = self.caw.read().await;
            self.device
                .write(rw.lba * BS, data, rw.fua && native_fua)
                .await
                .map_err(|e| sense_for(e.kind(), Access::Write))?;
        }
        if rw.fua && !native_fua {
            self.flush().await?;
        }
        Ok(Bytes::new())
    }

    async fn verify(
        &self,
        width: Width,
        lba: u64,
        blocks: u32,
        protect: u8,
        bytchk: u8,
        data_out: Bytes,
    ) -> Exec {
        if bytchk == 2 {
            return Err(Sense::invalid_cdb(1, Some(1)).into());
        }
        self.check_io(width, lba, blocks, protect)?;
        if blocks == 0 {
            return Ok(Bytes::new());
        }
        let medium = self.read_blocks(lba, u64::from(blocks)).await?;
        match bytchk {
            1 => {
                let n = (data_out.len() / BS as usize).min(medium.len() / BS as usize) * BS as usize;
                if let Some(at) = mismatch(&medium[..n], &data_out[..n]) {
                    return Err(miscompare(at).into());
                }
            }
            3 => {
                let Some(block) = data_out.get(..BS as usize) else {
                    return Err(Sense::illegal(Asc::PARAMETER_LIST_LENGTH_ERROR).into());
                };
                for (i, chunk) in medium.chunks(BS as usize).enumerate() {
                    if let Some(at) = mismatch(chunk, block) {
                        return Err(miscompare(i as u64 * BS + at).into());
                    }
                }
            }
            _ => {}
        }
        Ok(Bytes::new())
    }

    #[allow(clippy::too_many_arguments)]
    async fn write_same(
        &self,
        width: Width,
        lba: u64,
        blocks: u32,
        unmap: bool,
        anchor: bool,
        ndob: bool,
        protect: u8,
        data_out: Bytes,
    ) -> Exec {
        if self.write_protected(&self.state()) {
            return Err(Sense::new(key::DATA_PROTECT, Asc::WRITE_PROTECTED).into());
        }
        if protect != 0 {
            return Err(Sense::invalid_cdb(1, Some(5)).into());
        }
        let thin = self.thin();
        if anchor {
            return Err(Sense::invalid_cdb(1, Some(4)).into());
        }
        if unmap && !thin {
            return Err(Sense::invalid_cdb(1, Some(3)).into());
        }
        if lba > self.blocks {
            return Err(Sense::lba_out_of_range().into());
        }
        // Zero blocks means "to the end of the medium" (WSNZ = 0).
        let count = if blocks == 0 { self.blocks - lba } else { u64::from(blocks) };
        self.check_range(lba, count)?;
        if count > u64::from(pages::MAX_UNMAP_BLOCKS) {
            return Err(Sense::invalid_cdb(length_byte(width), None).into());
        }
        // Exactly one block of data (none with NDOB).
        let block: Bytes = if ndob {
            Bytes::from(vec![0u8; BS as usize])
        } else if data_out.len() as u64 == BS {
            data_out
        } else {
            return Err(Sense::invalid_cdb(length_byte(width), None).into());
        };
        if count == 0 {
            return Ok(Bytes::new());
        }
        let (offset, len) = (lba * BS, count * BS);
        let caps = self.device.capabilities();
        let zero = block.iter().all(|&b| b == 0);
        let _shared = self.caw.read().await;
        // With UNMAP the range is released whatever the data (LBPRZ: it
        // then reads as zeros), as initiators that ask for it expect.
        let done = if unmap {
            self.device.trim(offset, len, false).await
        } else if zero && caps.write_zeroes {
            self.device.write_zeroes(offset, len, ZeroFlags { no_hole: true, fua: false }).await
        } else {
            let chunk_blocks = (WRITE_SAME_CHUNK / BS).min(count);
            let mut buf = BytesMut::with_capacity((chunk_blocks * BS) as usize);
            for _ in 0..chunk_blocks {
                buf.extend_from_slice(&block);
            }
            let buf = buf.freeze();
            let mut pos = 0;
            let mut result = Ok(());
            while pos < len && result.is_ok() {
                let n = (len - pos).min(buf.len() as u64);
                result = self.device.write(offset + pos, buf.slice(..n as usize), false).await;
                pos += n;
            }
            result
        };
        done.map_err(|e| sense_for(e.kind(), Access::Write))?;
        Ok(Bytes::new())
    }

    async fn unmap(&self, anchor: bool, len: u16, data_out: Bytes) -> Exec {
        if !self.thin() {
            return Err(Sense::invalid_opcode().into());
        }
        if self.write_protected(&self.state()) {
            return Err(Sense::new(key::DATA_PROTECT, Asc::WRITE_PROTECTED).into());
        }
        if anchor {
            return Err(Sense::invalid_cdb(1, Some(0)).into());
        }
        if len == 0 {
            return Ok(Bytes::new());
        }
        let params = &data_out[..data_out.len().min(usize::from(len))];
        if params.len() < 8 {
            return Err(Sense::illegal(Asc::PARAMETER_LIST_LENGTH_ERROR).into());
        }
        let desc_len = usize::from(u16::from_be_bytes([params[2], params[3]]));
        let descs = &params[8..];
        let n = desc_len.min(descs.len()) / 16;
        if n > pages::MAX_UNMAP_DESCRIPTORS as usize {
            return Err(Sense::invalid_param(2).into());
        }
        let mut ranges = Vec::with_capacity(n);
        for (i, d) in descs.chunks_exact(16).take(n).enumerate() {
            let lba = u64::from_be_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]]);
            let count = u32::from_be_bytes([d[8], d[9], d[10], d[11]]);
            self.check_range(lba, u64::from(count))?;
            if count > pages::MAX_UNMAP_BLOCKS {
                return Err(Sense::invalid_param((8 + 16 * i + 8) as u16).into());
            }
            if count > 0 {
                ranges.push((lba * BS, u64::from(count) * BS));
            }
        }
        let _shared = self.caw.read().await;
        for (offset, len) in ranges {
            self.device.trim(offset, len, false).await.map_err(|e| sense_for(e.kind(), Access::Write))?;
        }
        Ok(Bytes::new())
    }

    async fn compare_and_write(&self, lba: u64, blocks: u8, fua: bool, protect: u8, data_out: Bytes) -> Exec {
        if self.write_protected(&self.state()) {
            return Err(Sense::new(key::DATA_PROTECT, Asc::WRITE_PROTECTED).into());
        }
        if protect != 0 {
            return Err(Sense::invalid_cdb(1, Some(5)).into());
        }
        if blocks > pages::MAX_COMPARE_AND_WRITE {
            return Err(Sense::invalid_cdb(13, None).into());
        }
        self.check_range(lba, u64::from(blocks))?;
        // The Data-Out must hold exactly the verify and the write data.
        let half = usize::from(blocks) * BS as usize;
        if data_out.len() != 2 * half {
            return Err(Sense::invalid_cdb(13, None).into());
        }
        if blocks == 0 {
            return Ok(Bytes::new());
        }
        let _exclusive = self.caw.write().await;
        let medium = self.read_blocks(lba, u64::from(blocks)).await?;
        if let Some(at) = mismatch(&medium, &data_out[..half]) {
            return Err(miscompare(at).into());
        }
        let native_fua = self.device.capabilities().fua;
        self.device
            .write(lba * BS, data_out.slice(half..2 * half), fua && native_fua)
            .await
            .map_err(|e| sense_for(e.kind(), Access::Write))?;
        if fua && !native_fua {
            self.flush().await?;
        }
        Ok(Bytes::new())
    }

    async fn lba_status(&self, lba: u64, alloc: u32) -> Exec {
        if lba >= self.blocks {
            return Err(Sense::lba_out_of_range().into());
        }
        // Status is kept per physical block: a start inside one is
        // reported from the next physical block (what the libiscsi
        // conformance suite expects), except in the last one.
        let aligned = lba.next_multiple_of(u64::from(pages::LBPPB));
        let lba = if aligned < self.blocks { aligned } else { lba };
        let room = (alloc as usize).saturating_sub(8) / 16;
        let window = ((self.blocks - lba) * BS).min(LBA_STATUS_WINDOW);
        let extents = if self.thin() {
            self.device.block_status(lba * BS, window).await.map_err(|e| sense_for(e.kind(), Access::Read))?
        } else {
            vec![jiva_core::Extent { length: window, state: ExtentState::Data }]
        };
        let mut descs: Vec<(u64, u64, u8)> = Vec::new();
        let mut pos = lba;
        for e in extents {
            let n = e.length.div_ceil(BS);
            if n == 0 {
                continue;
            }
            let status = match e.state {
                ExtentState::Hole => 1,
                ExtentState::Data | ExtentState::Zero => 0,
            };
            match descs.last_mut() {
                Some(last) if last.2 == status => last.1 += n,
                _ => descs.push((pos, n, status)),
            }
            pos += n;
        }
        let mut body = Vec::new();
        for (start, mut n, status) in descs {
            let mut start = start;
            while n > 0 {
                let c = n.min(u64::from(u32::MAX));
                body.extend_from_slice(&start.to_be_bytes());
                body.extend_from_slice(&(c as u32).to_be_bytes());
                body.extend_from_slice(&[status, 0, 0, 0]);
                start += c;
                n -= c;
            }
        }
        // Report at least one descriptor, and no more than fit.
        body.truncate(room.max(1) * 16);
        let mut b = ((body.len() + 4) as u32).to_be_bytes().to_vec();
        b.extend_from_slice(&[0; 4]);
        b.extend(body);
        Ok(cut(b, alloc as usize))
    }

    fn prout(&self, nexus: &Nexus, action: u8, scope: u8, kind: u8, len: u32, data_out: &Bytes) -> Exec {
        use pr::action_out::*;
        if !matches!(
            action,
            REGISTER | RESERVE | RELEASE | CLEAR | PREEMPT | PREEMPT_AND_ABORT | REGISTER_AND_IGNORE
        ) {
            return Err(Sense::invalid_cdb(1, Some(0)).into());
        }
        let mut st = self.state();
        if let Some(h) = &st.reserved_by
            && h != nexus
        {
            return Err(Fail::Conflict);
        }
        if len as usize != pr::PROUT_PARAM_LEN {
            return Err(Sense::illegal(Asc::PARAMETER_LIST_LENGTH_ERROR).into());
        }
        let params = ProutParams::parse(data_out).ok_or(Sense::illegal(Asc::PARAMETER_LIST_LENGTH_ERROR))?;
        match st.pr.out(nexus, action, scope, kind, &params) {
            Ok(attentions) => {
                for (n, asc) in attentions {
                    st.attention(&n, asc);
                }
                Ok(Bytes::new())
            }
            Err(PrError::Conflict) => Err(Fail::Conflict),
            Err(PrError::Check(sense)) => Err(sense.into()),
        }
    }
}

fn mismatch(a: &[u8], b: &[u8]) -> Option<u64> {
    a.iter().zip(b).position(|(x, y)| x != y).map(|p| p as u64)
}

fn miscompare(at: u64) -> Sense {
    Sense::new(key::MISCOMPARE, Asc::MISCOMPARE_DURING_VERIFY).with_information(at)
}

/// REPORT LUNS for our single unit, LUN 0.
fn report_luns(select: u8, alloc: u32) -> Exec {
    if alloc < 16 {
        return Err(Sense::invalid_cdb(6, None).into());
    }
    let luns: &[u64] = match select {
        0 | 2 => &[0],
        1 => &[],
        _ => return Err(Sense::invalid_cdb(2, None).into()),
    };
    let mut b = ((luns.len() * 8) as u32).to_be_bytes().to_vec();
    b.extend_from_slice(&[0; 4]);
    for lun in luns {
        b.extend_from_slice(&lun.to_be_bytes());
    }
    Ok(cut(b, alloc as usize))
}

/// Command timeouts descriptor (RCTD): no limits known.
const TIMEOUTS: [u8; 12] = [0, 0x0a, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];

fn report_opcodes(rctd: bool, options: u8, opcode: u8, action: u16) -> Result<Vec<u8>, Sense> {
    let has_actions = SUPPORTED.iter().any(|i| i.opcode == opcode && i.action.is_some());
    let one = |info: Option<&OpInfo>| {
        let mut b = vec![0u8; 4];
        match info {
            Some(info) => {
                b[1] = 0x03 | if rctd { 0x80 } else { 0 };
                b[2..4].copy_from_slice(&(info.usage.len() as u16).to_be_bytes());
                b.extend_from_slice(info.usage);
                if rctd {
                    b.extend_from_slice(&TIMEOUTS);
                }
            }
            None => b[1] = 0x01,
        }
        b
    };
    match options {
        0 => {
            let mut body = Vec::new();
            for info in SUPPORTED {
                body.push(info.opcode);
                body.push(0);
                body.extend_from_slice(&info.action.unwrap_or(0).to_be_bytes());
                body.push(0);
                body.push(u8::from(info.action.is_some()) | if rctd { 0x02 } else { 0 });
                body.extend_from_slice(&(info.usage.len() as u16).to_be_bytes());
                if rctd {
                    body.extend_from_slice(&TIMEOUTS);
                }
            }
            let mut b = (body.len() as u32).to_be_bytes().to_vec();
            b.extend(body);
            Ok(b)
        }
        1 => {
            if has_actions {
                return Err(Sense::invalid_cdb(2, Some(0)));
            }
            Ok(one(SUPPORTED.iter().find(|i| i.opcode == opcode)))
        }
        2 => {
            if !has_actions && SUPPORTED.iter().any(|i| i.opcode == opcode) {
                return Err(Sense::invalid_cdb(2, Some(0)));
            }
            Ok(one(SUPPORTED.iter().find(|i| i.opcode == opcode && i.action == Some(action))))
        }
        3 => Ok(one(SUPPORTED
            .iter()
            .find(|i| i.opcode == opcode && (i.action.is_none() || i.action == Some(action))))),
        _ => Err(Sense::invalid_cdb(2, Some(0))),
    }
}

/// The answer for a command addressed to a LUN that does not exist:
/// INQUIRY reports "no device here" (peripheral qualifier 3), REPORT LUNS
/// lists the units that do exist, anything else is LOGICAL UNIT NOT
/// SUPPORTED.
pub fn missing_lun(cdb: &[u8]) -> Outcome {
    match Command::parse(cdb) {
        Ok(Command::Inquiry { evpd: false, page: 0, alloc }) => {
            let mut b = vec![0u8; 36];
            b[0] = 0x7f;
            b[2] = 0x06;
            b[3] = 0x02;
            b[4] = 31;
            Outcome::good(cut(b, usize::from(alloc)))
        }
        Ok(Command::ReportLuns { select, alloc }) => match report_luns(select, alloc) {
            Ok(data) => Outcome::good(data),
            Err(Fail::Check(s)) => Outcome::check(s),
            Err(Fail::Conflict) => Outcome::conflict(),
        },
        Ok(Command::RequestSense { desc, alloc }) => {
            Outcome::good(cut(Sense::illegal(Asc::LUN_NOT_SUPPORTED).encode(desc), usize::from(alloc)))
        }
        _ => Outcome::check(Sense::illegal(Asc::LUN_NOT_SUPPORTED)),
    }
}

#[cfg(test)]
mod tests;
