//! IDX files (MNIST, Fashion-MNIST), plain or gzip-compressed.

use std::io::Read;
use std::path::Path;

use super::malformed;
use crate::data::{Class, Dataset};
use crate::{Error, Result};

/// An unsigned-byte IDX array: its dimensions and values, row-major.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdxArray {
    /// Dimensions, outermost first (`[n, rows, cols]` for images, `[n]` for labels).
    pub dims: Vec<usize>,
    /// The values.
    pub data: Vec<u8>,
}

/// Reads an IDX file of unsigned bytes (type 0x08), gunzipping it if it starts with
/// the gzip magic number.
///
/// The data is read as the header describes it and no further: a header whose
/// dimensions overflow, or that claims more (or less) data than the file holds, is an
/// [`Error::Format`] naming the file, and nothing is allocated from the header's claim
/// alone (a gzip stream is decompressed only up to the claimed size).
pub fn read_idx(path: &Path) -> Result<IdxArray> {
    let file = std::fs::File::open(path).map_err(|e| {
        Error::io(
            path,
            std::io::Error::new(
                e.kind(),
                format!("{e}; install Fashion-MNIST with scripts/fetch-data.sh"),
            ),
        )
    })?;
    let mut file = std::io::BufReader::new(file);
    let gzip = {
        let start = std::io::BufRead::fill_buf(&mut file).map_err(|e| Error::io(path, e))?;
        start.starts_with(&[0x1f, 0x8b])
    };
    let mut reader: Box<dyn Read> = if gzip {
        Box::new(flate2::read::GzDecoder::new(file))
    } else {
        Box::new(file)
    };
    let read_error = |e: std::io::Error| {
        if gzip {
            malformed(path, format!("corrupt or truncated gzip data: {e}"))
        } else {
            Error::io(path, e)
        }
    };
    let mut magic = Vec::with_capacity(4);
    (&mut reader)
        .take(4)
        .read_to_end(&mut magic)
        .map_err(read_error)?;
    if magic.len() < 4 || magic[0] != 0 || magic[1] != 0 {
        return Err(malformed(path, "not an IDX file (bad magic number)"));
    }
    if magic[2] != 0x08 {
        return Err(malformed(
            path,
            format!(
                "IDX type 0x{:02x} is not supported (only unsigned bytes, 0x08)",
                magic[2]
            ),
        ));
    }
    let rank = usize::from(magic[3]);
    let mut header = Vec::with_capacity(4 * rank);
    (&mut reader)
        .take(4 * rank as u64)
        .read_to_end(&mut header)
        .map_err(read_error)?;
    if header.len() < 4 * rank {
        return Err(malformed(
            path,
            format!("truncated IDX header ({rank} dimensions announced)"),
        ));
    }
    let dims: Vec<usize> = header
        .chunks_exact(4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .collect();
    let expected = dims
        .iter()
        .try_fold(1usize, |total, &d| total.checked_mul(d))
        .filter(|&n| u64::try_from(n).is_ok_and(|n| n < u64::MAX))
        .ok_or_else(|| {
            malformed(
                path,
                format!("dimensions {dims:?} are too large (their product overflows)"),
            )
        })?;
    // One byte more than claimed tells a file with extra data from an exact one; the
    // buffer grows with the data read, never to the claim up front.
    let mut data = Vec::new();
    reader
        .take(expected as u64 + 1)
        .read_to_end(&mut data)
        .map_err(read_error)?;
    if data.len() != expected {
        let found = if data.len() > expected {
            "found more (trailing bytes)".to_string()
        } else {
            format!("found {} (truncated)", data.len())
        };
        return Err(malformed(
            path,
            format!("dimensions {dims:?} need {expected} bytes of data, {found}"),
        ));
    }
    Ok(IdxArray { dims, data })
}

/// Images `[n, rows, cols]` and their labels `[n]` as a data set: pixels scaled to
/// [0, 1], one class per label value (named by it), classes in label order.
pub fn read_idx_dataset(images: &Path, labels: &Path) -> Result<(Dataset<Vec<f32>>, usize, usize)> {
    let im = read_idx(images)?;
    let lb = read_idx(labels)?;
    let [n, rows, cols] = im.dims[..] else {
        return Err(malformed(
            images,
            format!("expected images [n, rows, cols], got {:?}", im.dims),
        ));
    };
    if lb.dims != [n] {
        return Err(malformed(
            labels,
            format!(
                "expected {n} labels to match {}, got {:?}",
                images.display(),
                lb.dims
            ),
        ));
    }
    if rows == 0 || cols == 0 {
        return Err(malformed(
            images,
            format!("images of {rows}×{cols} have no pixels"),
        ));
    }
    let mut by_label: Vec<Vec<Vec<f32>>> = vec![Vec::new(); 256];
    // read_idx checked that n·rows·cols bytes were read, so this cannot overflow.
    let pixels = rows * cols;
    for (i, &label) in lb.data.iter().enumerate() {
        by_label[usize::from(label)].push(
            im.data[i * pixels..(i + 1) * pixels]
                .iter()
                .map(|&p| f32::from(p) / 255.0)
                .collect(),
        );
    }
    let classes = by_label
        .into_iter()
        .enumerate()
        .filter(|(_, ex)| !ex.is_empty())
        .map(|(label, examples)| Class {
            name: label.to_string(),
            examples,
        })
        .collect();
    Ok((Dataset::new(classes), rows, cols))
}
