//! Outputs held in caller-owned memory: every tensor of every output as one byte buffer, float
//! tensors as f32 and the others in their stored dtype.

use std::marker::PhantomData;

use safetensors::Dtype;

use crate::engine::Sink;
use crate::error::{PhemaError, Result};
use crate::format::header::{is_float, TensorEntry};

/// One buffer: where it starts and how many bytes it holds.
#[derive(Clone, Copy)]
struct Raw(*mut u8, usize);

/// A sink writing into `buffers[output][tensor]`, borrowed for its lifetime.
pub struct MemorySink<'a> {
    buffers: Vec<Vec<Raw>>,
    _borrow: PhantomData<&'a mut [u8]>,
}

// SAFETY: the buffers are borrowed mutably for 'a, so nothing else touches them; the engine
// writes disjoint ranges from several threads, each bounds-checked in `write`.
unsafe impl Send for MemorySink<'_> {}
unsafe impl Sync for MemorySink<'_> {}

impl<'a> MemorySink<'a> {
    /// A sink over `buffers[output][tensor]`, checked against the output `layout`: one buffer per
    /// tensor, 4 bytes per element for float tensors and the stored size for the others.
    pub fn new(buffers: Vec<Vec<&'a mut [u8]>>, layout: &[TensorEntry]) -> Result<Self> {
        let mut raw = Vec::with_capacity(buffers.len());
        for per_output in buffers {
            if per_output.len() != layout.len() {
                return Err(PhemaError::Invalid(format!(
                    "{} buffers for {} tensors",
                    per_output.len(),
                    layout.len()
                )));
            }
            let mut v = Vec::with_capacity(per_output.len());
            for (b, t) in per_output.into_iter().zip(layout) {
                let want = if is_float(t.dtype) {
                    t.numel().saturating_mul(4)
                } else {
                    usize::try_from(t.nbytes).unwrap_or(usize::MAX)
                };
                if b.len() != want {
                    return Err(PhemaError::Invalid(format!(
                        "buffer for `{}` has {} bytes, expected {want}",
                        t.name,
                        b.len()
                    )));
                }
                v.push(Raw(b.as_mut_ptr(), b.len()));
            }
            raw.push(v);
        }
        Ok(MemorySink {
            buffers: raw,
            _borrow: PhantomData,
        })
    }

    fn write(&self, output: usize, tensor: usize, byte_offset: usize, src: &[u8]) -> Result<()> {
        let b = self
            .buffers
            .get(output)
            .and_then(|t| t.get(tensor))
            .copied()
            .ok_or_else(|| PhemaError::Invalid("no output buffer for this tensor".into()))?;
        if byte_offset
            .checked_add(src.len())
            .is_none_or(|end| end > b.1)
        {
            return Err(PhemaError::Invalid("output buffer too small".into()));
        }
        // SAFETY: in bounds (checked above), borrowed for 'a; the engine writes disjoint ranges.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), b.0.add(byte_offset), src.len()) };
        Ok(())
    }
}

impl Sink for MemorySink<'_> {
    fn dtype(&self, _: usize, _: usize) -> Dtype {
        Dtype::F32
    }
    fn put(&self, output: usize, tensor: usize, off: usize, bytes: &[u8]) -> Result<()> {
        self.write(output, tensor, off.saturating_mul(4), bytes)
    }
    fn put_raw(&self, output: usize, tensor: usize, bytes: &[u8]) -> Result<()> {
        self.write(output, tensor, 0, bytes)
    }
}
