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

#[cfg(test)]
mod tests {
    use super::*;

    /// Every 16-bit pattern of `dtype` as little-endian bytes.
    fn every_pattern() -> Vec<u8> {
        (0..=u16::MAX).flat_map(|b| b.to_le_bytes()).collect()
    }

    fn scalar(dtype: Dtype, bits: u16) -> f32 {
        match dtype {
            Dtype::F16 => f16::from_bits(bits).to_f32(),
            _ => bf16::from_bits(bits).to_f32(),
        }
    }

    #[test]
    fn every_fp16_and_bf16_pattern_decodes_like_half_and_encodes_back_to_itself() {
        let bytes = every_pattern();
        for dtype in [Dtype::F16, Dtype::BF16] {
            // Offsets 0..3 run the SIMD path's vector body and its tail at every alignment.
            for skip in 0..3 {
                let part = &bytes[2 * skip..];
                let n = part.len() / 2;
                let (mut simd, mut plain) = (vec![0f32; n], vec![0f32; n]);
                decode(true, dtype, part, &mut simd);
                decode(false, dtype, part, &mut plain);
                let mut encoded = vec![0u8; 2 * n];
                encode_into(&simd, dtype, &mut encoded);
                for i in 0..n {
                    let bits = u16::from_le_bytes([part[2 * i], part[2 * i + 1]]);
                    let want = scalar(dtype, bits);
                    let back = u16::from_le_bytes([encoded[2 * i], encoded[2 * i + 1]]);
                    if want.is_nan() {
                        assert!(
                            simd[i].is_nan() && plain[i].is_nan(),
                            "{dtype:?} {bits:#06x}"
                        );
                        assert!(scalar(dtype, back).is_nan(), "{dtype:?} {bits:#06x}");
                    } else {
                        assert_eq!(simd[i].to_bits(), want.to_bits(), "{dtype:?} {bits:#06x}");
                        assert_eq!(plain[i].to_bits(), want.to_bits(), "{dtype:?} {bits:#06x}");
                        assert_eq!(back, bits, "{dtype:?} {bits:#06x} round trip");
                    }
                    let one = &part[2 * i..2 * i + 2];
                    assert_eq!(has_nonfinite(dtype, one), !want.is_finite(), "{bits:#06x}");
                }
            }
        }
    }

    #[test]
    fn f32_and_f64_decode_exactly_and_the_nonfinite_check_sees_any_position() {
        let values = [0.0f32, -0.0, 1.5, f32::MIN_POSITIVE, f32::MAX, 3e-45];
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut out = vec![0f32; values.len()];
        decode(true, Dtype::F32, &bytes, &mut out);
        assert_eq!(out, values);
        let wide: Vec<u8> = values
            .iter()
            .flat_map(|&v| (v as f64).to_le_bytes())
            .collect();
        decode(true, Dtype::F64, &wide, &mut out);
        assert_eq!(out, values);
        let mut encoded = vec![0u8; bytes.len()];
        encode_into(&values, Dtype::F32, &mut encoded);
        assert_eq!(encoded, bytes);
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            for at in 0..values.len() {
                let mut v = values.to_vec();
                v[at] = bad;
                let b: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                assert!(has_nonfinite(Dtype::F32, &b), "{bad} at {at}");
                let w: Vec<u8> = v.iter().flat_map(|&x| (x as f64).to_le_bytes()).collect();
                assert!(has_nonfinite(Dtype::F64, &w), "{bad} at {at} (f64)");
            }
        }
        assert!(!has_nonfinite(Dtype::F32, &bytes) && !has_nonfinite(Dtype::F64, &wide));
    }

    #[test]
    fn every_fp16_and_bf16_encoding_equals_the_scalar_conversion_at_any_alignment() {
        // Ties, subnormals, values past the fp16 range and a tail shorter than a vector.
        let mut values: Vec<f32> = (0..1300).map(|i| (i as f32 - 650.0) * 0.0137).collect();
        values.extend((0..1001).map(|i| (i as f32 - 500.0) * 131.7 + (i % 7) as f32 * 1e-6));
        values.extend([1.0 + 2f32.powi(-11), 3e-8, -6e-5, 65520.0, 1e6, -0.0]);
        let mut buf = vec![0u8; 2 * values.len() + 1];
        // `encode_into` (F16C where the CPU has it) and `half`'s path that other CPUs take.
        type Encoder<'a> = &'a dyn Fn(&[f32], &mut [u8]);
        let encoders: [(Dtype, Encoder); 3] = [
            (Dtype::F16, &|v, o| encode_into(v, Dtype::F16, o)),
            (Dtype::F16, &encode_f16_half),
            (Dtype::BF16, &|v, o| encode_into(v, Dtype::BF16, o)),
        ];
        for (i, (dtype, encode)) in encoders.iter().enumerate() {
            // Both the aligned fast path and the stack-buffer path for an odd offset.
            for at in [0, 1] {
                let out = &mut buf[at..at + 2 * values.len()];
                encode(&values, out);
                for (c, &v) in out.chunks_exact(2).zip(&values) {
                    let want = match dtype {
                        Dtype::F16 => f16::from_f32(v).to_bits(),
                        _ => bf16::from_f32(v).to_bits(),
                    };
                    assert_eq!(
                        u16::from_le_bytes([c[0], c[1]]),
                        want,
                        "encoder {i} at {at}"
                    );
                }
            }
        }
    }
}
