//! Labelled examples grouped by class, and class-disjoint meta-train / meta-val /
//! meta-test splits.

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::{Error, Result};

/// One class: its name and its examples.
#[derive(Debug, Clone, PartialEq)]
pub struct Class<T> {
    /// Name of the class as the source spells it (label, folder, lexicographer file).
    pub name: String,
    /// The examples of the class.
    pub examples: Vec<T>,
}

/// A set of labelled examples grouped by class: texts, token ids, images, table rows.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset<T> {
    classes: Vec<Class<T>>,
    /// Per class, the source class it was derived from (Omniglot's rotations share
    /// their character's); `None` when every class is its own.
    groups: Option<Vec<usize>>,
}

impl<T> Dataset<T> {
    /// A data set of these classes, in this order.
    pub fn new(classes: Vec<Class<T>>) -> Self {
        Self {
            classes,
            groups: None,
        }
    }

    /// A data set of these classes where `groups[i]` names the source class that
    /// class `i` was derived from (e.g. a rotation of a character): a split keeps a
    /// group's classes together, so no rotation of a test character is trained on.
    pub fn with_groups(classes: Vec<Class<T>>, groups: Vec<usize>) -> Result<Self> {
        if groups.len() != classes.len() {
            return Err(Error::InvalidArgument(format!(
                "{} class groups for {} classes",
                groups.len(),
                classes.len()
            )));
        }
        Ok(Self {
            classes,
            groups: Some(groups),
        })
    }

    /// Per class, its group ([`with_groups`](Self::with_groups)); every class its
    /// own group (its index) otherwise.
    pub fn class_groups(&self) -> Vec<usize> {
        match &self.groups {
            Some(groups) => groups.clone(),
            None => (0..self.classes.len()).collect(),
        }
    }

    /// Groups `(label, example)` pairs by label, classes in order of first appearance.
    pub fn from_labelled(pairs: impl IntoIterator<Item = (String, T)>) -> Self {
        let mut index = std::collections::HashMap::new();
        let mut classes: Vec<Class<T>> = Vec::new();
        for (label, example) in pairs {
            let i = *index.entry(label.clone()).or_insert_with(|| {
                classes.push(Class {
                    name: label,
                    examples: Vec::new(),
                });
                classes.len() - 1
            });
            classes[i].examples.push(example);
        }
        Self::new(classes)
    }

    /// The classes.
    pub fn classes(&self) -> &[Class<T>] {
        &self.classes
    }

    /// Number of classes.
    pub fn num_classes(&self) -> usize {
        self.classes.len()
    }

    /// Number of examples over all classes.
    pub fn num_examples(&self) -> usize {
        self.classes.iter().map(|c| c.examples.len()).sum()
    }

    /// Examples per class, in class order (what a sampler needs).
    pub fn class_sizes(&self) -> Vec<usize> {
        self.classes.iter().map(|c| c.examples.len()).collect()
    }

