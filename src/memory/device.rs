//! Memory of a CUDA device, beside the host heap the counting allocator measures.
//!
//! candle allocates device buffers with cudarc's stream-ordered allocator
//! (`cuMemAllocAsync`), from the device's current memory pool, on every device
//! that supports it (CUDA 11.2 and later drivers, every GPU since Pascal on
//! Linux). The pool counts the bytes of the allocations made and not yet freed
//! (`CU_MEMPOOL_ATTR_USED_MEM_CURRENT`) and their high-water mark
//! (`CU_MEMPOOL_ATTR_USED_MEM_HIGH`, which a write of 0 resets): the live tensor
//! bytes, to the byte, as the counting allocator gives them on the host. What the
//! pool keeps from the driver for reuse (`RESERVED`) is reported beside them.
//! Where a device has no stream-ordered allocation, cudarc calls `cuMemAlloc`,
//! outside any pool; then only the device's used memory (`cuMemGetInfo`, every
//! process together) is available, and the reading says it is not exact.

use candle_core::Device;
use serde::Serialize;

use super::meter::MemoryMeter;
use crate::Result;

/// A reading of a device's memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct DeviceMemoryReading {
    /// Bytes of live allocations.
    pub used_bytes: u64,
    /// The highest `used_bytes` since the peak was last reset ([`reset_device_peak`]).
    pub peak_bytes: u64,
    /// Bytes the memory pool holds from the driver, live and cached.
    pub reserved_bytes: u64,
    /// Whether the figures are the pool's own counts of this process's allocations
    /// (`false`: the whole device's usage, all processes, from `cuMemGetInfo`).
    pub exact: bool,
}

/// The memory of `device`: `None` for the CPU (whose tensors are on the heap).
pub fn device_memory(device: &Device) -> Result<Option<DeviceMemoryReading>> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(cuda) => cuda_pool::read(cuda).map(Some),
        _ => Ok(None),
    }
}

/// Starts a new peak of `device`'s memory from its current use (nothing on the CPU).
pub fn reset_device_peak(device: &Device) -> Result<()> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(cuda) => cuda_pool::reset_peak(cuda),
        _ => Ok(()),
    }
}

/// Bytes a new run could use on `device`: for a GPU the free memory the driver
/// reports (`cuMemGetInfo`, what every process leaves), for the CPU the memory the
/// kernel reports available (`MemAvailable`); `None` where that cannot be read.
pub fn free_memory_bytes(device: &Device) -> Result<Option<u64>> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(cuda) => cuda_pool::free(cuda).map(Some),
        _ => Ok(super::rss::available_memory_bytes()),
    }
}

/// Measures the peak of a scope in the memory that holds `device`'s tensors: the
/// host heap (a [`MemoryMeter`]) for the CPU, the device's memory pool for a GPU.
///
/// On a GPU, starting a meter restarts the device's peak from its current use
/// ([`reset_device_peak`]): device meters do not nest as heap meters do, so an
/// enclosing meter's peak must be read before an inner one starts.
///
/// ```
/// use candle_core::Device;
/// use melora::memory::TensorMeter;
///
/// let meter = TensorMeter::start(&Device::Cpu)?;
/// let buffer = vec![0u8; 1 << 20];
/// drop(buffer);
/// // On the CPU the heap meter's figures (zero without the counting allocator).
/// let _peak = meter.peak_above_baseline()?;
/// # Ok::<(), melora::Error>(())
/// ```
#[derive(Debug)]
pub enum TensorMeter {
    /// The CPU's tensors, on the host heap.
    Heap(MemoryMeter),
    /// A GPU's tensors, in its memory pool.
    Device {
        /// The device measured.
        device: Device,
        /// Its live bytes when the meter started.
        baseline: u64,
    },
}

impl TensorMeter {
    /// Starts measuring where `device` keeps its tensors.
    #[must_use = "a meter measures until it is dropped; bind it to a variable"]
    pub fn start(device: &Device) -> Result<Self> {
        match device_memory(device)? {
            None => Ok(TensorMeter::Heap(MemoryMeter::start())),
            Some(reading) => {
                reset_device_peak(device)?;
                Ok(TensorMeter::Device {
                    device: device.clone(),
                    baseline: reading.used_bytes,
                })
            }
        }
    }

    /// Live bytes now minus those at the start (negative when the scope freed more
    /// than it allocated).
    pub fn current_above_baseline(&self) -> Result<i64> {
        match self {
            TensorMeter::Heap(meter) => Ok(meter.current_above_baseline()),
            TensorMeter::Device { device, baseline } => {
                let used = device_memory(device)?.map_or(*baseline, |r| r.used_bytes);
                Ok(used as i64 - *baseline as i64)
            }
        }
    }

