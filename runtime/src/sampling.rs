//! Choosing the next token from logits: greedy, temperature, top-k and top-p,
//! driven by a self-contained PRNG so a seed gives the same tokens on every
//! platform.

use crate::error::RuntimeError;

/// How to pick tokens.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 is greedy (argmax).
    pub temperature: f32,
    /// Keep only the `k` most likely tokens (`None` or 0: all).
    pub top_k: Option<usize>,
    /// Keep the smallest set of most likely tokens whose probability reaches `p` (`None` or 1: all).
    pub top_p: Option<f32>,
    pub seed: u64,
}

impl SamplingParams {
    pub fn greedy() -> Self {
        SamplingParams { temperature: 0.0, top_k: None, top_p: None, seed: 0 }
    }
}

/// xoshiro256** seeded through splitmix64: small, fast and identical everywhere.
#[derive(Clone, Debug)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    pub fn new(seed: u64) -> Self {
        let mut sm = seed;
        let mut next = || {
            sm = sm.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = sm;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        };
        Rng { s: [next(), next(), next(), next()] }
    }

    pub fn next_u64(&mut self) -> u64 {
        let result = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    /// Uniform in `[0, 1)`, from the top 53 bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// Index of the largest logit (the first on ties; NaN never wins).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] || logits[best].is_nan() {
            best = i;
        }
    }
    best as u32
}

