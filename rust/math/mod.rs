//! The paper's math, knowing nothing of files: [`profile`] (power-function EMA profiles),
//! [`kernel`] (every other averaging kernel: windows, merges, BEMA, mixes, discrete step
//! profiles, and their inner products), [`solve`] (weights per target, with the fit report).

pub mod kernel;
pub mod profile;
pub mod solve;
