//! Omniglot characters (Lake et al.): one class per character of an alphabet, 20
//! drawings each, from the original zip archives (`images_background.zip`, …) or
//! their extracted folders (`alphabet/characterNN/*.png`).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use super::image::{prepare_grey_png, rotate90};
use super::malformed;
use crate::data::{Class, Dataset};
use crate::{Error, Result};

/// The largest PNG read from a zip archive (an Omniglot drawing is a few KiB): a
/// crafted entry cannot make the reader inflate gigabytes.
const MAX_PNG_BYTES: u64 = 64 << 20;

/// How Omniglot images are prepared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OmniglotOptions {
    /// Side of the square images after area-averaging resize (105 is the original).
    pub image_size: usize,
    /// Add each character rotated by 90°, 180° and 270° as three new classes.
    pub rotations: bool,
}

impl Default for OmniglotOptions {
    fn default() -> Self {
        Self {
            image_size: 28,
            rotations: false,
        }
    }
}

/// Reads Omniglot from `path`: a zip archive, a folder of zip archives (all read, in
/// name order), or an extracted folder. Images are grey, resized, and inverted so that
/// strokes are 1 and paper 0. Classes are named `alphabet/characterNN` and sorted; a
/// character found in several archives (the small background sets share Greek and
/// Latin: same characters, other drawers) is one class with all its drawings.
pub fn read_omniglot(path: &Path, options: &OmniglotOptions) -> Result<Dataset<Vec<f32>>> {
    if options.image_size == 0 || options.image_size > crate::config::MAX_IMAGE_SIZE {
        return Err(Error::InvalidArgument(format!(
            "image_size must be in 1..={} (data.image_size), got {}",
            crate::config::MAX_IMAGE_SIZE,
            options.image_size
        )));
    }
    let mut classes: BTreeMap<String, Vec<Vec<f32>>> = BTreeMap::new();
    let meta = std::fs::metadata(path).map_err(|e| {
        Error::io(
            path,
            std::io::Error::new(
                e.kind(),
                format!("{e}; give the Omniglot zip or folder (--omniglot PATH / data.path)"),
            ),
        )
    })?;
    if meta.is_file() {
        read_zip(path, options, &mut classes)?;
    } else {
        let mut zips: Vec<_> = std::fs::read_dir(path)
            .map_err(|e| Error::io(path, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e.eq_ignore_ascii_case("zip")))
            .collect();
        zips.sort();
        if zips.is_empty() {
            read_folder(path, path, options, &mut classes)?;
        }
        for zip in zips {
            read_zip(&zip, options, &mut classes)?;
        }
    }
    if classes.is_empty() {
        return Err(malformed(
            path,
            "no Omniglot images (expected alphabet/characterNN/*.png)",
        ));
    }
    let mut out = Vec::new();
    let mut groups = Vec::new();
    for (character, (name, images)) in classes.into_iter().enumerate() {
        let first = out.len();
        if options.rotations {
            for turns in 1..4 {
                out.push(Class {
                    name: format!("{name}/rot{}", turns * 90),
                    examples: images
                        .iter()
                        .map(|im| rotate90(im, options.image_size, turns))
                        .collect(),
                });
            }
        }
        out.push(Class {
            name,
            examples: images,
        });
        groups.extend(std::iter::repeat_n(character, out.len() - first));
    }
    // A character's rotations are new classes of its split: none of a test
    // character's rotations is trained on (as Vinyals et al. and MAML split).
    Dataset::with_groups(out, groups)
}

/// The class (`alphabet/character`) of a PNG at `parts` (path components), if any.
fn class_of(parts: &[&str]) -> Option<String> {
    let n = parts.len();
    let is_png = parts.last()?.to_ascii_lowercase().ends_with(".png");
    (is_png && n >= 3).then(|| format!("{}/{}", parts[n - 3], parts[n - 2]))
}

fn prepare(bytes: &[u8], name: &str, options: &OmniglotOptions) -> Result<Vec<f32>> {
    prepare_grey_png(bytes, name, options.image_size, true)
}

fn read_zip(
    path: &Path,
    options: &OmniglotOptions,
    classes: &mut BTreeMap<String, Vec<Vec<f32>>>,
) -> Result<()> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut archive = zip::ZipArchive::new(std::io::BufReader::new(file))
        .map_err(|e| malformed(path, format!("not a readable zip archive: {e}")))?;
    let mut bytes = Vec::new();
    for i in 0..archive.len() {
        let mut entry = archive
            .by_index(i)
            .map_err(|e| malformed(path, format!("zip entry {i}: {e}")))?;
        let name = entry
            .name()
            .map_err(|e| malformed(path, format!("zip entry {i}: {e}")))?
            .into_owned();
        let parts: Vec<&str> = name.split('/').filter(|p| !p.is_empty()).collect();
        let Some(class) = class_of(&parts) else {
            continue;
        };
        bytes.clear();
        // The entry's recorded size may lie: read at most one byte past the limit.
        (&mut entry)
            .take(MAX_PNG_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| malformed(path, format!("{name}: {e}")))?;
        if bytes.len() as u64 > MAX_PNG_BYTES {
            return Err(malformed(
                path,
                format!("{name}: larger than {MAX_PNG_BYTES} bytes, not an Omniglot drawing"),
            ));
        }
        let label = format!("{}: {name}", path.display());
        classes
            .entry(class)
            .or_default()
            .push(prepare(&bytes, &label, options)?);
    }
    Ok(())
}

fn read_folder(
    root: &Path,
    dir: &Path,
    options: &OmniglotOptions,
    classes: &mut BTreeMap<String, Vec<Vec<f32>>>,
) -> Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    for entry in entries {
        if entry.is_dir() {
            read_folder(root, &entry, options, classes)?;
            continue;
        }
        let relative = entry.strip_prefix(root).unwrap_or(&entry);
        let parts: Vec<String> = relative
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect();
        let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
        let Some(class) = class_of(&parts) else {
            continue;
        };
        let bytes = std::fs::read(&entry).map_err(|e| Error::io(&entry, e))?;
        let name = entry.display().to_string();
        classes
            .entry(class)
            .or_default()
            .push(prepare(&bytes, &name, options)?);
    }
    Ok(())
}
