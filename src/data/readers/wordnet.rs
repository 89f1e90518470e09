//! WordNet definitions grouped by lexicographer file (`noun.animal`, `verb.motion`,
//! …): 26 noun and 15 verb classes, read from the `data.noun` and `data.verb` files
//! of a WordNet 3.0 installation (Debian: `apt-get install wordnet-base`).

use std::io::BufRead;
use std::path::Path;

use super::at_line;
use crate::data::{Class, Dataset};
use crate::{Error, Result};

/// Where Debian's `wordnet-base` installs the data files.
pub const WORDNET_DIR: &str = "/usr/share/wordnet";

/// Names of the lexicographer files, by number (WordNet's `lexnames`).
const LEXNAMES: [&str; 45] = [
    "adj.all",
    "adj.pert",
    "adv.all",
    "noun.Tops",
    "noun.act",
    "noun.animal",
    "noun.artifact",
    "noun.attribute",
    "noun.body",
    "noun.cognition",
    "noun.communication",
    "noun.event",
    "noun.feeling",
    "noun.food",
    "noun.group",
    "noun.location",
    "noun.motive",
    "noun.object",
    "noun.person",
    "noun.phenomenon",
    "noun.plant",
    "noun.possession",
    "noun.process",
    "noun.quantity",
    "noun.relation",
    "noun.shape",
    "noun.state",
    "noun.substance",
    "noun.time",
    "verb.body",
    "verb.change",
    "verb.cognition",
    "verb.communication",
    "verb.competition",
    "verb.consumption",
    "verb.contact",
    "verb.creation",
    "verb.emotion",
    "verb.motion",
    "verb.perception",
    "verb.possession",
    "verb.social",
    "verb.stative",
    "verb.weather",
    "adj.ppl",
];

/// Reads the definitions of `dir/data.noun` and `dir/data.verb`, one class per
/// lexicographer file, classes in file-number order. A definition is a synset's
/// gloss (after ` | `) without its quoted usage examples. The licence header (lines
/// starting with two spaces) is skipped.
pub fn read_wordnet(dir: &Path) -> Result<Dataset<String>> {
    let mut by_lexfile: Vec<Vec<String>> = vec![Vec::new(); LEXNAMES.len()];
    for name in ["data.noun", "data.verb"] {
        let path = dir.join(name);
        let file = std::fs::File::open(&path).map_err(|e| {
            Error::io(
                &path,
                std::io::Error::new(
                    e.kind(),
                    format!("{e}; install WordNet with scripts/fetch-data.sh"),
                ),
            )
        })?;
        for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
            let line_no = i as u64 + 1;
            let line = line.map_err(|e| at_line(&path, line_no, e))?;
            if line.starts_with("  ") || line.trim().is_empty() {
                continue;
            }
            let (head, gloss) = line
                .split_once(" | ")
                .ok_or_else(|| at_line(&path, line_no, "no gloss (` | `)"))?;
            let lexfile: usize = head
                .split(' ')
                .nth(1)
                .and_then(|f| f.parse().ok())
                .filter(|&n| n < LEXNAMES.len())
                .ok_or_else(|| {
                    at_line(&path, line_no, "field 2 is not a lexicographer file number")
                })?;
            // Usage examples follow the definition as `; "..."`.
            let definition = gloss.split("; \"").next().unwrap_or(gloss).trim();
            if !definition.is_empty() {
                by_lexfile[lexfile].push(definition.to_string());
            }
        }
    }
    Ok(Dataset::new(
        by_lexfile
            .into_iter()
            .enumerate()
            .filter(|(_, defs)| !defs.is_empty())
            .map(|(n, examples)| Class {
                name: LEXNAMES[n].to_string(),
                examples,
            })
            .collect(),
    ))
}
