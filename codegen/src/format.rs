//! The packed column-major matrix layout and its quantization formats.
//!
//! A matrix `W` of PyTorch shape `[out, in]` (one part of it: `out` is the part's
//! row count) is stored as `in / pack` *stored rows*, where `pack` is the number
//! of input elements in one 32-bit word ([`pack_factor`]). Stored row `r` holds
//! `out` little-endian `u32` words; word `o` packs `W[o, r*pack .. r*pack+pack]`,
//! element `k` of the pack in the low bits first. Each stored row is padded to a
//! multiple of [`ROW_ALIGN`] bytes (`row_stride`).
//!
//! Why words of consecutive *inputs*: the GPU thread that owns output channel `o`
//! reads one word per stored row and consumes `pack` multiply-adds from it, while
//! its neighbours (channels `o ± 1`) read the neighbouring words: coalesced loads,
//! and no cross-thread shuffling of nibbles.
//!
//! | format | pack | element encoding | scales |
//! |---|---|---|---|
//! | F16 | 2 | IEEE half | none |
//! | BF16 | 2 | bfloat16 (upper half of an f32) | none |
//! | INT8 | 4 | two's-complement i8, `w = scale[o] * q` | one row of `out` f32 (or one f32 per tensor) |
//! | INT4 | 8 | unsigned nibble, `w = scale[g,o] * q + min[g,o]` | `in / group` rows of `out` words `pack2x16float(scale, min)` |
//!
//! This module is the single definition of the formats: the converter packs
//! with it, the CPU backend unpacks with it and the WGSL unpackers in
//! [`crate::tcal`] mirror it; each `match` over [`QuantFormat`] is exhaustive.

use half::{bf16, f16};
use rayon::prelude::*;

use crate::manifest::{QuantFormat, ROW_ALIGN};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("input dimension {in_features} is not a multiple of {multiple} required by {format}")]
    InputNotMultiple { in_features: usize, multiple: usize, format: &'static str },
    #[error("INT4 group size {0} must be a positive multiple of 8")]
    GroupSize(u32),
    #[error("f32 is a vector format, not a matrix format")]
    NotMatrix,
    #[error("buffer of {found} bytes, expected at least {expected}")]
    Short { found: usize, expected: usize },
}

/// Input elements per 32-bit word.
pub fn pack_factor(format: QuantFormat) -> usize {
    match format {
        QuantFormat::F32 => 1,
        QuantFormat::F16 | QuantFormat::Bf16 => 2,
        QuantFormat::Int8 { .. } => 4,
        QuantFormat::Int4 { .. } => 8,
    }
}

fn format_name(format: QuantFormat) -> &'static str {
    match format {
        QuantFormat::F32 => "f32",
        QuantFormat::F16 => "f16",
        QuantFormat::Bf16 => "bf16",
        QuantFormat::Int8 { .. } => "int8",
        QuantFormat::Int4 { .. } => "int4",
    }
}

/// Round `n` up to a multiple of `align`.
pub fn align_up(n: u64, align: u64) -> u64 {
    n.div_ceil(align) * align
}

/// Byte sizes of one stored part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartSizes {
    pub data_bytes: u64,
    pub row_stride: u64,
    /// 0 when the format has no scales.
    pub scale_bytes: u64,
    pub scale_stride: u64,
}

/// Sizes of a part of `out` rows and `in_features` columns; also checks the
/// shape suits the format.
pub fn part_sizes(format: QuantFormat, out: usize, in_features: usize) -> Result<PartSizes, FormatError> {
    let pack = pack_factor(format);
    let mut multiple = pack;
    if let QuantFormat::Int4 { group_size, .. } = format {
        if group_size == 0 || group_size % 8 != 0 {
            return Err(FormatError::GroupSize(group_size));
        }
        multiple = group_size as usize;
    }
    if format == QuantFormat::F32 {
        let bytes = (out * 4) as u64;
        return Ok(PartSizes { data_bytes: bytes, row_stride: bytes, scale_bytes: 0, scale_stride: 0 });
    }
    if !in_features.is_multiple_of(multiple) {
        return Err(FormatError::InputNotMultiple { in_features, multiple, format: format_name(format) });
    }
    let row_stride = align_up(out as u64 * 4, ROW_ALIGN);
    let data_bytes = row_stride * (in_features / pack) as u64;
    let (scale_bytes, scale_stride) = match format {
        QuantFormat::F32 | QuantFormat::F16 | QuantFormat::Bf16 => (0, 0),
        QuantFormat::Int8 { per_tensor: true } => (ROW_ALIGN, ROW_ALIGN),
        QuantFormat::Int8 { per_tensor: false } => (row_stride, row_stride),
        QuantFormat::Int4 { group_size, .. } => (row_stride * (in_features / group_size as usize) as u64, row_stride),
    };
    Ok(PartSizes { data_bytes, row_stride, scale_bytes, scale_stride })
}

