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
pub fn read_idx(path: &Path) -> Result<IdxArray> {
    let raw = std::fs::read(path).map_err(|e| {
        Error::io(
            path,
            std::io::Error::new(
                e.kind(),
                format!("{e}; install Fashion-MNIST with scripts/fetch-data.sh"),
            ),
        )
    })?;
    let bytes = if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(raw.as_slice())
            .read_to_end(&mut out)
            .map_err(|e| malformed(path, format!("corrupt or truncated gzip data: {e}")))?;
        out
    } else {
        raw
    };
    if bytes.len() < 4 || bytes[0] != 0 || bytes[1] != 0 {
        return Err(malformed(path, "not an IDX file (bad magic number)"));
    }
    if bytes[2] != 0x08 {
        return Err(malformed(
            path,
            format!(
                "IDX type 0x{:02x} is not supported (only unsigned bytes, 0x08)",
                bytes[2]
            ),
        ));
    }
    let rank = usize::from(bytes[3]);
    let header = 4 + 4 * rank;
    if bytes.len() < header {
        return Err(malformed(path, "truncated IDX header"));
    }
    let dims: Vec<usize> = (0..rank)
        .map(|i| {
            let b = &bytes[4 + 4 * i..8 + 4 * i];
            u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize
        })
        .collect();
    let expected = dims.iter().product::<usize>();
    let found = bytes.len() - header;
    if found != expected {
        return Err(malformed(
            path,
            format!(
                "dimensions {dims:?} need {expected} bytes of data, found {found}{}",
                if found < expected { " (truncated)" } else { "" }
            ),
        ));
    }
    Ok(IdxArray {
        dims,
        data: bytes[header..].to_vec(),
    })
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
    let mut by_label: Vec<Vec<Vec<f32>>> = vec![Vec::new(); 256];
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
