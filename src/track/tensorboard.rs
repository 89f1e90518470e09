//! TensorBoard event files, written directly so that no TensorBoard or protobuf
//! dependency is needed.
//!
//! An event file is a sequence of TFRecord records: `u64` data length (little
//! endian), masked CRC-32C of those 8 bytes, the data, masked CRC-32C of the data.
//! Each record's data is a serialized `tensorflow.Event` protobuf; only the few
//! fields TensorBoard needs for scalars are written, encoded by hand.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::io::write_atomic;
use crate::{Error, Result};

/// CRC-32C (Castagnoli) table for the reflected polynomial `0x82F63B78`, built at
/// compile time.
const CRC32C_TABLE: [u32; 256] = crc32c_table();

const fn crc32c_table() -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = i as u32;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
}

/// CRC-32C of `data`, the checksum TFRecord uses.
pub(crate) fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc = CRC32C_TABLE[((crc ^ u32::from(byte)) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

/// The masked CRC TFRecord stores: masking keeps a CRC of data that itself
/// contains CRCs from being degenerate.
pub(crate) fn masked_crc32c(data: &[u8]) -> u32 {
    crc32c(data).rotate_right(15).wrapping_add(0xa282_ead8)
}

/// Protobuf wire types used here.
const WIRE_VARINT: u32 = 0;
const WIRE_FIXED64: u32 = 1;
const WIRE_LEN: u32 = 2;
const WIRE_FIXED32: u32 = 5;

fn put_varint(buf: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        buf.push((value as u8) | 0x80);
        value >>= 7;
    }
    buf.push(value as u8);
}

fn put_key(buf: &mut Vec<u8>, field: u32, wire: u32) {
    put_varint(buf, u64::from((field << 3) | wire));
}

fn put_len(buf: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    put_key(buf, field, WIRE_LEN);
    put_varint(buf, bytes.len() as u64);
    buf.extend_from_slice(bytes);
}

/// The body of an event besides its time and step.
enum Body<'a> {
    /// `file_version` (field 3): the first event of every file.
    FileVersion(&'a str),
    /// `summary` (field 5) holding one `simple_value` per tag.
    Scalars(&'a [(&'a str, f32)]),
}

/// Serializes a `tensorflow.Event`.
fn encode_event(wall_time: f64, step: u64, body: Body<'_>) -> Vec<u8> {
    let mut buf = Vec::new();
    put_key(&mut buf, 1, WIRE_FIXED64);
    buf.extend_from_slice(&wall_time.to_le_bytes());
    put_key(&mut buf, 2, WIRE_VARINT);
    // int64 on the wire: a step beyond i64::MAX would read back negative, which no
    // training loop reaches.
    put_varint(&mut buf, step);
    match body {
        Body::FileVersion(version) => put_len(&mut buf, 3, version.as_bytes()),
        Body::Scalars(values) => {
            let mut summary = Vec::new();
            for &(tag, value) in values {
                let mut entry = Vec::new();
                put_len(&mut entry, 1, tag.as_bytes());
                put_key(&mut entry, 2, WIRE_FIXED32);
                entry.extend_from_slice(&value.to_le_bytes());
                put_len(&mut summary, 1, &entry);
            }
            put_len(&mut buf, 5, &summary);
        }
    }
    buf
}

/// Frames `data` as one TFRecord record.
fn encode_record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut record = Vec::with_capacity(data.len() + 16);
    record.extend_from_slice(&len);
    record.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
    record.extend_from_slice(data);
    record.extend_from_slice(&masked_crc32c(data).to_le_bytes());
    record
}

/// The host name TensorBoard's file naming convention includes, reduced to
/// characters that are safe in a file name.
fn host_name() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_default();
    let name: String = raw
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        .collect();
    if name.is_empty() {
        "localhost".to_owned()
    } else {
        name
    }
}

/// An open event file.
#[derive(Debug)]
pub(crate) struct EventWriter {
    path: PathBuf,
    file: File,
}

impl EventWriter {
    /// Removes earlier event files from `dir`, creates
    /// `dir/events.out.tfevents.<secs>.<host>` (TensorBoard's naming, which it
    /// matches on `tfevents`) and writes the `file_version` event TensorBoard
    /// expects first.
    ///
    /// A run folder holds one run: TensorBoard merges every event file in a
    /// folder, so a rerun would otherwise plot both runs as one curve.
    pub(crate) fn create(dir: &Path, wall_time: f64) -> Result<Self> {
        remove_event_files(dir)?;
        let path = dir.join(format!(
            "events.out.tfevents.{}.{}",
            wall_time as u64,
            host_name()
        ));
        Self::create_at(path, wall_time)
    }

    /// Continues the run in `dir` resumed from a checkpoint of `step`: every event
    /// file there is rewritten without the events of later steps (see
    /// [`truncate_event_file`]), and the last one by name is continued; with none,
    /// a new one is started as [`EventWriter::create`] does.
    pub(crate) fn resume(dir: &Path, wall_time: f64, step: u64) -> Result<Self> {
        let mut files = event_files(dir)?;
        files.sort();
        for file in &files {
            truncate_event_file(file, step)?;
        }
        match files.pop() {
            Some(path) => {
                let file = std::fs::OpenOptions::new()
                    .append(true)
                    .open(&path)
                    .map_err(|e| Error::io(&path, e))?;
                Ok(EventWriter { path, file })
            }
            None => Self::create(dir, wall_time),
        }
    }

    fn create_at(path: PathBuf, wall_time: f64) -> Result<Self> {
        let file = File::create(&path).map_err(|e| Error::io(&path, e))?;
        let mut writer = EventWriter { path, file };
        writer.write_event(&encode_event(
            wall_time,
            0,
            Body::FileVersion("brain.Event:2"),
        ))?;
        Ok(writer)
    }