/// One packed part: the bytes of its `data` and `scales` regions.
#[derive(Debug, Clone, PartialEq)]
pub struct PackedMatrix {
    pub format: QuantFormat,
    pub out: usize,
    pub in_features: usize,
    pub data: Vec<u8>,
    pub scales: Vec<u8>,
    pub sizes: PartSizes,
}

fn put_u32(buf: &mut [u8], at: usize, v: u32) {
    buf[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn get_u32(buf: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]])
}

/// Rounds to f16 the way `pack2x16float` and `half` agree on (nearest, ties to even).
fn to_f16(x: f32) -> f16 {
    f16::from_f32(x)
}

/// Quantizes and packs `w` (row-major `[out, in]`, PyTorch order).
pub fn pack(format: QuantFormat, w: &[f32], out: usize, in_features: usize) -> Result<PackedMatrix, FormatError> {
    if format == QuantFormat::F32 {
        return Err(FormatError::NotMatrix);
    }
    if w.len() < out * in_features {
        return Err(FormatError::Short { found: w.len() * 4, expected: out * in_features * 4 });
    }
    let sizes = part_sizes(format, out, in_features)?;
    let stride = sizes.row_stride as usize;
    let mut data = vec![0u8; sizes.data_bytes as usize];
    let mut scales = vec![0u8; sizes.scale_bytes as usize];
    match format {
        QuantFormat::F32 => unreachable!("rejected above"),
        QuantFormat::F16 | QuantFormat::Bf16 => {
            data.par_chunks_mut(stride).enumerate().for_each(|(r, row)| {
                for o in 0..out {
                    let at = o * in_features + r * 2;
                    let bits = |x: f32| -> u32 {
                        if format == QuantFormat::F16 {
                            to_f16(x).to_bits() as u32
                        } else {
                            bf16::from_f32(x).to_bits() as u32
                        }
                    };
                    put_u32(row, o * 4, bits(w[at]) | (bits(w[at + 1]) << 16));
                }
            });
        }
        QuantFormat::Int8 { per_tensor } => {
            let channel_max =
                |o: usize| w[o * in_features..(o + 1) * in_features].iter().fold(0f32, |m, v| m.max(v.abs()));
            let scale_of: Vec<f32> = if per_tensor {
                let m = (0..out).into_par_iter().map(channel_max).reduce(|| 0.0, f32::max);
                vec![m / 127.0; out]
            } else {
                (0..out).into_par_iter().map(|o| channel_max(o) / 127.0).collect()
            };
            data.par_chunks_mut(stride).enumerate().for_each(|(r, row)| {
                for o in 0..out {
                    let inv = if scale_of[o] > 0.0 { 1.0 / scale_of[o] } else { 0.0 };
                    let mut word = 0u32;
                    for k in 0..4 {
                        let q = (w[o * in_features + r * 4 + k] * inv).round().clamp(-127.0, 127.0) as i8;
                        word |= (q as u8 as u32) << (8 * k);
                    }
                    put_u32(row, o * 4, word);
                }
            });
            let n = if per_tensor { 1 } else { out };
            for (o, s) in scale_of.iter().take(n).enumerate() {
                scales[o * 4..o * 4 + 4].copy_from_slice(&s.to_le_bytes());
            }
        }
        QuantFormat::Int4 { group_size, symmetric } => {
            let g = group_size as usize;
            let groups = in_features / g;
            // (scale, min) per (group, output) after rounding to f16, so the
            // nibbles are chosen against the values the kernels will see.
            let params: Vec<(f16, f16)> = (0..groups * out)
                .into_par_iter()
                .map(|idx| {
                    let (gi, o) = (idx / out, idx % out);
                    let vals = &w[o * in_features + gi * g..o * in_features + (gi + 1) * g];
                    int4_group_params(vals, symmetric)
                })
                .collect();
            data.par_chunks_mut(stride).enumerate().for_each(|(r, row)| {
                let gi = r * 8 / g;
                for o in 0..out {
                    let (s, m) = params[gi * out + o];
                    let (s, m) = (s.to_f32(), m.to_f32());
                    let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
                    let mut word = 0u32;
                    for k in 0..8 {
                        let q = ((w[o * in_features + r * 8 + k] - m) * inv).round().clamp(0.0, 15.0) as u32;
                        word |= q << (4 * k);
                    }
                    put_u32(row, o * 4, word);
                }
            });
            write_int4_scales(&mut scales, &params, out, stride);
        }
    }
    Ok(PackedMatrix { format, out, in_features, data, scales, sizes })
}

