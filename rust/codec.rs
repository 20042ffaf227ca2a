//! Float encodings of stored tensors: fp16/bf16/f32/f64 bytes to f32 and back (SIMD where the
//! CPU has it) and the non-finite check of encoded bytes. Below the engine and the writer, which both
//! encode.

use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
use half::{bf16, f16};
use safetensors::Dtype;

/// Converts f32 values to the little-endian bytes of `dtype` (F16, BF16, F32 or F64) in `out`,
/// which holds exactly `values.len()` of them.
pub fn encode_into(values: &[f32], dtype: Dtype, out: &mut [u8]) {
    debug_assert_eq!(out.len(), values.len() * dtype.bitsize() / 8);
    match dtype {
        Dtype::F16 => {
            #[cfg(target_arch = "x86_64")]
            if is_x86_feature_detected!("avx") && is_x86_feature_detected!("f16c") {
                // SAFETY: both features were just detected.
                return unsafe { encode_f16_f16c(values, out) };
            }
            encode_f16_half(values, out)
        }
        Dtype::BF16 => encode_halves(values, out, |src, dst: &mut [u16]| {
            dst.reinterpret_cast_mut::<bf16>()
                .convert_from_f32_slice(src)
        }),
        Dtype::F64 => {
            for (d, &v) in out.chunks_exact_mut(8).zip(values) {
                d.copy_from_slice(&(v as f64).to_le_bytes());
            }
        }
        _ => {
            for (d, v) in out.chunks_exact_mut(4).zip(values) {
                d.copy_from_slice(&v.to_le_bytes());
            }
        }
    }
}

/// Whether little-endian `bytes` of float `dtype` hold a NaN or an infinity (exponent bits all
/// set): one pass over output just encoded, while it is in cache.
pub fn has_nonfinite(dtype: Dtype, bytes: &[u8]) -> bool {
    // Branch-free OR over fixed-size words, which the compiler vectorizes: this runs on every
    // output block of the engine.
    fn any<const N: usize>(bytes: &[u8], exponent: u64) -> bool {
        let mut hit = 0u64;
        for c in bytes.chunks_exact(N) {
            let mut b = [0u8; 8];
            b[..N].copy_from_slice(c);
            hit |= ((u64::from_le_bytes(b) & exponent) == exponent) as u64;
        }
        hit != 0
    }
    match dtype {
        Dtype::F16 => {
            bytes.chunks_exact(2).fold(0u16, |hit, c| {
                hit | ((u16::from_le_bytes([c[0], c[1]]) & 0x7c00) == 0x7c00) as u16
            }) != 0
        }
        Dtype::BF16 => {
            bytes.chunks_exact(2).fold(0u16, |hit, c| {
                hit | ((u16::from_le_bytes([c[0], c[1]]) & 0x7f80) == 0x7f80) as u16
            }) != 0
        }
        Dtype::F32 => any::<4>(bytes, 0x7f80_0000),
        Dtype::F64 => any::<8>(bytes, 0x7ff0_0000_0000_0000),
        _ => false,
    }
}

/// fp16 by `half`'s slice conversion.
pub(crate) fn encode_f16_half(values: &[f32], out: &mut [u8]) {
    encode_halves(values, out, |src, dst: &mut [u16]| {
        dst.reinterpret_cast_mut::<f16>()
            .convert_from_f32_slice(src)
    })
}

/// fp16 with F16C inline: `half`'s conversion costs a call per 8 values, a sixth of a
/// many-target reconstruction. Both round to nearest even, so the bytes are the same.
///
/// # Safety
/// AVX and F16C must be available.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,f16c")]
unsafe fn encode_f16_f16c(values: &[f32], out: &mut [u8]) {
    use std::arch::x86_64::*;
    let n = values.len().min(out.len() / 2);
    let mut j = 0;
    while j + 8 <= n {
        // SAFETY: floats j..j + 8 and bytes 2j..2j + 16 are in bounds (j + 8 <= n).
        let h =
            _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_loadu_ps(values.as_ptr().add(j)));
        _mm_storeu_si128(out.as_mut_ptr().add(2 * j).cast(), h);
        j += 8;
    }
    encode_f16_half(&values[j..n], &mut out[2 * j..2 * n]);
}

