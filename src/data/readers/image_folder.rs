//! Image data sets as users have them on disk, in three layouts:
//!
//! - **miniImagenet** (Ravi & Larochelle's distribution): `images/` beside
//!   `train.csv`, `val.csv` and `test.csv`, whose rows are `filename,label` (a header
//!   row first); the three files are the class-disjoint split.
//! - **Split folders**: `train/`, `val/` and `test/`, each with one subfolder per
//!   class; the folders are the split.
//! - **Class folders** (CUB, CIFAR-FS, any data set): one subfolder per class. The
//!   split comes from a split file (CSV rows `class,split`, split `train`, `val` or
//!   `test`) or, without one, is drawn by seed.
//!
//! Images are JPEG or PNG files; hidden files (`.DS_Store`) are passed over, any
//! other file is an error naming it. Every image is decoded once, on all cores,
//! by the caller's `decode` (which resizes it for the cache).

use std::path::{Path, PathBuf};

use rayon::prelude::*;

use super::malformed;
use crate::data::{Class, ClassSplits, Dataset};
use crate::{Error, Result};

/// The largest image file read: a crafted file cannot make the reader hold
/// gigabytes (a miniImagenet JPEG is a few KiB, a CUB photo under 1 MiB).
const MAX_IMAGE_BYTES: u64 = 64 << 20;

/// An image data set read from folders: the decoded images by class, and the split
/// the layout (or the split file) gives, if any.
#[derive(Debug, Clone)]
pub struct ImageFolder<T> {
    /// The images, grouped by class (class names: the label or folder name).
    pub dataset: Dataset<T>,
    /// The meta-train/val/test classes the layout fixes; `None` for class folders
    /// without a split file (the caller draws a split).
    pub splits: Option<ClassSplits>,
}

/// The files of one class, and which split the layout puts it in.
struct ClassFiles {
    name: String,
    split: Option<SplitName>,
    files: Vec<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SplitName {
    Train,
    Val,
    Test,
}

impl SplitName {
    const ALL: [(Self, &'static str); 3] = [
        (Self::Train, "train"),
        (Self::Val, "val"),
        (Self::Test, "test"),
    ];

    fn parse(text: &str) -> Option<Self> {
        Self::ALL
            .iter()
            .find(|(_, name)| name.eq_ignore_ascii_case(text.trim()))
            .map(|(split, _)| *split)
    }
}

/// Reads the image data set at `path` (see the module documentation for the
/// layouts), decoding each file with `decode(bytes, name)`. `split_file` gives the
/// split of a class-folder layout; it is refused with the other layouts, whose
/// split is fixed.
pub fn read_image_folder<T: Send>(
    path: &Path,
    split_file: Option<&Path>,
    decode: &(dyn Fn(&[u8], &str) -> Result<T> + Sync),
) -> Result<ImageFolder<T>> {
    if !path.is_dir() {
        return Err(malformed(
            path,
            "an image data set is a folder: `images/` with train.csv/val.csv/test.csv \
             (miniImagenet), train/ val/ test/ folders of class folders, or one folder per \
             class",
        ));
    }
    let (classes, fixed) = if path.join("train.csv").is_file() {
        (mini_imagenet_classes(path)?, true)
    } else if path.join("train").is_dir() && path.join("test").is_dir() {
        (split_folder_classes(path)?, true)
    } else {
        (class_folder_classes(path, split_file)?, false)
    };
    if fixed && split_file.is_some() {
        return Err(malformed(
            path,
            "data.split_file applies to a folder of class folders; this layout's split is \
             fixed by its train/val/test files or folders: remove data.split_file",
        ));
    }
    if classes.is_empty() {
        return Err(malformed(path, "no classes (no class folders or CSV rows)"));
    }
    if let Some(empty) = classes.iter().find(|c| c.files.is_empty()) {
        return Err(malformed(
            path,
            format!("class `{}` has no JPEG or PNG images", empty.name),
        ));
    }
    let jobs: Vec<(usize, &PathBuf)> = classes
        .iter()
        .enumerate()
        .flat_map(|(c, class)| class.files.iter().map(move |f| (c, f)))
        .collect();
    let decoded: Vec<(usize, T)> = jobs
        .par_iter()
        .map(|&(c, file)| Ok((c, decode(&read_capped(file)?, &file.display().to_string())?)))
        .collect::<Result<_>>()?;
    let mut examples: Vec<Vec<T>> = classes.iter().map(|_| Vec::new()).collect();
    for (c, image) in decoded {
        examples[c].push(image);
    }
    let splits = classes.iter().all(|c| c.split.is_some()).then(|| {
        let of = |wanted: SplitName| -> Vec<usize> {
            (0..classes.len())
                .filter(|&c| classes[c].split == Some(wanted))
                .collect()
        };
        ClassSplits {
            train: of(SplitName::Train),
            val: of(SplitName::Val),
            test: of(SplitName::Test),
        }
    });
    let dataset = Dataset::new(
        classes
            .into_iter()
            .zip(examples)
            .map(|(class, examples)| Class {
                name: class.name,
                examples,
            })
            .collect(),
    );
    Ok(ImageFolder { dataset, splits })
}

fn read_capped(file: &Path) -> Result<Vec<u8>> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(file)
        .and_then(|f| f.take(MAX_IMAGE_BYTES + 1).read_to_end(&mut bytes))
        .map_err(|e| Error::io(file, e))?;
    if bytes.len() as u64 > MAX_IMAGE_BYTES {
        return Err(malformed(
            file,
            format!("larger than {MAX_IMAGE_BYTES} bytes; resize it first"),
        ));
    }
    Ok(bytes)
}

/// Whether `file` is an image melora decodes (by extension); `Err` for a visible
/// file of another kind.
fn is_image(file: &Path) -> Result<bool> {
    let name = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if name.starts_with('.') {
        return Ok(false);
    }
    let ext = file
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    if matches!(ext.as_str(), "jpg" | "jpeg" | "png") {
        Ok(true)
    } else {
        Err(malformed(
            file,
            "not a JPEG or PNG file (by its extension); melora reads .jpg, .jpeg and .png: \
             convert it or move it out of the data set",
        ))
    }
}

/// The entries of `dir`, sorted by name.
fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .map(|e| e.map(|e| e.path()).map_err(|e| Error::io(dir, e)))
        .collect::<Result<_>>()?;
    entries.sort();
    Ok(entries)
}