/// Scale and minimum of one INT4 group, rounded to f16.
fn int4_group_params(vals: &[f32], symmetric: bool) -> (f16, f16) {
    if symmetric {
        let amax = vals.iter().fold(0f32, |m, v| m.max(v.abs()));
        let s = to_f16(amax / 7.0);
        (s, to_f16(-8.0 * s.to_f32()))
    } else {
        let lo = vals.iter().copied().fold(f32::INFINITY, f32::min);
        let hi = vals.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        (to_f16((hi - lo) / 15.0), to_f16(lo))
    }
}

fn write_int4_scales(scales: &mut [u8], params: &[(f16, f16)], out: usize, stride: usize) {
    for (idx, (s, m)) in params.iter().enumerate() {
        let (gi, o) = (idx / out, idx % out);
        put_u32(scales, gi * stride + o * 4, s.to_bits() as u32 | ((m.to_bits() as u32) << 16));
    }
}

/// Packs already-quantized INT4 groups without requantizing, so GGUF Q4_0 / Q4_1
/// sources are reproduced exactly. `q` is row-major `[out, in]` nibble values
/// (0..=15); `params` is `[out, in / group]` of `(scale, min)`.
pub fn pack_int4_groups(
    q: &[u8],
    params: &[(f16, f16)],
    out: usize,
    in_features: usize,
    group_size: u32,
    symmetric: bool,
) -> Result<PackedMatrix, FormatError> {
    let format = QuantFormat::Int4 { group_size, symmetric };
    let sizes = part_sizes(format, out, in_features)?;
    let g = group_size as usize;
    let groups = in_features / g;
    if q.len() < out * in_features || params.len() < out * groups {
        return Err(FormatError::Short { found: q.len(), expected: out * in_features });
    }
    let stride = sizes.row_stride as usize;
    let mut data = vec![0u8; sizes.data_bytes as usize];
    data.par_chunks_mut(stride).enumerate().for_each(|(r, row)| {
        for o in 0..out {
            let mut word = 0u32;
            for k in 0..8 {
                word |= (q[o * in_features + r * 8 + k] as u32 & 15) << (4 * k);
            }
            put_u32(row, o * 4, word);
        }
    });
    // Reorder [out, groups] into [groups, out].
    let transposed: Vec<(f16, f16)> = (0..groups * out).map(|idx| params[(idx % out) * groups + idx / out]).collect();
    let mut scales = vec![0u8; sizes.scale_bytes as usize];
    write_int4_scales(&mut scales, &transposed, out, stride);
    Ok(PackedMatrix { format, out, in_features, data, scales, sizes })
}

/// Dequantizes one element `(o, i)` of a packed part.
pub fn element(
    format: QuantFormat,
    data: &[u8],
    scales: &[u8],
    out: usize,
    in_features: usize,
    o: usize,
    i: usize,
) -> f32 {
    let sizes = part_sizes(format, out, in_features).expect("a validated part");
    let pack = pack_factor(format);
    let word = get_u32(data, (i / pack) * sizes.row_stride as usize + o * 4);
    decode(format, word, i % pack, scales, sizes.scale_stride as usize, o, i)
}

fn decode(format: QuantFormat, word: u32, k: usize, scales: &[u8], scale_stride: usize, o: usize, i: usize) -> f32 {
    match format {
        QuantFormat::F32 => f32::from_bits(word),
        QuantFormat::F16 => f16::from_bits((word >> (16 * k)) as u16).to_f32(),
        QuantFormat::Bf16 => bf16::from_bits((word >> (16 * k)) as u16).to_f32(),
        QuantFormat::Int8 { per_tensor } => {
            let q = (word >> (8 * k)) as u8 as i8 as f32;
            let at = if per_tensor { 0 } else { o * 4 };
            q * f32::from_bits(get_u32(scales, at))
        }
        QuantFormat::Int4 { group_size, .. } => {
            let q = ((word >> (4 * k)) & 15) as f32;
            let sm = get_u32(scales, (i / group_size as usize) * scale_stride + o * 4);
            let s = f16::from_bits(sm as u16).to_f32();
            let m = f16::from_bits((sm >> 16) as u16).to_f32();
            s * q + m
        }
    }
}

