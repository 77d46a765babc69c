//! Properties: every quantizer's round trip stays within `format::error_bound`,
//! 4-bit GGUF blocks repack exactly, and the Q/K row permutation round trips.

use half::f16;
use llama5_codegen::format::{self, error_bound};
use llama5_codegen::manifest::QuantFormat;
use llama5_convert::gguf::GgmlType;
use llama5_convert::gguf_model::{permute_rows, unpermute_rows};
use llama5_convert::quants;
use llama5_convert::source::Weights;
use proptest::prelude::*;

const FORMATS: [QuantFormat; 7] = [
    QuantFormat::F16,
    QuantFormat::Bf16,
    QuantFormat::Int8 { per_tensor: false },
    QuantFormat::Int8 { per_tensor: true },
    QuantFormat::Int4 { group_size: 32, symmetric: false },
    QuantFormat::Int4 { group_size: 32, symmetric: true },
    QuantFormat::Int4 { group_size: 64, symmetric: false },
];

/// `(out, in, values)` with `in` a multiple of 64 and values of mixed magnitude.
fn matrix() -> impl Strategy<Value = (usize, usize, Vec<f32>)> {
    (1usize..24, 1usize..4, prop_oneof![Just(1e-3f32), Just(1.0f32), Just(300.0f32)]).prop_flat_map(|(out, k, mag)| {
        let n = out * k * 64;
        (
            Just(out),
            Just(k * 64),
            prop::collection::vec(-1.0f32..1.0, n).prop_map(move |v| v.iter().map(|x| x * mag).collect()),
        )
    })
}

fn stats(v: &[f32]) -> (f32, f32) {
    let amax = v.iter().fold(0f32, |m, x| m.max(x.abs()));
    let lo = v.iter().copied().fold(f32::INFINITY, f32::min);
    let hi = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    (amax, hi - lo)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn every_quantizer_round_trips_within_its_bound((out, inf, w) in matrix()) {
        for f in FORMATS {
            let p = format::pack(f, &w, out, inf).unwrap();
            let back = format::unpack(f, &p.data, &p.scales, out, inf).unwrap();
            for o in 0..out {
                for i in 0..inf {
                    let k = o * inf + i;
                    let (amax, range) = match f {
                        QuantFormat::F32 | QuantFormat::F16 | QuantFormat::Bf16 => (w[k].abs(), 0.0),
                        QuantFormat::Int8 { per_tensor: true } => stats(&w),
                        QuantFormat::Int8 { per_tensor: false } => stats(&w[o * inf..(o + 1) * inf]),
                        QuantFormat::Int4 { group_size, .. } => {
                            let g = group_size as usize;
                            stats(&w[o * inf + i / g * g..o * inf + i / g * g + g])
                        }
                    };
                    let b = error_bound(f, amax, range);
                    prop_assert!((back[k] - w[k]).abs() <= b, "{:?} [{},{}]: {} vs {} (bound {})", f, o, i, back[k], w[k], b);
                }
            }
        }
    }

    #[test]
    fn q4_blocks_repack_exactly(blocks in prop::collection::vec((any::<u16>(), any::<u16>(), prop::array::uniform16(any::<u8>())), 1..12), q4_1 in any::<bool>()) {
        let finite = |bits: u16| { let v = f16::from_bits(bits); if v.is_finite() && v.to_f32().abs() < 1000.0 { v } else { f16::from_f32(0.5) } };
        let ty = if q4_1 { GgmlType::Q4_1 } else { GgmlType::Q4_0 };
        let mut bytes = Vec::new();
        for (d, m, qs) in &blocks {
            bytes.extend(finite(*d).to_le_bytes());
            if q4_1 { bytes.extend(finite(*m).to_le_bytes()); }
            bytes.extend(qs);
        }
        let want = quants::dequantize(ty, &bytes).unwrap();
        let (q, params) = quants::q4_groups(ty, &bytes).unwrap();
        // one output row of all blocks: in = 32 * blocks
        let inf = 32 * blocks.len();
        let packed = format::pack_int4_groups(&q, &params, 1, inf, 32, !q4_1).unwrap();
        let back = format::unpack(packed.format, &packed.data, &packed.scales, 1, inf).unwrap();
        prop_assert_eq!(&back, &want);
        prop_assert_eq!(Weights::Int4Groups { q, params }.into_f32(), want);
    }

    #[test]
    fn qk_permutation_round_trips(n_head in 1usize..12, half_dim in 1usize..40, inf in 1usize..5) {
        let hd = half_dim * 2;
        let rows = n_head * hd;
        let w: Vec<f32> = (0..rows * inf).map(|i| i as f32).collect();
        let gguf = Weights::F32(w.clone()).permute_rows(inf, &permute_rows(n_head, hd));
        if hd > 2 { prop_assert_ne!(&gguf, &Weights::F32(w.clone())); }
        let back = gguf.permute_rows(inf, &unpermute_rows(n_head, hd));
        prop_assert_eq!(back, Weights::F32(w));
    }
}