/// The class folders of `dir` (visible subfolders), each with its image files.
fn folder_classes(dir: &Path, split: Option<SplitName>) -> Result<Vec<ClassFiles>> {
    let mut classes = Vec::new();
    for entry in sorted_entries(dir)? {
        let name = entry
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if !entry.is_dir() || name.starts_with('.') {
            continue;
        }
        let mut files = Vec::new();
        for file in sorted_entries(&entry)? {
            if file.is_file() && is_image(&file)? {
                files.push(file);
            }
        }
        classes.push(ClassFiles { name, split, files });
    }
    Ok(classes)
}

fn split_folder_classes(path: &Path) -> Result<Vec<ClassFiles>> {
    let mut classes = Vec::new();
    for (split, name) in SplitName::ALL {
        let dir = path.join(name);
        if !dir.is_dir() {
            return Err(malformed(
                path,
                format!("has train/ and test/ but no {name}/ folder: the split-folder layout needs all three"),
            ));
        }
        classes.extend(folder_classes(&dir, Some(split))?);
    }
    check_unique_names(path, &classes)?;
    Ok(classes)
}

fn class_folder_classes(path: &Path, split_file: Option<&Path>) -> Result<Vec<ClassFiles>> {
    let mut classes = folder_classes(path, None)?;
    let Some(split_file) = split_file else {
        return Ok(classes);
    };
    let text = std::fs::read_to_string(split_file).map_err(|e| Error::io(split_file, e))?;
    let mut assigned = std::collections::HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let at = |message: String| super::at_line(split_file, i as u64 + 1, message);
        let (class, split) = line
            .rsplit_once(',')
            .ok_or_else(|| at(format!("expected `class,split`, got `{line}`")))?;
        let (class, split_text) = (class.trim(), split.trim());
        let Some(split) = SplitName::parse(split_text) else {
            if i == 0 && split_text.eq_ignore_ascii_case("split") {
                continue; // a header row
            }
            return Err(at(format!(
                "split `{split_text}` is not one of train, val, test"
            )));
        };
        if assigned.insert(class.to_owned(), split).is_some() {
            return Err(at(format!(
                "class `{class}` is listed twice; each class is in one split"
            )));
        }
    }
    for class in &mut classes {
        class.split = Some(*assigned.get(&class.name).ok_or_else(|| {
            malformed(
                split_file,
                format!(
                    "no row for class folder `{}`; add `{},train` (or val, test)",
                    class.name, class.name
                ),
            )
        })?);
    }
    if let Some(missing) = assigned
        .keys()
        .find(|name| !classes.iter().any(|c| &c.name == *name))
    {
        return Err(malformed(
            split_file,
            format!(
                "names class `{missing}`, which has no folder in {}",
                path.display()
            ),
        ));
    }
    Ok(classes)
}

