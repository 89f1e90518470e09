//! `device`: where a run's tensors live and its ops run.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The device of a run: the CPU (the default), or a CUDA GPU by its index
/// (`cuda` is `cuda:0`). Written `cpu`, `cuda` or `cuda:N`.
///
/// ```
/// use melora::config::ComputeDevice;
///
/// assert_eq!("cuda".parse::<ComputeDevice>().unwrap(), ComputeDevice::Cuda(0));
/// assert_eq!("cuda:1".parse::<ComputeDevice>().unwrap().to_string(), "cuda:1");
/// assert!("gpu".parse::<ComputeDevice>().is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ComputeDevice {
    /// The host's processor.
    #[default]
    Cpu,
    /// The CUDA GPU of this index (as `nvidia-smi` numbers them).
    Cuda(usize),
}

/// A device name that is not `cpu`, `cuda` or `cuda:N`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownDevice(String);

impl fmt::Display for UnknownDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "unknown device `{}`; allowed: cpu, cuda, cuda:N (N the GPU's index)",
            self.0
        )
    }
}

impl std::error::Error for UnknownDevice {}

impl FromStr for ComputeDevice {
    type Err = UnknownDevice;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            _ => text
                .strip_prefix("cuda:")
                .and_then(|index| index.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| UnknownDevice(text.to_owned())),
        }
    }
}

impl fmt::Display for ComputeDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu => write!(f, "cpu"),
            Self::Cuda(index) => write!(f, "cuda:{index}"),
        }
    }
}

impl Serialize for ComputeDevice {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ComputeDevice {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}
