//! Typed device buffers: a CubeCL `Handle` with the number of values it holds, so that launches can check the
//! shapes they are given (a handle's byte size may be rounded up by the allocator).

use std::marker::PhantomData;

use cubecl::prelude::*;
use cubecl::server::Handle;

use crate::KernelError;

/// `len` values of `T` on a device.
#[derive(Debug)]
pub struct Buffer<T> {
    handle: Handle,
    len: usize,
    _elem: PhantomData<T>,
}

impl<T> Clone for Buffer<T> {
    fn clone(&self) -> Self {
        Self {
            handle: self.handle.clone(),
            len: self.len,
            _elem: PhantomData,
        }
    }
}

impl<T: CubeElement> Buffer<T> {
    /// Uploads `values`.
    pub fn from_slice<R: Runtime>(client: &ComputeClient<R>, values: &[T]) -> Self {
        Self {
            handle: client.create_from_slice(T::as_bytes(values)),
            len: values.len(),
            _elem: PhantomData,
        }
    }

    /// An uninitialised buffer of `len` values.
    pub fn empty<R: Runtime>(client: &ComputeClient<R>, len: usize) -> Self {
        Self {
            handle: client.empty(len * size_of::<T>()),
            len,
            _elem: PhantomData,
        }
    }

    /// The first `len` values of an existing device allocation (e.g. a burn tensor's, so that both read the same
    /// memory). Fails when the handle holds fewer bytes.
    pub fn from_handle(handle: Handle, len: usize) -> Result<Self, KernelError> {
        let bytes = (len * size_of::<T>()) as u64;
        if handle.size_in_used() < bytes {
            return Err(KernelError::BufferTooSmall {
                what: "device allocation",
                len: handle.size_in_used() as usize / size_of::<T>().max(1),
                needed: len,
            });
        }
        Ok(Self {
            handle,
            len,
            _elem: PhantomData,
        })
    }

    /// Copies the values back to the host (waits for the work that writes them).
    pub fn read<R: Runtime>(&self, client: &ComputeClient<R>) -> Result<Vec<T>, KernelError> {
        let bytes = client
            .read_one(self.handle.clone())
            .map_err(|e| KernelError::Launch(format!("{e:?}")))?;
        Ok(T::from_bytes(&bytes)[..self.len].to_vec())
    }

    /// Values `start..start + len` of this buffer, sharing its memory (e.g. a group of rows of a batch).
    pub fn slice(&self, start: usize, len: usize) -> Result<Self, KernelError> {
        self.check("slice", start + len)?;
        Ok(Self {
            handle: self
                .handle
                .clone()
                .offset_start((start * size_of::<T>()) as u64),
            len,
            _elem: PhantomData,
        })
    }

    /// Number of values.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the buffer holds no values.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The raw handle.
    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    /// The buffer as a kernel argument of its own length.
    ///
    /// # Safety
    /// The kernel it is passed to must not index past [`Self::len`] values (launches are unchecked).
    #[allow(unsafe_code)]
    pub(crate) unsafe fn array_arg<R: Runtime>(&self) -> ArrayArg<R> {
        // SAFETY: the handle holds at least `len` values (it was created for them); the caller keeps the
        // kernel's indices below `len`.
        unsafe { ArrayArg::from_raw_parts(self.handle.clone(), self.len) }
    }

    /// Checks that the buffer holds at least `needed` values.
    pub(crate) fn check(&self, what: &'static str, needed: usize) -> Result<(), KernelError> {
        if self.len < needed {
            return Err(KernelError::BufferTooSmall {
                what,
                len: self.len,
                needed,
            });
        }
        Ok(())
    }
}
