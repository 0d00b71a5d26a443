//! RoPE frequencies against the values the Llama 4 spec derives from transformers'
//! `_compute_llama3_parameters` (§4: bands for head_dim 128, theta 5e5).

use ferroq::internals::ops::rope_inv_freq;

fn plain(j: usize) -> f32 {
    1.0 / 500000f32.powf((2 * j) as f32 / 128.0)
}

/// Current Scout Hub config: factor 16, low 1, high 1, original 8192. Pairs 0..=34 unchanged,
/// 35..=63 divided by 16, and no NaN although `high_freq_factor == low_freq_factor`.
#[test]
fn llama3_scaling_with_equal_factors() {
    let f = rope_inv_freq(500000.0, 128, Some((16.0, 1.0, 1.0, 8192.0)));
    assert_eq!(f.len(), 64);
    for (j, &v) in f.iter().enumerate() {
        assert!(v.is_finite());
        let want = if j <= 34 { plain(j) } else { plain(j) / 16.0 };
        assert!((v - want).abs() <= 1e-6 * want, "j {j}: {v} vs {want}");
    }
}

/// Older Scout config copies: factor 8, low 1, high 4: 0..=28 unchanged, 29..=34 smoothed
/// (strictly between the two), 35..=63 divided by 8.
#[test]
fn llama3_scaling_with_smooth_band() {
    let f = rope_inv_freq(500000.0, 128, Some((8.0, 1.0, 4.0, 8192.0)));
    for (j, &v) in f.iter().enumerate() {
        let p = plain(j);
        if j <= 28 {
            assert!((v - p).abs() <= 1e-6 * p, "j {j}");
        } else if j <= 34 {
            assert!(v < p && v > p / 8.0, "j {j}: {v} not in ({}, {p})", p / 8.0);
        } else {
            assert!((v - p / 8.0).abs() <= 1e-6 * p, "j {j}");
        }
    }
}
