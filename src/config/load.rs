//! Reading YAML into a [`Config`] and turning serde's errors into one-line
//! [`Error::Config`] messages that name the dotted key.

use std::path::Path;

use super::Config;
use crate::{Error, Result};

/// Key reported for errors about the document as a whole (not a mapping,
/// several documents, bad syntax).
const TOP_LEVEL: &str = "(top level)";

/// Parses without validating; `file` only names the source in messages.
pub(super) fn parse(text: &str, file: Option<&Path>) -> Result<Config> {
    let deserializer = serde_norway::Deserializer::from_str(text);
    serde_path_to_error::deserialize(deserializer).map_err(|e| parse_error(e, file))
}

/// Reads and parses `path` without validating.
pub(super) fn read(path: &Path) -> Result<Config> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    parse(&text, Some(path))
}

fn parse_error(err: serde_path_to_error::Error<serde_norway::Error>, file: Option<&Path>) -> Error {
    let at_root = err.path().iter().next().is_none();
    let key = err.path().to_string();
    let inner = err.into_inner();
    let location = inner.location();
    let mut message = inner.to_string();
    // serde_norway writes "<its path>: <message> at line L column C"; the key
    // and the place are reported once, in our own format, so both are cut.
    if let Some(loc) = &location {
        let suffix = format!(" at line {} column {}", loc.line(), loc.column());
        if let Some(stripped) = message.strip_suffix(&suffix) {
            message = stripped.to_owned();
        }
    }
    if !at_root {
        message = strip_key_prefix(&message, &key).to_owned();
    }
    let message = message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    let place = location.map(|l| format!("line {}, column {}", l.line(), l.column()));
    match (file, at_root) {
        (Some(path), true) => Error::Format {
            path: path.to_owned(),
            message: match place {
                Some(place) => format!("not a valid melora config: {message} ({place})"),
                None => format!("not a valid melora config: {message}"),
            },
        },
        (file, _) => {
            let source = [file.map(|f| f.display().to_string()), place]
                .into_iter()
                .flatten()
                .collect::<Vec<_>>();
            let message = if source.is_empty() {
                message
            } else {
                format!("{message} ({})", source.join(", "))
            };
            let key = if at_root { TOP_LEVEL.to_owned() } else { key };
            Error::Config { key, message }
        }
    }
}

/// Cuts `"<p>: "` from `message`, `p` being `key` or one of its ancestors
/// (for an unknown field serde_norway names the enclosing mapping).
fn strip_key_prefix<'a>(message: &'a str, key: &str) -> &'a str {
    let mut candidate = key;
    loop {
        if let Some(rest) = message
            .strip_prefix(candidate)
            .and_then(|r| r.strip_prefix(": "))
        {
            return rest;
        }
        match candidate.rfind(['.', '[']) {
            Some(i) => candidate = &candidate[..i],
            None => return message,
        }
    }
}

/// Appends `note` to the message of a configuration error.
pub(super) fn annotate(err: Error, note: impl FnOnce(&str) -> Option<String>) -> Error {
    match err {
        Error::Config { key, message } => {
            let message = match note(&key) {
                Some(note) => format!("{message} ({note})"),
                None => message,
            };
            Error::Config { key, message }
        }
        other => other,
    }
}