pub struct Sampler {
    params: SamplingParams,
    rng: Rng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Result<Self, RuntimeError> {
        if !params.temperature.is_finite() || params.temperature < 0.0 {
            return Err(RuntimeError::Other(format!("temperature {} must be finite and >= 0", params.temperature)));
        }
        if let Some(p) = params.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(RuntimeError::Other(format!("top-p {p} must lie in (0, 1]")));
            }
        }
        Ok(Sampler { params, rng: Rng::new(params.seed) })
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Whether every choice is the argmax, so a backend may choose on its own.
    pub fn is_greedy(&self) -> bool {
        self.params.temperature == 0.0 || self.params.top_k == Some(1)
    }

    /// The candidates after temperature, top-k and top-p, most likely first,
    /// with probabilities that sum to 1.
    pub fn distribution(&self, logits: &[f32]) -> Vec<(u32, f32)> {
        let p = &self.params;
        if self.is_greedy() {
            return vec![(argmax(logits), 1.0)];
        }
        let mut cands: Vec<(u32, f32)> =
            logits.iter().enumerate().filter(|(_, v)| !v.is_nan()).map(|(i, &v)| (i as u32, v)).collect();
        if cands.is_empty() {
            return vec![(0, 1.0)];
        }
        let by_logit = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        match p.top_k {
            Some(k) if k > 0 && k < cands.len() => {
                cands.select_nth_unstable_by(k - 1, by_logit);
                cands.truncate(k);
            }
            _ => {}
        }
        cands.sort_by(by_logit);
        // softmax at temperature, in f64 so tiny tails do not vanish
        let max = cands[0].1 as f64;
        let t = p.temperature as f64;
        let weights: Vec<f64> = cands.iter().map(|c| ((c.1 as f64 - max) / t).exp()).collect();
        let total: f64 = weights.iter().sum();
        let mut keep = cands.len();
        if let Some(top_p) = p.top_p.filter(|&p| p < 1.0) {
            let mut cumulative = 0.0;
            for (i, w) in weights.iter().enumerate() {
                cumulative += w / total;
                if cumulative >= top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
        }
        let kept_total: f64 = weights[..keep].iter().sum();
        cands.iter().zip(&weights).take(keep).map(|(c, w)| (c.0, (w / kept_total) as f32)).collect()
    }

    /// The next uniform draw in `[0, 1)`: one per token, whether or not the
    /// choice needs it, so host and device sampling consume the same stream.
    pub fn draw(&mut self) -> f64 {
        self.rng.next_f64()
    }

    /// The next `k` draws, without taking them (see [`Sampler::skip`]).
    pub fn preview(&self, k: usize) -> Vec<f64> {
        let mut rng = self.rng.clone();
        (0..k).map(|_| rng.next_f64()).collect()
    }

    /// Takes `k` draws, as `k` calls of [`Sampler::draw`] would.
    pub fn skip(&mut self, k: usize) {
        for _ in 0..k {
            self.rng.next_f64();
        }
    }

    /// The token at `u` of the cumulative distribution, most likely first.
    pub fn choose(&self, logits: &[f32], u: f64) -> u32 {
        let dist = self.distribution(logits);
        let mut cumulative = 0.0;
        for &(id, prob) in &dist {
            cumulative += prob as f64;
            if u < cumulative {
                return id;
            }
        }
        dist[dist.len() - 1].0
    }

    /// Draws the next token.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let u = self.draw();
        self.choose(logits, u)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_k: Option<usize>, top_p: Option<f32>, seed: u64) -> SamplingParams {
        SamplingParams { temperature, top_k, top_p, seed }
    }

    const LOGITS: [f32; 5] = [1.0, 3.0, 2.0, 0.5, 2.9];

    #[test]
    fn greedy_picks_argmax() {
        let mut s = Sampler::new(SamplingParams::greedy()).unwrap();
        assert_eq!(s.sample(&LOGITS), 1);
        assert_eq!(argmax(&[0.0, 5.0, 5.0]), 1, "first of equal maxima");
        assert_eq!(argmax(&[f32::NAN, -1.0]), 1);
    }

    #[test]
    fn top_k_one_is_greedy() {
        let mut s = Sampler::new(params(1.5, Some(1), None, 7)).unwrap();
        for _ in 0..20 {
            assert_eq!(s.sample(&LOGITS), 1);
        }
    }

    #[test]
    fn top_k_keeps_k_most_likely() {
        let s = Sampler::new(params(1.0, Some(2), None, 0)).unwrap();
        let d = s.distribution(&LOGITS);
        assert_eq!(d.iter().map(|c| c.0).collect::<Vec<_>>(), vec![1, 4]);
        // softmax of (3.0, 2.9)
        let want = 1.0 / (1.0 + (-0.1f32).exp());
        assert!((d[0].1 - want).abs() < 1e-6, "{d:?}");
    }

    #[test]
    fn top_p_cuts_at_cumulative_probability() {
        // probabilities 0.5, 0.25, 0.125, 0.125
        let logits = [2f32.ln() * 3.0, 2f32.ln() * 2.0, 2f32.ln(), 2f32.ln()];
        let s = Sampler::new(params(1.0, None, Some(0.7), 0)).unwrap();
        let d = s.distribution(&logits);
        assert_eq!(d.iter().map(|c| c.0).collect::<Vec<_>>(), vec![0, 1], "0.5 < 0.7 <= 0.75");
        assert!((d[0].1 - 2.0 / 3.0).abs() < 1e-6);
        let s = Sampler::new(params(1.0, None, Some(0.75), 0)).unwrap();
        assert_eq!(s.distribution(&logits).len(), 2, "reaching p exactly stops");
        let s = Sampler::new(params(1.0, None, Some(0.4), 0)).unwrap();
        assert_eq!(s.distribution(&logits).len(), 1, "at least one token stays");
    }

    #[test]
    fn temperature_scales_logits() {
        let logits = [0.0, 2f32.ln()];
        let hot = Sampler::new(params(2.0, None, None, 0)).unwrap().distribution(&logits);
        // at T=2, weights 1 and sqrt(2)
        let want = 2f32.sqrt() / (1.0 + 2f32.sqrt());
        assert!((hot[0].1 - want).abs() < 1e-6, "{hot:?}");
        let cold = Sampler::new(params(0.5, None, None, 0)).unwrap().distribution(&logits);
        assert!((cold[0].1 - 0.8).abs() < 1e-6, "at T=0.5 weights 1 and 4: {cold:?}");
    }

    #[test]
    fn same_seed_same_sequence() {
        let run = |seed| {
            let mut s = Sampler::new(params(1.0, None, None, seed)).unwrap();
            (0..64).map(|_| s.sample(&LOGITS)).collect::<Vec<_>>()
        };
        assert_eq!(run(42), run(42));
        assert_ne!(run(42), run(43));
        let distinct: std::collections::BTreeSet<u32> = run(42).into_iter().collect();
        assert!(distinct.len() >= 3, "a flat-ish distribution yields variety: {distinct:?}");
    }

    #[test]
    fn frequencies_follow_the_distribution() {
        // probabilities 0.2 and 0.8
        let logits = [0.0, 4f32.ln()];
        let mut s = Sampler::new(params(1.0, None, None, 1)).unwrap();
        let ones = (0..10_000).filter(|_| s.sample(&logits) == 1).count();
        assert!((7_700..8_300).contains(&ones), "{ones}");
    }

    #[test]
    fn rng_reference_values() {
        // splitmix64(0) first output, a published test value
        let mut sm = Rng::new(0);
        assert_eq!(sm.s[0], 0xe220_a839_7b1d_cdaf);
        let x = sm.next_f64();
        assert!((0.0..1.0).contains(&x));
    }

    #[test]
    fn rejects_bad_params() {
        assert!(Sampler::new(params(-1.0, None, None, 0)).is_err());
        assert!(Sampler::new(params(f32::NAN, None, None, 0)).is_err());
        assert!(Sampler::new(params(1.0, None, Some(0.0), 0)).is_err());
        assert!(Sampler::new(params(1.0, None, Some(1.5), 0)).is_err());
    }
}