    /// Writes one scalar summary holding every finite metric. Values are stored as
    /// `f32` (TensorBoard's `simple_value`); those that are not finite as `f32` are
    /// left out because TensorBoard cannot plot them.
    pub(crate) fn write_scalars(
        &mut self,
        step: u64,
        wall_time: f64,
        metrics: &[(&str, f64)],
    ) -> Result<()> {
        let values: Vec<(&str, f32)> = metrics
            .iter()
            .map(|&(name, value)| (name, value as f32))
            .filter(|(_, value)| value.is_finite())
            .collect();
        if values.is_empty() {
            return Ok(());
        }
        self.write_event(&encode_event(wall_time, step, Body::Scalars(&values)))
    }

    /// Syncs the file to disk.
    pub(crate) fn finish(self) -> Result<()> {
        self.file.sync_all().map_err(|e| Error::io(&self.path, e))
    }

    fn write_event(&mut self, event: &[u8]) -> Result<()> {
        // One write per record, unbuffered, so TensorBoard reading the file while
        // the run goes on sees whole records.
        self.file
            .write_all(&encode_record(event))
            .map_err(|e| Error::io(&self.path, e))
    }
}

/// The files in `dir` whose names mark them as event files.
fn event_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        if entry
            .file_name()
            .to_string_lossy()
            .starts_with("events.out.tfevents.")
        {
            files.push(entry.path());
        }
    }
    Ok(files)
}

/// Deletes the files in `dir` whose names mark them as event files.
fn remove_event_files(dir: &Path) -> Result<()> {
    for path in event_files(dir)? {
        std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
    }
    Ok(())
}

/// Reads a varint at `*pos`, or `None` where `data` ends inside it.
fn read_varint(data: &[u8], pos: &mut usize) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *data.get(*pos)?;
        *pos += 1;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

/// The `step` (field 2) of a serialized `tensorflow.Event`; 0 where it is absent,
/// as protobuf reads it; `None` if the message is malformed.
fn event_step(event: &[u8]) -> Option<u64> {
    let (mut pos, mut step) = (0, 0);
    while pos < event.len() {
        let key = read_varint(event, &mut pos)?;
        let size = match (key & 7) as u32 {
            WIRE_VARINT => {
                let value = read_varint(event, &mut pos)?;
                if key >> 3 == 2 {
                    step = value;
                }
                0
            }
            WIRE_FIXED64 => 8,
            WIRE_LEN => usize::try_from(read_varint(event, &mut pos)?).ok()?,
            WIRE_FIXED32 => 4,
            _ => return None,
        };
        pos = pos.checked_add(size).filter(|&end| end <= event.len())?;
    }
    Some(step)
}

/// Rewrites the event file `path` atomically without the events of steps past
/// `step` (a resumed run logs them again); earlier records are kept byte for byte.
/// A last record cut short by a crash is dropped too.
///
/// # Errors
/// [`Error::Io`] if it cannot be read or rewritten; [`Error::Format`] for a
/// complete record whose checksum or event does not decode (nothing is rewritten).
pub(crate) fn truncate_event_file(path: &Path, step: u64) -> Result<()> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let corrupt = |at: usize, what: &str| Error::Format {
        path: path.to_owned(),
        message: format!(
            "record at byte {at}: {what}; cannot drop the steps after the checkpoint \
             (step {step}) from it: move the file out of the run folder, then resume"
        ),
    };
    let mut kept = Vec::with_capacity(bytes.len());
    let mut pos = 0;
    while pos < bytes.len() {
        let Some(header) = bytes.get(pos..pos + 12) else {
            break; // a torn last record
        };
        let (len_bytes, len_crc) = header.split_at(8);
        if masked_crc32c(len_bytes).to_le_bytes() != len_crc {
            return Err(corrupt(pos, "length checksum mismatch"));
        }
        let len = u64::from_le_bytes(len_bytes.try_into().expect("8 bytes"));
        let end = usize::try_from(len)
            .ok()
            .and_then(|len| (pos + 16).checked_add(len));
        let Some(record) = end.and_then(|end| bytes.get(pos..end)) else {
            break; // a torn last record
        };
        let data = &record[12..record.len() - 4];
        if masked_crc32c(data).to_le_bytes() != record[record.len() - 4..] {
            return Err(corrupt(pos, "data checksum mismatch"));
        }
        let event_step = event_step(data).ok_or_else(|| corrupt(pos, "not an event"))?;
        if event_step <= step {
            kept.extend_from_slice(record);
        }
        pos += record.len();
    }
    if kept != bytes {
        write_atomic(path, &kept)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
    }

    /// Reference values from TensorBoard's own Python implementation
    /// (`tensorboard.compat.tensorflow_stub.pywrap_tensorflow.masked_crc32c`).
    #[test]
    fn masked_crc_matches_tensorboard() {
        assert_eq!(masked_crc32c(b"123456789"), 0xC78A_B0E5);
        // The length fields of an empty record and of a 42-byte record.
        assert_eq!(crc32c(&[0u8; 8]), 0x8C28_B28A);
        assert_eq!(masked_crc32c(&[0u8; 8]), 0x0798_0329);
        assert_eq!(masked_crc32c(&42u64.to_le_bytes()), 0xF591_8DAE);
    }

    #[test]
    fn varints_encode_like_protobuf() {
        let mut buf = Vec::new();
        put_varint(&mut buf, 1);
        put_varint(&mut buf, 300);
        put_varint(&mut buf, u64::MAX);
        assert_eq!(
            buf,
            [1, 0xac, 0x02, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]
        );
    }
}