    /// Applies `f` to every example (e.g. tokenise texts once).
    pub fn map<U>(self, mut f: impl FnMut(T) -> Result<U>) -> Result<Dataset<U>> {
        let classes = self
            .classes
            .into_iter()
            .map(|c| {
                Ok(Class {
                    name: c.name,
                    examples: c.examples.into_iter().map(&mut f).collect::<Result<_>>()?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Dataset {
            classes,
            groups: self.groups,
        })
    }

    /// The data set restricted to classes `ids` (indices into [`Dataset::classes`]), in
    /// that order.
    pub fn subset(&self, ids: &[usize]) -> Result<Self>
    where
        T: Clone,
    {
        let classes = ids
            .iter()
            .map(|&i| {
                self.classes.get(i).cloned().ok_or_else(|| {
                    Error::InvalidArgument(format!(
                        "class index {i} out of range: the data set has {} classes",
                        self.classes.len()
                    ))
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self::new(classes))
    }

    /// The data set split into class-disjoint meta-train, meta-val and meta-test sets.
    pub fn split(&self, splits: &ClassSplits) -> Result<[Self; 3]>
    where
        T: Clone,
    {
        Ok([
            self.subset(&splits.train)?,
            self.subset(&splits.val)?,
            self.subset(&splits.test)?,
        ])
    }

    /// Index of the class named `name`.
    pub fn class_index(&self, name: &str) -> Option<usize> {
        self.classes.iter().position(|c| c.name == name)
    }
}

/// Class indices of the meta-train, meta-val and meta-test sets: disjoint, so that
/// no class seen in meta-training is tested (splits are by class, never by example).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassSplits {
    /// Classes to meta-train on.
    pub train: Vec<usize>,
    /// Classes to choose hyper-parameters and checkpoints on.
    pub val: Vec<usize>,
    /// Classes of the final evaluation.
    pub test: Vec<usize>,
}

impl ClassSplits {
    /// A seeded random split of `num_classes` classes: `train` and `val` are fractions
    /// of the classes (rounded down, at least one class each where fractions are
    /// positive), the test set takes the rest and must not be empty.
    pub fn by_fraction(num_classes: usize, train: f64, val: f64, seed: u64) -> Result<Self> {
        if !(0.0..=1.0).contains(&train) || !(0.0..=1.0).contains(&val) || train + val >= 1.0 {
            return Err(Error::InvalidArgument(format!(
                "split fractions must be in [0, 1] and leave classes for testing; got train \
                 {train}, val {val}"
            )));
        }
        let count = |f: f64| {
            let n = (f * num_classes as f64).floor() as usize;
            if f > 0.0 {
                n.max(1)
            } else {
                n
            }
        };
        let (n_train, n_val) = (count(train), count(val));
        if n_train + n_val >= num_classes {
            return Err(Error::InvalidArgument(format!(
                "{num_classes} classes are too few for a split of {n_train} train and {n_val} \
                 val classes with at least one test class"
            )));
        }
        let mut order: Vec<usize> = (0..num_classes).collect();
        order.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
        let test = order.split_off(n_train + n_val);
        let val = order.split_off(n_train);
        Ok(Self {
            train: order,
            val,
            test,
        })
    }

    /// [`by_fraction`](Self::by_fraction) of the groups of `groups` (per class, its
    /// group: see [`Dataset::with_groups`]): every class of a group lands in the
    /// group's set, classes in the order of their groups. With every class its own
    /// group it is `by_fraction` of the classes.
    pub fn by_fraction_of_groups(
        groups: &[usize],
        train: f64,
        val: f64,
        seed: u64,
    ) -> Result<Self> {
        let mut distinct: Vec<usize> = groups.to_vec();
        distinct.sort_unstable();
        distinct.dedup();
        let of_groups = Self::by_fraction(distinct.len(), train, val, seed)?;
        let members = |picked: &[usize]| -> Vec<usize> {
            picked
                .iter()
                .flat_map(|&g| {
                    let group = distinct[g];
                    (0..groups.len()).filter(move |&c| groups[c] == group)
                })
                .collect()
        };
        Ok(Self {
            train: members(&of_groups.train),
            val: members(&of_groups.val),
            test: members(&of_groups.test),
        })
    }

    /// A split given by class names; every name must exist and none may be in two sets.
    pub fn by_names<T>(
        dataset: &Dataset<T>,
        train: &[String],
        val: &[String],
        test: &[String],
    ) -> Result<Self> {
        let resolve = |names: &[String]| -> Result<Vec<usize>> {
            names
                .iter()
                .map(|n| {
                    dataset.class_index(n).ok_or_else(|| {
                        Error::InvalidArgument(format!("split names unknown class `{n}`"))
                    })
                })
                .collect()
        };
        let splits = Self {
            train: resolve(train)?,
            val: resolve(val)?,
            test: resolve(test)?,
        };
        splits.check_disjoint()?;
        Ok(splits)
    }

    /// An error naming the first class that is in two sets.
    pub fn check_disjoint(&self) -> Result<()> {
        let mut seen = std::collections::HashSet::new();
        for &c in self.train.iter().chain(&self.val).chain(&self.test) {
            if !seen.insert(c) {
                return Err(Error::InvalidArgument(format!(
                    "class {c} is in more than one split; splits must be class-disjoint"
                )));
            }
        }
        Ok(())
    }
}
