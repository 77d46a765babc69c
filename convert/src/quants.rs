//! Dequantization of ggml tensor encodings, following ggml's reference
//! `dequantize_row_*` functions.

use half::{bf16, f16};
use rayon::prelude::*;

use crate::gguf::GgmlType;

/// Block structures' byte sizes, checked against the table in [`GgmlType::block`].
const Q4_0_BYTES: usize = 2 + 16;
const Q4_1_BYTES: usize = 2 + 2 + 16;
const Q5_0_BYTES: usize = 2 + 4 + 16;
const Q5_1_BYTES: usize = 2 + 2 + 4 + 16;
const Q8_0_BYTES: usize = 2 + 32;
const Q4_K_BYTES: usize = 2 + 2 + 12 + 128;
const Q6_K_BYTES: usize = 128 + 64 + 16 + 2;
const _: () = assert!(Q4_0_BYTES == 18 && Q4_1_BYTES == 20 && Q8_0_BYTES == 34);
const _: () = assert!(Q5_0_BYTES == 22 && Q5_1_BYTES == 24 && Q4_K_BYTES == 144 && Q6_K_BYTES == 210);

/// Whether [`dequantize`] handles `ty`.
pub fn supported(ty: GgmlType) -> bool {
    matches!(
        ty,
        GgmlType::F32
            | GgmlType::F16
            | GgmlType::Bf16
            | GgmlType::Q4_0
            | GgmlType::Q4_1
            | GgmlType::Q5_0
            | GgmlType::Q5_1
            | GgmlType::Q8_0
            | GgmlType::Q4K
            | GgmlType::Q6K
    )
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Dequantizes `bytes` (whole blocks of `ty`) to f32; `None` for a type
/// [`supported`] rejects. The caller guarantees `bytes` holds whole blocks.
pub fn dequantize(ty: GgmlType, bytes: &[u8]) -> Option<Vec<f32>> {
    let (block_len, block_bytes) = ty.block();
    let (block_len, block_bytes) = (block_len as usize, block_bytes as usize);
    let blocks = bytes.len() / block_bytes;
    let mut out = vec![0f32; blocks * block_len];
    let src = bytes[..blocks * block_bytes].par_chunks_exact(block_bytes);
    let dst = out.par_chunks_exact_mut(block_len);
    match ty {
        GgmlType::F32 => dst.zip(src).for_each(|(y, b)| y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        GgmlType::F16 => dst.zip(src).for_each(|(y, b)| y[0] = f16_at(b, 0)),
        GgmlType::Bf16 => dst.zip(src).for_each(|(y, b)| y[0] = bf16::from_le_bytes([b[0], b[1]]).to_f32()),
        GgmlType::Q8_0 => dst.zip(src).for_each(|(y, b)| {
            let d = f16_at(b, 0);
            for (v, &q) in y.iter_mut().zip(&b[2..34]) {
                *v = (q as i8) as f32 * d;
            }
        }),
        GgmlType::Q4_0 => dst.zip(src).for_each(|(y, b)| {
            let d = f16_at(b, 0);
            for j in 0..16 {
                y[j] = ((b[2 + j] & 0xf) as i32 - 8) as f32 * d;
                y[j + 16] = ((b[2 + j] >> 4) as i32 - 8) as f32 * d;
            }
        }),
        GgmlType::Q4_1 => dst.zip(src).for_each(|(y, b)| {
            let (d, m) = (f16_at(b, 0), f16_at(b, 2));
            for j in 0..16 {
                y[j] = (b[4 + j] & 0xf) as f32 * d + m;
                y[j + 16] = (b[4 + j] >> 4) as f32 * d + m;
            }
        }),
        GgmlType::Q5_0 => dst.zip(src).for_each(|(y, b)| {
            let d = f16_at(b, 0);
            let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
            for j in 0..16 {
                let h0 = ((qh >> j) << 4) & 0x10;
                let h1 = (qh >> (j + 12)) & 0x10;
                y[j] = (((b[6 + j] & 0xf) as u32 | h0) as i32 - 16) as f32 * d;
                y[j + 16] = (((b[6 + j] >> 4) as u32 | h1) as i32 - 16) as f32 * d;
            }
        }),
        GgmlType::Q5_1 => dst.zip(src).for_each(|(y, b)| {
            let (d, m) = (f16_at(b, 0), f16_at(b, 2));
            let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
            for j in 0..16 {
                let h0 = ((qh >> j) << 4) & 0x10;
                let h1 = (qh >> (j + 12)) & 0x10;
                y[j] = ((b[8 + j] & 0xf) as u32 | h0) as f32 * d + m;
                y[j + 16] = ((b[8 + j] >> 4) as u32 | h1) as f32 * d + m;
            }
        }),
        GgmlType::Q4K => dst.zip(src).for_each(|(y, b)| dequantize_q4_k(b, y)),
        GgmlType::Q6K => dst.zip(src).for_each(|(y, b)| dequantize_q6_k(b, y)),
        GgmlType::Q8_1
        | GgmlType::Q2K
        | GgmlType::Q3K
        | GgmlType::Q5K
        | GgmlType::Q8K
        | GgmlType::I8
        | GgmlType::I16
        | GgmlType::I32
        | GgmlType::I64
        | GgmlType::F64 => return None,
    }
    Some(out)
}

/// Scale and minimum `j` (0..8) of a Q4_K block's 12 packed 6-bit values.
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0xf) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

/// Q4_K: f16 `d`, f16 `dmin`, 12 bytes of 6-bit scales/mins, 128 bytes of nibbles.
fn dequantize_q4_k(b: &[u8], y: &mut [f32]) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let scales = &b[4..16];
    let qs = &b[16..144];
    for (chunk, ys) in y.chunks_exact_mut(64).enumerate() {
        let q = &qs[chunk * 32..chunk * 32 + 32];
        let (sc1, m1) = scale_min_k4(chunk * 2, scales);
        let (sc2, m2) = scale_min_k4(chunk * 2 + 1, scales);
        let (d1, m1) = (d * sc1 as f32, dmin * m1 as f32);
        let (d2, m2) = (d * sc2 as f32, dmin * m2 as f32);
        for l in 0..32 {
            ys[l] = d1 * (q[l] & 0xf) as f32 - m1;
            ys[l + 32] = d2 * (q[l] >> 4) as f32 - m2;
        }
    }
}

