//! A memory-bandwidth probe: a grid-stride copy with 16-byte loads and stores. Benchmarks measure the card's
//! reachable bandwidth with it in the same run as the kernels they rate against it, and use it to keep the GPU
//! busy while launches queue up behind it.

use cubecl::prelude::*;

use crate::{Buffer, KernelError};

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
