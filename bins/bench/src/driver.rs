//! Device memory as the NVIDIA driver reports it (NVML, what `nvidia-smi` shows): the CUDA context and every
//! allocator's pools included, which the allocator's own counters leave out. Sampled by a thread, so that a peak
//! between two reads is seen; the figures are the device's, so other processes on the card would count too.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result};
use nvml_wrapper::Nvml;
use serde::Serialize;

/// How often the thread reads the driver's figure.
const PERIOD: Duration = Duration::from_millis(10);

/// Samples the memory used on one device until dropped.
pub struct DriverMemory {
    baseline: u64,
    current: Arc<AtomicU64>,
    peak: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl DriverMemory {
    /// Starts sampling device `index`; the memory in use now is the baseline the figures are taken from (start
    /// before the process touches the device to count its CUDA context). Fails where there is no NVIDIA driver.
    pub fn start(index: u32) -> Result<Self> {
        let nvml = nvml()?;
        let used = move |nvml: &Nvml| -> Result<u64> {
            Ok(device(nvml, index)?
                .memory_info()
                .context("NVML memory info")?
                .used)
        };
        let baseline = used(&nvml)?;
        let current = Arc::new(AtomicU64::new(baseline));
        let peak = Arc::new(AtomicU64::new(baseline));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (current, peak, stop) = (current.clone(), peak.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(now) = used(&nvml) {
                        current.store(now, Ordering::Relaxed);
                        peak.fetch_max(now, Ordering::Relaxed);
                    }
                    std::thread::sleep(PERIOD);
                }
            })
        };
        Ok(Self {
            baseline,
            current,
            peak,
            stop,
            thread: Some(thread),
        })
    }

    /// MB used now above the baseline (as of the last sample).
    pub fn used_mb(&self) -> f64 {
        self.mb(self.current.load(Ordering::Relaxed))
    }

    /// The most MB used above the baseline since the start or the last [`Self::reset_peak`].
    pub fn peak_mb(&self) -> f64 {
        self.mb(self.peak.load(Ordering::Relaxed))
    }

    /// Starts a new peak from the memory used now.
    pub fn reset_peak(&self) {
        std::thread::sleep(PERIOD * 2);
        self.peak
            .store(self.current.load(Ordering::Relaxed), Ordering::Relaxed);
    }

    fn mb(&self, bytes: u64) -> f64 {
        bytes.saturating_sub(self.baseline) as f64 / 1e6
    }
}

impl Drop for DriverMemory {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            thread.join().ok();
        }
    }
}

/// The card and driver a report was measured with, as NVML reports them.
#[derive(Debug, Serialize)]
pub struct Gpu {
    pub name: String,
    /// `major.minor`, e.g. `9.0` for Hopper.
    pub compute_capability: String,
    pub driver: String,
    /// The CUDA version the driver supports, e.g. `13.0`.
    pub cuda: String,
    pub memory_mb: f64,
}

impl Gpu {
    /// Device `index`'s figures; fails where there is no NVIDIA driver.
    pub fn probe(index: u32) -> Result<Self> {
        let nvml = nvml()?;
        let device = device(&nvml, index)?;
        let cc = device
            .cuda_compute_capability()
            .context("compute capability")?;
        let cuda = nvml
            .sys_cuda_driver_version()
            .context("CUDA driver version")?;
        Ok(Self {
            name: device.name().context("device name")?,
            compute_capability: format!("{}.{}", cc.major, cc.minor),
            driver: nvml.sys_driver_version().context("driver version")?,
            cuda: format!("{}.{}", cuda / 1000, (cuda % 1000) / 10),
            memory_mb: device.memory_info().context("NVML memory info")?.total as f64 / 1e6,
        })
    }
}

/// The NVIDIA driver's management library.
fn nvml() -> Result<Nvml> {
    Nvml::init().context("loading NVML (the NVIDIA driver's management library)")
}

/// Device `index` of `nvml`.
fn device(nvml: &Nvml, index: u32) -> Result<nvml_wrapper::Device<'_>> {
    nvml.device_by_index(index)
        .with_context(|| format!("NVML device {index}"))
}