/// Two-byte encodings by `half`'s SIMD conversion: straight into `out` when it is aligned for
/// `u16` on a little-endian machine, else through a small stack buffer.
fn encode_halves(values: &[f32], out: &mut [u8], convert: impl Fn(&[f32], &mut [u16])) {
    // SAFETY: every bit pattern is a valid u16.
    let (head, mid, tail) = unsafe { out.align_to_mut::<u16>() };
    if cfg!(target_endian = "little") && head.is_empty() && tail.is_empty() {
        return convert(values, mid);
    }
    const STEP: usize = 512;
    let mut buf = [0u16; STEP];
    for (src, dst) in values.chunks(STEP).zip(out.chunks_mut(2 * STEP)) {
        let h = &mut buf[..src.len()];
        convert(src, h);
        for (d, &v) in dst.chunks_exact_mut(2).zip(h.iter()) {
            d.copy_from_slice(&v.to_le_bytes());
        }
    }
}

/// Little-endian bytes of a float dtype to f32 (exact for fp16, bf16 and f32), with AVX2/F16C
/// when `simd` and the CPU has them (every path gives the same values).
pub fn decode(simd: bool, dtype: Dtype, bytes: &[u8], out: &mut [f32]) {
    match dtype {
        Dtype::F16 => {
            #[cfg(target_arch = "x86_64")]
            if simd && is_x86_feature_detected!("avx2") && is_x86_feature_detected!("f16c") {
                // SAFETY: both features were just detected.
                return unsafe { decode_f16_f16c(bytes, out) };
            }
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        Dtype::BF16 => {
            #[cfg(target_arch = "x86_64")]
            if simd && is_x86_feature_detected!("avx2") {
                // SAFETY: the feature was just detected.
                return unsafe { decode_bf16_avx2(bytes, out) };
            }
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = bf16_to_f32(u16::from_le_bytes([c[0], c[1]]));
            }
        }
        Dtype::F32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        Dtype::F64 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(8)) {
                let mut b = [0u8; 8];
                b.copy_from_slice(c);
                *o = f64::from_le_bytes(b) as f32;
            }
        }
        other => unreachable!("decode called on non-float {other:?}"),
    }
}

/// bf16 is the upper half of an f32.
#[inline(always)]
fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

/// # Safety
/// AVX2 and F16C must be available.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
unsafe fn decode_f16_f16c(bytes: &[u8], out: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = out.len().min(bytes.len() / 2);
    let mut j = 0;
    while j + 8 <= n {
        // SAFETY: bytes 2j..2j + 16 and floats j..j + 8 are in bounds (j + 8 <= n).
        let h = _mm_loadu_si128(bytes.as_ptr().add(2 * j).cast());
        _mm256_storeu_ps(out.as_mut_ptr().add(j), _mm256_cvtph_ps(h));
        j += 8;
    }
    for (o, c) in out[j..n].iter_mut().zip(bytes[2 * j..].chunks_exact(2)) {
        *o = f16::from_le_bytes([c[0], c[1]]).to_f32();
    }
}

/// # Safety
/// AVX2 must be available.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn decode_bf16_avx2(bytes: &[u8], out: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = out.len().min(bytes.len() / 2);
    let mut j = 0;
    while j + 8 <= n {
        // SAFETY: as in `decode_f16_f16c`.
        let h = _mm_loadu_si128(bytes.as_ptr().add(2 * j).cast());
        let x = _mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h));
        _mm256_storeu_ps(out.as_mut_ptr().add(j), _mm256_castsi256_ps(x));
        j += 8;
    }
    for (o, c) in out[j..n].iter_mut().zip(bytes[2 * j..].chunks_exact(2)) {
        *o = bf16_to_f32(u16::from_le_bytes([c[0], c[1]]));
    }
}