fn mini_imagenet_classes(path: &Path) -> Result<Vec<ClassFiles>> {
    let images = path.join("images");
    if !images.is_dir() {
        return Err(malformed(
            path,
            "has train.csv but no images/ folder: the miniImagenet layout is images/ beside \
             train.csv, val.csv and test.csv",
        ));
    }
    let mut classes: Vec<ClassFiles> = Vec::new();
    for (split, name) in SplitName::ALL {
        let csv = path.join(format!("{name}.csv"));
        let mut reader = csv::ReaderBuilder::new()
            .has_headers(true)
            .from_path(&csv)
            .map_err(|e| malformed(&csv, format!("cannot read: {e} (the miniImagenet layout needs train.csv, val.csv and test.csv)")))?;
        let first = classes.len();
        for (i, record) in reader.records().enumerate() {
            let line = i as u64 + 2;
            let record = record.map_err(|e| super::at_line(&csv, line, e))?;
            let (Some(file), Some(label)) = (record.get(0), record.get(1)) else {
                return Err(super::at_line(&csv, line, "expected `filename,label`"));
            };
            let file = images.join(file.trim());
            if !file.is_file() {
                return Err(super::at_line(
                    &csv,
                    line,
                    format!("image {} not found", file.display()),
                ));
            }
            is_image(&file)?;
            let label = label.trim();
            match classes[first..].iter_mut().find(|c| c.name == label) {
                Some(class) => class.files.push(file),
                None => classes.push(ClassFiles {
                    name: label.to_owned(),
                    split: Some(split),
                    files: vec![file],
                }),
            }
        }
    }
    check_unique_names(path, &classes)?;
    Ok(classes)
}

