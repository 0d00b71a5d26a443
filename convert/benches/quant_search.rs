//! The 4-bit scale search, windowed (the converter's) against exhaustive (the reference):
//! weighted error and speed on the matrices of a real checkpoint, or on Gaussian ones.
//!
//! ```sh
//! cargo bench --bench quant_search -- CHECKPOINT [SAMPLE]   # HF directory or .gguf
//! cargo bench --bench quant_search -- gauss                 # N(0,1), 256 × 4096
//! ```
//! `SAMPLE` (default 8): every SAMPLE-th 32-column block of every 2-D matrix is quantized (both
//! ways) with the converter's weights `sqrt(σ² + x²)`. Printed per grid (codebook, linear):
//! the total weighted error of each search (f64, after the f16 rounding of the scale), their
//! ratio, the share of blocks where the windowed search is worse by more than 1e-6 relative,
//! and ns per block of each.
use std::time::Instant;

use ferroq_kernels::block::{KVALUES, LVALUES, QK};
use ferroq_kernels::scalar::{
    quantize_block_levels_exhaustive, LevelSearch, SCALE_CANDIDATES, SCALE_WINDOW,
};

fn importance(x: &[f32]) -> [f32; QK] {
    let s2 = x.iter().map(|v| v * v).sum::<f32>() / QK as f32;
    let mut w = [0f32; QK];
    for (o, &v) in w.iter_mut().zip(x) {
        *o = (s2 + v * v).sqrt();
    }
    w
}

fn err(levels: &[i8; 16], x: &[f32], w: &[f32], d: half::f16, q: &[u8; QK]) -> f64 {
    let d = d.to_f32() as f64;
    x.iter()
        .zip(w)
        .zip(q)
        .map(|((&x, &w), &q)| {
            let e = x as f64 - d * levels[q as usize] as f64;
            w as f64 * e * e
        })
        .sum()
}

fn blocks_of(path: &str, sample: usize) -> Vec<[f32; QK]> {
    use ferroq_convert::source::Checkpoint;
    let ck: Checkpoint = if path.ends_with(".gguf") {
        ferroq_convert::gguf::open(path).expect("open gguf")
    } else {
        ferroq_convert::hf::open_hf_dir(path).expect("open checkpoint")
    };
    let mut out = Vec::new();
    let mut buf = Vec::new();
    let names: Vec<_> = ck
        .source
        .tensors()
        .iter()
        .filter(|t| t.shape.len() >= 2 && t.shape.last().unwrap() % QK == 0)
        .map(|t| t.name.clone())
        .collect();
    for name in names {
        ck.source.read_f32(&name, &mut buf).expect("read");
        for (i, b) in buf.chunks_exact(QK).enumerate() {
            if i % sample == 0 {
                out.push(b.try_into().unwrap());
            }
        }
    }
    out
}

fn gauss_blocks(n: usize) -> Vec<[f32; QK]> {
    let mut s = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 11) as f64 / (1u64 << 53) as f64
    };
    (0..n)
        .map(|_| {
            let mut b = [0f32; QK];
            for v in b.iter_mut() {
                // Box–Muller
                let (u, w) = (next().max(1e-300), next());
                *v = ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * w).cos()) as f32;
            }
            b
        })
        .collect()
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let Some(what) = args.first() else {
        eprintln!("usage: quant_search CHECKPOINT|gauss [SAMPLE]");
        return;
    };
    let sample = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(8);
    let blocks = if what == "gauss" {
        gauss_blocks(256 * 4096 / QK)
    } else {
        blocks_of(what, sample)
    };
    let ws: Vec<[f32; QK]> = blocks.iter().map(|b| importance(b)).collect();
    let env = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<f32>().ok());
    let window = (
        env("WIN_LO").unwrap_or(SCALE_WINDOW.0),
        env("WIN_HI").unwrap_or(SCALE_WINDOW.1),
    );
    let g = env("CANDIDATES").map_or(SCALE_CANDIDATES, |v| v as usize);
    println!(
        "{} blocks of {what}; window {window:?}, {g} candidates",
        blocks.len()
    );
    for (name, levels) in [("codebook (q4)", &KVALUES), ("linear (q4l)", &LVALUES)] {
        let search = LevelSearch::new(levels);
        let t = Instant::now();
        let fast: Vec<_> = blocks
            .iter()
            .zip(&ws)
            .map(|(x, w)| search.quantize_grid(x, w, window, g))
            .collect();
        let t_fast = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let full: Vec<_> = blocks
            .iter()
            .zip(&ws)
            .map(|(x, w)| quantize_block_levels_exhaustive(levels, x, w))
            .collect();
        let t_full = t.elapsed().as_secs_f64();
        let (mut e_fast, mut e_full, mut worse, mut same) = (0.0, 0.0, 0usize, 0usize);
        for (((x, w), f), g) in blocks.iter().zip(&ws).zip(&fast).zip(&full) {
            let (a, b) = (err(levels, x, w, f.0, &f.1), err(levels, x, w, g.0, &g.1));
            e_fast += a;
            e_full += b;
            if a > b * (1.0 + 1e-6) {
                worse += 1;
            }
            if f == g {
                same += 1;
            }
        }
        let n = blocks.len() as f64;
        println!(
            "{name}: weighted error windowed/exhaustive {:.6} ({e_fast:.6e} / {e_full:.6e}); \
             worse in {:.3} % of blocks, identical in {:.2} %; {:.0} ns/block vs {:.0} ns/block \
             ({:.1}x)",
            e_fast / e_full,
            100.0 * worse as f64 / n,
            100.0 * same as f64 / n,
            1e9 * t_fast / n,
            1e9 * t_full / n,
            t_full / t_fast
        );
    }
}