/// Dequantizes a whole part back to row-major `[out, in]` f32.
pub fn unpack(
    format: QuantFormat,
    data: &[u8],
    scales: &[u8],
    out: usize,
    in_features: usize,
) -> Result<Vec<f32>, FormatError> {
    let sizes = part_sizes(format, out, in_features)?;
    if data.len() < sizes.data_bytes as usize {
        return Err(FormatError::Short { found: data.len(), expected: sizes.data_bytes as usize });
    }
    if scales.len() < sizes.scale_bytes as usize {
        return Err(FormatError::Short { found: scales.len(), expected: sizes.scale_bytes as usize });
    }
    let mut w = vec![0f32; out * in_features];
    w.par_chunks_mut(in_features).enumerate().for_each(|(o, row)| {
        unpack_output_into(format, data, scales, &sizes, o, row);
    });
    Ok(w)
}

/// Dequantizes output channel `o` (PyTorch row `o`, e.g. one token's embedding) into `row`.
pub fn unpack_output(
    format: QuantFormat,
    data: &[u8],
    scales: &[u8],
    out: usize,
    in_features: usize,
    o: usize,
) -> Result<Vec<f32>, FormatError> {
    let sizes = part_sizes(format, out, in_features)?;
    let mut row = vec![0f32; in_features];
    unpack_output_into(format, data, scales, &sizes, o, &mut row);
    Ok(row)
}

fn unpack_output_into(format: QuantFormat, data: &[u8], scales: &[u8], sizes: &PartSizes, o: usize, row: &mut [f32]) {
    let pack = pack_factor(format);
    for (i, v) in row.iter_mut().enumerate() {
        let word = get_u32(data, (i / pack) * sizes.row_stride as usize + o * 4);
        *v = decode(format, word, i % pack, scales, sizes.scale_stride as usize, o, i);
    }
}

/// Decodes every element of stored row `r` for all outputs, into
/// `dst[o * pack + k]` (the `pack` inputs of output `o`). The CPU backend's
/// matrix-vector product walks stored rows with this, so it reads each weight
/// byte once and in order.
///
/// The format is matched once per row and each word's scale read once (all
/// inputs of a word share a group): this is the CPU backend's inner loop.
pub fn decode_stored_row(
    format: QuantFormat,
    data: &[u8],
    scales: &[u8],
    sizes: &PartSizes,
    r: usize,
    outs: std::ops::Range<usize>,
    dst: &mut [f32],
) {
    let base = r * sizes.row_stride as usize;
    let words = data[base + outs.start * 4..base + outs.end * 4]
        .chunks_exact(4)
        .map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]]));
    match format {
        QuantFormat::F32 => dst.iter_mut().zip(words).for_each(|(d, w)| *d = f32::from_bits(w)),
        QuantFormat::F16 => {
            // the row's bytes are already f16 values in `dst` order: convert in
            // blocks, which `half` vectorizes
            use half::slice::HalfFloatSliceExt;
            let bytes = &data[base + outs.start * 4..base + outs.end * 4];
            let mut block = [f16::ZERO; 64];
            for (d, b) in dst.chunks_mut(64).zip(bytes.chunks(128)) {
                let h = &mut block[..d.len()];
                h.iter_mut().zip(b.chunks_exact(2)).for_each(|(x, c)| *x = f16::from_le_bytes([c[0], c[1]]));
                h.convert_to_f32_slice(d);
            }
        }
        QuantFormat::Bf16 => {
            for (d, w) in dst.chunks_exact_mut(2).zip(words) {
                d[0] = f32::from_bits(w << 16);
                d[1] = f32::from_bits(w & 0xffff_0000);
            }
        }
        QuantFormat::Int8 { per_tensor } => {
            for ((d, w), o) in dst.chunks_exact_mut(4).zip(words).zip(outs) {
                let s = f32::from_bits(get_u32(scales, if per_tensor { 0 } else { o * 4 }));
                for (k, v) in d.iter_mut().enumerate() {
                    *v = (w >> (8 * k)) as u8 as i8 as f32 * s;
                }
            }
        }
        QuantFormat::Int4 { group_size, .. } => {
            let scale_row = (r * 8 / group_size as usize) * sizes.scale_stride as usize;
            for ((d, w), o) in dst.chunks_exact_mut(8).zip(words).zip(outs) {
                let sm = get_u32(scales, scale_row + o * 4);
                let (s, m) = (f16::from_bits(sm as u16).to_f32(), f16::from_bits((sm >> 16) as u16).to_f32());
                for (k, v) in d.iter_mut().enumerate() {
                    *v = s * ((w >> (4 * k)) & 15) as f32 + m;
                }
            }
        }
    }
}

