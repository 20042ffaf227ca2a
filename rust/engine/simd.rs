//! The per-element kernels of the engine: every output element is `fma(x_i, w_ik, acc)` over
//! the inputs in order, on whichever instruction set the CPU has.

/// The instruction set the kernels use, chosen once per run from what the CPU has. Every choice
/// gives bit-identical results: each output element is `fma(x_i, w_ik, acc)` over the inputs `i`
/// in the same order, skipping zero weights, starting from `+0.0`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Isa {
    /// Plain Rust (`f32::mul_add`), any CPU.
    Portable,
    /// x86-64 AVX2 + FMA + F16C: 8 elements x up to 8 targets in `ymm` registers.
    Avx2,
    /// x86-64 AVX-512F (with the AVX2 + F16C decoders): 32 elements x up to 8 targets in `zmm`.
    Avx512,
}

impl Isa {
    pub(super) fn detect() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
            {
                if is_x86_feature_detected!("avx512f") {
                    return Isa::Avx512;
                }
                return Isa::Avx2;
            }
        }
        Isa::Portable
    }

    /// Targets accumulated in registers at once.
    pub(super) fn group(self) -> usize {
        8
    }

    /// The instruction sets this CPU can run, for tests.
    #[cfg(test)]
    pub(super) fn available() -> Vec<Isa> {
        match Isa::detect() {
            Isa::Avx512 => vec![Isa::Portable, Isa::Avx2, Isa::Avx512],
            Isa::Avx2 => vec![Isa::Portable, Isa::Avx2],
            Isa::Portable => vec![Isa::Portable],
        }
    }
}

/// The weights arranged for the micro-kernels.
pub(super) struct Kernel {
    pub(super) isa: Isa,
    pub(super) n_targets: usize,
    /// `[input][target]`.
    pub(super) w: Vec<f32>,
    /// Target groups `(first target, count, per input: every weight of the group non-zero)`.
    pub(super) groups: Vec<(usize, usize, Vec<bool>)>,
}

impl Kernel {
    pub(super) fn new(isa: Isa, w: &[f32], n_inputs: usize, n_targets: usize) -> Kernel {
        let mut groups = Vec::new();
        let mut k0 = 0;
        while k0 < n_targets {
            let width = isa.group().min(n_targets - k0);
            let dense = (0..n_inputs)
                .map(|m| {
                    w[m * n_targets + k0..m * n_targets + k0 + width]
                        .iter()
                        .all(|&x| x != 0.0)
                })
                .collect();
            groups.push((k0, width, dense));
            k0 += width;
        }
        Kernel {
            isa,
            n_targets,
            w: w.to_vec(),
            groups,
        }
    }

    /// Elements `b0..b0 + bl` of every target's row (`rows[k * len..]`) from the staged block.
    pub(super) fn run(
        &self,
        staged: &[f32],
        bs: usize,
        bl: usize,
        rows: &mut [f32],
        len: usize,
        b0: usize,
    ) {
        let kk = self.n_targets;
        let n_inputs = self.w.len() / kk.max(1);
        // The kernels index with these bounds; checked once per block.
        assert!(
            bs.is_multiple_of(16)
                && bl <= bs
                && staged.len() >= n_inputs * bs
                && b0 + bl <= len
                && rows.len() >= kk * len
        );
        let mut b = Block {
            staged,
            bs,
            bl,
            rows,
            len,
            b0,
        };
        for (k0, width, dense) in &self.groups {
            debug_assert_eq!(dense.len(), n_inputs);
            let g = Group {
                w: &self.w,
                kk,
                k0: *k0,
                dense,
            };
            // One monomorphized kernel per group width (groups hold 1 to 8 targets).
            #[cfg(target_arch = "x86_64")]
            macro_rules! tiled {
                ($kernel:ident: $($n:literal)*) => {
                    match width {
                        // SAFETY: `Isa::detect` chose this ISA only where the CPU has its
                        // features; the bounds were checked above and `k0 + width <= kk`.
                        $($n => unsafe { $kernel::<$n>(&mut b, &g) },)*
                        _ => unreachable!("groups hold 1 to 8 targets"),
                    }
                };
            }
            match self.isa {
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2 => tiled!(tile_avx2: 1 2 3 4 5 6 7 8),
                #[cfg(target_arch = "x86_64")]
                Isa::Avx512 => tiled!(tile_avx512: 1 2 3 4 5 6 7 8),
                _ => tile_portable(&mut b, &g, *width),
            }
        }
    }
}

/// One block of the staged inputs and the target rows it fills.
pub(super) struct Block<'a> {
    /// `[input][bs]`, the first `bl` of each row valid.
    pub(super) staged: &'a [f32],
    pub(super) bs: usize,
    pub(super) bl: usize,
    /// `[target][len]`.
    pub(super) rows: &'a mut [f32],
    pub(super) len: usize,
    pub(super) b0: usize,
}

/// The targets `k0..k0 + width` of `kk`, with their weights `w[input * kk + k]`.
pub(super) struct Group<'a> {
    pub(super) w: &'a [f32],
    pub(super) kk: usize,
    pub(super) k0: usize,
    pub(super) dense: &'a [bool],
}