/// An error naming a class that is in two splits (the splits must be
/// class-disjoint).
fn check_unique_names(path: &Path, classes: &[ClassFiles]) -> Result<()> {
    let mut seen = std::collections::HashSet::new();
    for class in classes {
        if !seen.insert(class.name.as_str()) {
            return Err(malformed(
                path,
                format!(
                    "class `{}` is in more than one split; splits must be class-disjoint",
                    class.name
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The layout tests read file bytes as they are: the decoding is the caller's.
    fn raw(bytes: &[u8], _name: &str) -> Result<Vec<u8>> {
        Ok(bytes.to_vec())
    }

    fn touch(path: &Path, bytes: &[u8]) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }

    fn error(result: Result<ImageFolder<Vec<u8>>>) -> String {
        result.expect_err("an error").to_string()
    }

    #[test]
    fn class_folders_are_read_in_name_order_without_a_split() {
        let dir = tempfile::tempdir().unwrap();
        touch(&dir.path().join("b/1.PNG"), b"b1");
        touch(&dir.path().join("b/0.jpg"), b"b0");
        touch(&dir.path().join("a/x.jpeg"), b"a");
        touch(&dir.path().join("a/.hidden"), b"");
        touch(
            &dir.path().join("notes.txt"),
            b"a file beside the class folders",
        );
        let read = read_image_folder(dir.path(), None, &raw).unwrap();
        assert!(read.splits.is_none());
        let classes = read.dataset.classes();
        assert_eq!(classes[0].name, "a");
        assert_eq!(classes[1].examples, vec![b"b0".to_vec(), b"b1".to_vec()]);
    }

    #[test]
    fn a_split_file_fixes_the_split_and_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        for class in ["cat", "dog", "eel"] {
            touch(&dir.path().join(format!("data/{class}/0.png")), b"x");
        }
        let data = dir.path().join("data");
        let split = dir.path().join("split.csv");
        std::fs::write(
            &split,
            "class,split\ncat,train\n# a comment\ndog,val\neel,test\n",
        )
        .unwrap();
        let read = read_image_folder(&data, Some(&split), &raw).unwrap();
        let splits = read.splits.unwrap();
        assert_eq!(
            (splits.train, splits.val, splits.test),
            (vec![0], vec![1], vec![2])
        );
        for (text, expected) in [
            ("cat,train\ndog,val\n", "no row for class folder `eel`"),
            (
                "cat,train\ndog,val\neel,test\nfox,test\n",
                "`fox`, which has no folder",
            ),
            (
                "cat,train\ndog,dev\neel,test\n",
                "line 2: split `dev` is not one of",
            ),
            (
                "cat,train\ncat,val\ndog,val\neel,test\n",
                "line 2: class `cat` is listed twice",
            ),
            ("cat train\n", "line 1: expected `class,split`"),
        ] {
            std::fs::write(&split, text).unwrap();
            let message = error(read_image_folder(&data, Some(&split), &raw));
            assert!(message.contains(expected), "{text:?}: {message}");
            assert!(message.contains("split.csv"), "{message}");
        }
    }

    #[test]
    fn the_mini_imagenet_layout_takes_its_split_from_the_csvs() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for (split, rows) in [
            (
                "train",
                vec![("a1.jpg", "n01"), ("a2.jpg", "n01"), ("b1.jpg", "n02")],
            ),
            ("val", vec![("c1.jpg", "n03")]),
            ("test", vec![("d1.jpg", "n04")]),
        ] {
            let mut csv = String::from("filename,label\n");
            for (file, label) in rows {
                touch(&root.join("images").join(file), file.as_bytes());
                csv.push_str(&format!("{file},{label}\n"));
            }
            std::fs::write(root.join(format!("{split}.csv")), csv).unwrap();
        }
        let read = read_image_folder(root, None, &raw).unwrap();
        let names: Vec<&str> = read
            .dataset
            .classes()
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(names, ["n01", "n02", "n03", "n04"]);
        assert_eq!(read.dataset.class_sizes(), [2, 1, 1, 1]);
        let splits = read.splits.unwrap();
        assert_eq!(
            (splits.train, splits.val, splits.test),
            (vec![0, 1], vec![2], vec![3])
        );
        // A split file does not apply; a class in two CSVs and a missing image are
        // errors naming them.
        let message = error(read_image_folder(root, Some(&root.join("x.csv")), &raw));
        assert!(message.contains("remove data.split_file"), "{message}");
        std::fs::write(root.join("test.csv"), "filename,label\nd1.jpg,n01\n").unwrap();
        let message = error(read_image_folder(root, None, &raw));
        assert!(
            message.contains("`n01` is in more than one split"),
            "{message}"
        );
        std::fs::write(root.join("test.csv"), "filename,label\nzz.jpg,n04\n").unwrap();
        let message = error(read_image_folder(root, None, &raw));
        assert!(
            message.contains("test.csv") && message.contains("line 2"),
            "{message}"
        );
        assert!(message.contains("zz.jpg not found"), "{message}");
        std::fs::remove_file(root.join("val.csv")).unwrap();
        let message = error(read_image_folder(root, None, &raw));
        assert!(message.contains("val.csv"), "{message}");
    }

    #[test]
    fn split_folders_are_the_split() {
        let dir = tempfile::tempdir().unwrap();
        for (split, class) in [("train", "a"), ("train", "b"), ("val", "c"), ("test", "d")] {
            touch(&dir.path().join(format!("{split}/{class}/0.png")), b"x");
        }
        let splits = read_image_folder(dir.path(), None, &raw)
            .unwrap()
            .splits
            .unwrap();
        assert_eq!(
            (splits.train, splits.val, splits.test),
            (vec![0, 1], vec![2], vec![3])
        );
        std::fs::remove_dir_all(dir.path().join("val")).unwrap();
        let message = error(read_image_folder(dir.path(), None, &raw));
        assert!(message.contains("no val/ folder"), "{message}");
    }

    #[test]
    fn bad_files_are_errors_naming_them() {
        let dir = tempfile::tempdir().unwrap();
        touch(&dir.path().join("a/0.png"), b"x");
        touch(&dir.path().join("a/readme.txt"), b"x");
        let message = error(read_image_folder(dir.path(), None, &raw));
        assert!(message.contains("readme.txt") && message.contains("not a JPEG or PNG"));
        std::fs::remove_file(dir.path().join("a/readme.txt")).unwrap();
        std::fs::create_dir_all(dir.path().join("empty")).unwrap();
        let message = error(read_image_folder(dir.path(), None, &raw));
        assert!(
            message.contains("class `empty` has no JPEG or PNG images"),
            "{message}"
        );
        std::fs::remove_dir_all(dir.path().join("empty")).unwrap();
        // A file that is not an image (truncated, mislabelled) fails in the decoder,
        // named.
        let transform =
            crate::data::PhotoTransform::for_config(&crate::config::DataConfig::default());
        let decode = |bytes: &[u8], name: &str| transform.decode(bytes, name);
        let err = read_image_folder(dir.path(), None, &decode)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("0.png") && err.contains("not a readable JPEG or PNG"),
            "{err}"
        );
        let message = error(read_image_folder(&dir.path().join("a/0.png"), None, &raw));
        assert!(message.contains("is a folder"), "{message}");
    }
}
