//! Readers of real data sets. Every reader decodes the whole set once into a
//! [`super::Dataset`] and fails with an error naming the file (and the line, where
//! there are lines) of missing or malformed input.

mod idx;
mod image;
mod image_folder;
mod omniglot;
mod tabular;
mod text;
mod wordnet;

pub use self::image::{decode_png_grey, prepare_grey_png, resize_area, rotate90};
pub use idx::{read_idx, read_idx_dataset, IdxArray};
pub use image_folder::{read_image_folder, ImageFolder};
pub use omniglot::{read_omniglot, OmniglotOptions};
pub use tabular::{read_tabular, Tabular};
pub use text::{read_text_csv, read_text_items, read_text_jsonl, TextColumns, TextItem};
pub use wordnet::{read_wordnet, WORDNET_DIR};

use std::path::Path;

use crate::Error;

/// An [`Error::Format`] for `path` at 1-based `line`.
pub(crate) fn at_line(path: &Path, line: u64, message: impl std::fmt::Display) -> Error {
    Error::Format {
        path: path.into(),
        message: format!("line {line}: {message}"),
    }
}

/// An [`Error::Format`] for `path`.
pub(crate) fn malformed(path: &Path, message: impl Into<String>) -> Error {
    Error::Format {
        path: path.into(),
        message: message.into(),
    }
}