/// Q6_K: 128 bytes low nibbles, 64 bytes high bit pairs, 16 i8 scales, f16 `d`.
fn dequantize_q6_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 208);
    for (half, ys) in y.chunks_exact_mut(128).enumerate() {
        let ql = &b[half * 64..half * 64 + 64];
        let qh = &b[128 + half * 32..128 + half * 32 + 32];
        let sc = &b[192 + half * 8..192 + half * 8 + 8];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0xf) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0xf) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            ys[l] = d * (sc[is] as i8) as f32 * q1 as f32;
            ys[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
            ys[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
            ys[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
        }
    }
}

/// Nibbles (one per byte) and `(scale, min)` per block of 32.
pub type Q4Groups = (Vec<u8>, Vec<(f16, f16)>);

/// Q4_0 / Q4_1 blocks as nibbles plus `(scale, min)` per block, so they can be
/// repacked without requantizing: Q4_1 is `d * q + m`, Q4_0 is `d * q - 8 d`.
/// `None` for other types, or when `-8 d` overflows f16.
pub fn q4_groups(ty: GgmlType, bytes: &[u8]) -> Option<Q4Groups> {
    let block_bytes = match ty {
        GgmlType::Q4_0 => Q4_0_BYTES,
        GgmlType::Q4_1 => Q4_1_BYTES,
        _ => return None,
    };
    let blocks = bytes.len() / block_bytes;
    let mut q = vec![0u8; blocks * 32];
    let mut params = vec![(f16::ZERO, f16::ZERO); blocks];
    q.par_chunks_exact_mut(32).zip(params.par_iter_mut()).zip(bytes.par_chunks_exact(block_bytes)).for_each(
        |((q, p), b)| {
            let d = f16::from_le_bytes([b[0], b[1]]);
            let (m, qs) = if ty == GgmlType::Q4_1 {
                (f16::from_le_bytes([b[2], b[3]]), &b[4..20])
            } else {
                (f16::from_f32(-8.0 * d.to_f32()), &b[2..18])
            };
            for j in 0..16 {
                q[j] = qs[j] & 0xf;
                q[j + 16] = qs[j] >> 4;
            }
            *p = (d, m);
        },
    );
    if ty == GgmlType::Q4_0 && params.iter().any(|(d, m)| d.is_finite() && !m.is_finite()) {
        return None;
    }
    Some((q, params))
}