/// Largest error [`pack`] may introduce for one value, given the values of its
/// group or channel: the bound the quantizer tests assert.
pub fn error_bound(format: QuantFormat, group_abs_max: f32, group_range: f32) -> f32 {
    match format {
        QuantFormat::F32 => 0.0,
        // half an ulp at the value's magnitude, relative 2^-11 (f16) / 2^-8 (bf16)
        QuantFormat::F16 => group_abs_max * (1.0 / 2048.0) + 6.0e-8,
        QuantFormat::Bf16 => group_abs_max * (1.0 / 256.0),
        // half a step, plus the scale's own rounding
        QuantFormat::Int8 { .. } => group_abs_max / 127.0 * 0.5 * 1.001 + 1e-7,
        QuantFormat::Int4 { symmetric: false, .. } => {
            group_range / 15.0 * 0.5 * 1.01 + group_range * 2e-3 + group_abs_max * 1e-3
        }
        QuantFormat::Int4 { symmetric: true, .. } => group_abs_max / 7.0 * 0.5 * 1.01 + group_abs_max * 3e-3,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_layout_by_hand() {
        // W = [[1, 2], [3, 4], [5, 6]]: out 3, in 2 -> one stored row of 3 words
        let w = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let p = pack(QuantFormat::F16, &w, 3, 2).unwrap();
        assert_eq!(p.sizes.row_stride, 64);
        assert_eq!(p.data.len(), 64);
        let word = |o: usize| get_u32(&p.data, o * 4);
        assert_eq!(word(0), f16::from_f32(1.0).to_bits() as u32 | (f16::from_f32(2.0).to_bits() as u32) << 16);
        assert_eq!(word(2), f16::from_f32(5.0).to_bits() as u32 | (f16::from_f32(6.0).to_bits() as u32) << 16);
        assert!(p.data[12..].iter().all(|&b| b == 0), "padding is zero");
        assert_eq!(unpack(QuantFormat::F16, &p.data, &p.scales, 3, 2).unwrap(), w);
    }

    #[test]
    fn int8_layout_by_hand() {
        // one output, four inputs: scale = 127/127 = 1
        let w = [127.0, -1.0, 0.0, 2.0];
        let p = pack(QuantFormat::Int8 { per_tensor: false }, &w, 1, 4).unwrap();
        assert_eq!(get_u32(&p.data, 0), 0x02_00_ff_7f);
        assert_eq!(f32::from_bits(get_u32(&p.scales, 0)), 1.0);
    }

    #[test]
    fn int4_layout_by_hand() {
        // one output, group of 8 spanning 0..=15 exactly: scale 1, min 0
        let w: Vec<f32> = (0..8).map(|i| (i * 2) as f32).chain([15.0; 0]).collect();
        let p = pack(QuantFormat::Int4 { group_size: 8, symmetric: false }, &w, 1, 8).unwrap();
        // values 0,2,..,14 over range 14: scale 14/15
        let s = f16::from_f32(14.0 / 15.0);
        assert_eq!(get_u32(&p.scales, 0) & 0xffff, s.to_bits() as u32);
        let got = unpack(p.format, &p.data, &p.scales, 1, 8).unwrap();
        for (a, b) in got.iter().zip(&w) {
            assert!((a - b).abs() <= s.to_f32() * 0.5 + 1e-3, "{a} vs {b}");
        }
        let q: Vec<u8> = (0..16).map(|i| i as u8).collect();
        let params = [(f16::from_f32(0.5), f16::from_f32(-1.0)); 2];
        let p = pack_int4_groups(&q, &params, 1, 16, 8, false).unwrap();
        assert_eq!(get_u32(&p.data, 0), 0x7654_3210);
        assert_eq!(get_u32(&p.data, 64), 0xfedc_ba98);
        let got = unpack(p.format, &p.data, &p.scales, 1, 16).unwrap();
        let want: Vec<f32> = (0..16).map(|i| 0.5 * i as f32 - 1.0).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn rejects_bad_shapes() {
        assert!(matches!(
            part_sizes(QuantFormat::Int4 { group_size: 32, symmetric: false }, 4, 48),
            Err(FormatError::InputNotMultiple { .. })
        ));
        assert!(matches!(
            part_sizes(QuantFormat::Int4 { group_size: 12, symmetric: false }, 4, 48),
            Err(FormatError::GroupSize(12))
        ));
        assert!(matches!(part_sizes(QuantFormat::F16, 4, 3), Err(FormatError::InputNotMultiple { .. })));
    }
}