    /// How far the live bytes rose above the start at their highest.
    pub fn peak_above_baseline(&self) -> Result<u64> {
        match self {
            TensorMeter::Heap(meter) => Ok(meter.peak_above_baseline() as u64),
            TensorMeter::Device { device, baseline } => {
                let peak = device_memory(device)?.map_or(*baseline, |r| r.peak_bytes);
                Ok(peak.saturating_sub(*baseline))
            }
        }
    }

    /// Whether the figures are a GPU's (`false`: the host heap's).
    pub fn is_device(&self) -> bool {
        matches!(self, TensorMeter::Device { .. })
    }
}

#[cfg(feature = "cuda")]
mod cuda_pool {
    use candle_core::cuda_backend::cudarc::driver::{result, sys, DriverError};
    use candle_core::CudaDevice;

    use super::DeviceMemoryReading;
    use crate::Result;

    fn driver(e: DriverError) -> crate::Error {
        candle_core::Error::wrap(e).into()
    }

    /// The current memory pool of `device`'s GPU, `None` where allocations bypass
    /// pools; the device's context is made current on this thread first.
    fn pool(device: &CudaDevice) -> Result<Option<sys::CUmemoryPool>> {
        let stream = device.cuda_stream();
        let context = stream.context();
        context.bind_to_thread().map_err(driver)?;
        if !context.has_async_alloc() {
            return Ok(None);
        }
        // SAFETY: the device comes from a live context.
        let pool = unsafe { result::device::get_mem_pool(context.cu_device()) }.map_err(driver)?;
        Ok(Some(pool))
    }

    fn attribute(pool: sys::CUmemoryPool, attr: sys::CUmemPool_attribute) -> Result<u64> {
        let mut value: u64 = 0;
        // SAFETY: these attributes are cuuint64_t values.
        unsafe { result::mem_pool::get_attribute(pool, attr, (&mut value as *mut u64).cast()) }
            .map_err(driver)?;
        Ok(value)
    }

    pub(super) fn read(device: &CudaDevice) -> Result<DeviceMemoryReading> {
        use sys::CUmemPool_attribute::*;
        match pool(device)? {
            Some(pool) => Ok(DeviceMemoryReading {
                used_bytes: attribute(pool, CU_MEMPOOL_ATTR_USED_MEM_CURRENT)?,
                peak_bytes: attribute(pool, CU_MEMPOOL_ATTR_USED_MEM_HIGH)?,
                reserved_bytes: attribute(pool, CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT)?,
                exact: true,
            }),
            None => {
                let (free, total) = result::mem_get_info().map_err(driver)?;
                let used = (total - free) as u64;
                Ok(DeviceMemoryReading {
                    used_bytes: used,
                    peak_bytes: used,
                    reserved_bytes: used,
                    exact: false,
                })
            }
        }
    }

    pub(super) fn free(device: &CudaDevice) -> Result<u64> {
        device
            .cuda_stream()
            .context()
            .bind_to_thread()
            .map_err(driver)?;
        let (free, _total) = result::mem_get_info().map_err(driver)?;
        Ok(free as u64)
    }

    pub(super) fn reset_peak(device: &CudaDevice) -> Result<()> {
        if let Some(pool) = pool(device)? {
            let mut zero: u64 = 0;
            // SAFETY: USED_MEM_HIGH takes a cuuint64_t; 0 resets it to the current use.
            unsafe {
                result::mem_pool::set_attribute(
                    pool,
                    sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                    (&mut zero as *mut u64).cast(),
                )
            }
            .map_err(driver)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CPU's tensors are on the heap: no device reading, and a reset is a no-op.
    #[test]
    fn the_cpu_has_no_device_memory() {
        assert_eq!(device_memory(&Device::Cpu).unwrap(), None);
        reset_device_peak(&Device::Cpu).unwrap();
    }

    /// On the CPU a tensor meter is the heap meter, and a run could use what the
    /// kernel reports available (at most the machine's memory).
    #[test]
    fn the_cpu_is_measured_on_the_heap() {
        let meter = TensorMeter::start(&Device::Cpu).unwrap();
        assert!(!meter.is_device());
        let buffer = vec![1u8; 1 << 16];
        if crate::memory::is_installed() {
            assert!(meter.current_above_baseline().unwrap() >= 1 << 16);
        }
        drop(buffer);
        if crate::memory::is_installed() {
            assert!(meter.peak_above_baseline().unwrap() >= 1 << 16);
        }
        let free = free_memory_bytes(&Device::Cpu).unwrap().unwrap();
        let total = crate::memory::physical_memory_bytes().unwrap();
        assert!(free > 0 && free <= total, "{free} of {total}");
    }
}