pub(super) fn tile_portable(b: &mut Block, g: &Group, width: usize) {
    for j in 0..b.bl {
        for t in 0..width {
            let mut acc = 0.0f32;
            for m in 0..g.dense.len() {
                let wt = g.w[m * g.kk + g.k0 + t];
                if wt != 0.0 {
                    acc = b.staged[m * b.bs + j].mul_add(wt, acc);
                }
            }
            b.rows[(g.k0 + t) * b.len + b.b0 + j] = acc;
        }
    }
}

/// `T` targets x 8 elements accumulated in registers over every input.
///
/// # Safety
/// AVX2 and FMA must be available; `Kernel::run`'s bounds must hold and `k0 + T <= kk`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn tile_avx2<const T: usize>(b: &mut Block, g: &Group) {
    use std::arch::x86_64::*;
    let xs = b.staged.as_ptr();
    let wp = g.w.as_ptr().add(g.k0);
    let out = b.rows.as_mut_ptr().add(g.k0 * b.len + b.b0);
    let mut e = 0;
    while e < b.bl {
        let mut acc = [_mm256_setzero_ps(); T];
        for (m, &dense) in g.dense.iter().enumerate() {
            // SAFETY: m < n_inputs and e + 8 <= bs (bs is a multiple of 16, e < bl <= bs and
            // e is a multiple of 8): inside `staged`. The weights read are `w[m*kk + k0 + t]`
            // with `k0 + t < kk`.
            let x = _mm256_loadu_ps(xs.add(m * b.bs + e));
            let wm = wp.add(m * g.kk);
            if dense {
                for (t, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(_mm256_set1_ps(*wm.add(t)), x, *a);
                }
            } else {
                for (t, a) in acc.iter_mut().enumerate() {
                    let wt = *wm.add(t);
                    if wt != 0.0 {
                        *a = _mm256_fmadd_ps(_mm256_set1_ps(wt), x, *a);
                    }
                }
            }
        }
        let n = (b.bl - e).min(8);
        for (t, a) in acc.iter().enumerate() {
            // SAFETY: row k0 + t < kk, elements b0 + e..b0 + e + n <= b0 + bl <= len.
            let dst = out.add(t * b.len + e);
            if n == 8 {
                _mm256_storeu_ps(dst, *a);
            } else {
                let mut tmp = [0f32; 8];
                _mm256_storeu_ps(tmp.as_mut_ptr(), *a);
                std::ptr::copy_nonoverlapping(tmp.as_ptr(), dst, n);
            }
        }
        e += 8;
    }
}

/// `T` targets x 32 elements (two `zmm` per target) accumulated over every input: each
/// broadcast weight feeds two FMAs, so the loads keep up with both FMA pipes. A block length
/// that is an odd multiple of 16 ends with one 16-element step.
///
/// # Safety
/// AVX-512F must be available; `Kernel::run`'s bounds must hold and `k0 + T <= kk`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn tile_avx512<const T: usize>(b: &mut Block, g: &Group) {
    let mut e = 0;
    while e < b.bl {
        if e + 32 <= b.bs {
            step_avx512::<T, 2>(b, g, e);
            e += 32;
        } else {
            step_avx512::<T, 1>(b, g, e);
            e += 16;
        }
    }
}

/// Elements `e..e + 16 V` of `T` targets, `V` vectors per target in registers.
///
/// # Safety
/// As [`tile_avx512`], and `e + 16 V <= bs`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
pub(super) unsafe fn step_avx512<const T: usize, const V: usize>(
    b: &mut Block,
    g: &Group,
    e: usize,
) {
    use std::arch::x86_64::*;
    let xs = b.staged.as_ptr();
    let wp = g.w.as_ptr().add(g.k0);
    let mut acc = [[_mm512_setzero_ps(); V]; T];
    for (m, &dense) in g.dense.iter().enumerate() {
        // SAFETY: m < n_inputs and e + 16 V <= bs: inside `staged`. The weights read are
        // `w[m*kk + k0 + t]` with `k0 + t < kk`.
        let row = xs.add(m * b.bs + e);
        let x: [__m512; V] = std::array::from_fn(|v| _mm512_loadu_ps(row.add(16 * v)));
        let wm = wp.add(m * g.kk);
        // Branch-free when no weight of the group is zero; else zeros are skipped, as the
        // portable loop does.
        if dense {
            for (t, a) in acc.iter_mut().enumerate() {
                let w = _mm512_set1_ps(*wm.add(t));
                for (a, x) in a.iter_mut().zip(&x) {
                    *a = _mm512_fmadd_ps(*x, w, *a);
                }
            }
        } else {
            for (t, a) in acc.iter_mut().enumerate() {
                let wt = *wm.add(t);
                if wt != 0.0 {
                    let w = _mm512_set1_ps(wt);
                    for (a, x) in a.iter_mut().zip(&x) {
                        *a = _mm512_fmadd_ps(*x, w, *a);
                    }
                }
            }
        }
    }
    let out = b.rows.as_mut_ptr().add(g.k0 * b.len + b.b0 + e);
    let n = b.bl - e;
    for (t, a) in acc.iter().enumerate() {
        for (v, a) in a.iter().enumerate() {
            // SAFETY: row k0 + t < kk; elements b0 + e + 16 v.. up to b0 + bl <= len.
            let dst = out.add(t * b.len + 16 * v);
            let lanes = n.saturating_sub(16 * v);
            if lanes >= 16 {
                _mm512_storeu_ps(dst, *a);
            } else if lanes > 0 {
                _mm512_mask_storeu_ps(dst, ((1u32 << lanes) - 1) as u16, *a);
            }
        }
    }
}
