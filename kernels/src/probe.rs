//! A memory-bandwidth probe: a grid-stride copy with 16-byte loads and stores. Benchmarks measure the card's
//! reachable bandwidth with it in the same run as the kernels they rate against it, and use it to keep the GPU
//! busy while launches queue up behind it.

use std::time::Instant;

use cubecl::prelude::*;

use crate::{Buffer, KernelError};

/// Waits for every launch queued on `client`.
pub fn sync<R: Runtime>(client: &ComputeClient<R>) -> Result<(), KernelError> {
    cubecl::future::block_on(client.sync()).map_err(|e| KernelError::Sync(format!("{e:?}")))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The card's copy bandwidth, measured with [`copy`], and a timer of launches against it: launches queued behind
/// two copies that outlast their enqueueing run back to back on the GPU, so the time past the copies' is the
/// GPU's own time per launch, whatever the host's launch cost. Holds its two buffers while it lives.
#[derive(Debug)]
pub struct CopyProbe {
    src: Buffer<u32>,
    dst: Buffer<u32>,
    /// One copy's time (median of 5 runs of 4 after 3 to warm up).
    pub seconds: f64,
    /// Bytes read and written per second / 1e9.
    pub gb_per_s: f64,
}

impl CopyProbe {
    /// Measures copies of `gib` GiB each way.
    pub fn measure<R: Runtime>(client: &ComputeClient<R>, gib: f64) -> Result<Self, KernelError> {
        let len = ((gib * (1u64 << 30) as f64) as usize / 16) * 4;
        let src = Buffer::<u32>::from_slice(client, &vec![1u32; len]);
        let dst = Buffer::<u32>::empty(client, len);
        let time_copy = |reps: usize| -> Result<f64, KernelError> {
            sync(client)?;
            let start = Instant::now();
            for _ in 0..reps {
                copy(client, &src, &dst)?;
            }
            sync(client)?;
            Ok(start.elapsed().as_secs_f64() / reps as f64)
        };
        time_copy(3)?;
        let seconds = median((0..5).map(|_| time_copy(4)).collect::<Result<_, _>>()?);
        let gb_per_s = 2.0 * (len * 4) as f64 / seconds / 1e9;
        Ok(Self {
            src,
            dst,
            seconds,
            gb_per_s,
        })
    }

    /// Times `launch`: `(GPU s, launch s)`, the GPU time of one launch (`n` launches queued behind two copies,
    /// minus the copies' time; median of 5) and the wall time per launch back to back from the host.
    pub fn time<R: Runtime, E: From<KernelError>>(
        &self,
        client: &ComputeClient<R>,
        n: usize,
        mut launch: impl FnMut() -> Result<(), E>,
    ) -> Result<(f64, f64), E> {
        launch()?;
        sync(client)?;
        let start = Instant::now();
        for _ in 0..n {
            launch()?;
        }
        sync(client)?;
        let launch_s = start.elapsed().as_secs_f64() / n as f64;
        let mut queued = Vec::with_capacity(5);
        for _ in 0..5 {
            sync(client)?;
            let start = Instant::now();
            copy(client, &self.src, &self.dst)?;
            copy(client, &self.src, &self.dst)?;
            for _ in 0..n {
                launch()?;
            }
            sync(client)?;
            queued.push((start.elapsed().as_secs_f64() - 2.0 * self.seconds) / n as f64);
        }
        Ok((median(queued).max(1e-9), launch_s))
    }
}

/// Units per cube of the copy.
const UNITS: u32 = 256;

/// Copies `src` into `dst` (same length, a multiple of 4 values).
pub fn copy<R: Runtime>(
    client: &ComputeClient<R>,
    src: &Buffer<u32>,
    dst: &Buffer<u32>,
) -> Result<(), KernelError> {
    if !src.len().is_multiple_of(4) || src.is_empty() {
        return Err(KernelError::Unsupported(format!(
            "copy of {} values: a non-zero multiple of 4 is needed",
            src.len()
        )));
    }
    dst.check("dst", src.len())?;
    let vectors = src.len() / 4;
    let cubes = (vectors as u32).div_ceil(UNITS).min(4096);
    // SAFETY: both arrays are passed with their own lengths and the kernel reads and writes below `src.len()`.
    #[allow(unsafe_code)]
    unsafe {
        copy_kernel::launch_unchecked::<R>(
            client,
            CubeCount::Static(cubes, 1, 1),
            CubeDim::new_1d(UNITS),
            ArrayArg::from_raw_parts(src.handle().clone(), src.len()),
            ArrayArg::from_raw_parts(dst.handle().clone(), dst.len()),
        );
    }
    Ok(())
}

#[cube(launch_unchecked)]
fn copy_kernel(src: &Array<Vector<u32, Const<4>>>, dst: &mut Array<Vector<u32, Const<4>>>) {
    let stride = (CUBE_COUNT_X * CUBE_DIM_X) as usize;
    let mut i = ABSOLUTE_POS;
    while i < src.len() {
        dst[i] = src[i];
        i += stride;
    }
}
