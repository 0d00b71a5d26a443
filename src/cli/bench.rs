//! `ferroq bench`: prompt processing (pp) and text generation (tg) speed, like `llama-bench`.
//!
//! * pp: a prompt of `-p` tokens (fixed pseudo-random ids) in batches of `-b`, from an empty
//!   cache, last logits only.
//! * tg: `-n` tokens one at a time from an empty cache (the llama-bench definition), each
//!   computing the last logits.
//!
//! Each is run once to warm up, then `-r` times; tokens/s are reported as mean ± stdev. Also:
//! model open time, peak RSS (`VmHWM`), weight bytes read per generated token (every matrix
//! of a decode step; for MoE layers only `experts_per_tok` routed experts), and the achieved
//! weight-read bandwidth against the machine's measured read bandwidth. Progress goes to
//! stderr; the report (or one JSON object with `--json`) to stdout.

use ferroq::model::weights::FfnWeights;
use ferroq::model::{KvType, Logits, Model, State};
use ferroq::ops::Mat;
use ferroq::Result;
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args)]
pub struct Args {
    /// Model file (.fqm).
    #[arg(short, long)]
    model: PathBuf,
    /// Prompt tokens (pp test; 0 skips it).
    #[arg(short = 'p', long, default_value_t = 512)]
    n_prompt: usize,
    /// Generated tokens (tg test; 0 skips it).
    #[arg(short = 'n', long, default_value_t = 128)]
    n_gen: usize,
    /// Batch size of the prompt (tokens per forward call).
    #[arg(short = 'b', long, default_value_t = 512)]
    batch: usize,
    /// Threads (0 = all cores).
    #[arg(short = 't', long, default_value_t = 0)]
    threads: usize,
    /// Repetitions (after one warm-up run; at least 1).
    #[arg(short = 'r', long, default_value_t = 3)]
    reps: usize,
    /// Bytes of the buffer used to measure the machine's read bandwidth (0 skips it).
    #[arg(long, default_value_t = 512 << 20)]
    bw_bytes: usize,
    /// KV cache type: f16 (default), q8 or f32.
    #[arg(long, default_value = "f16", value_parser = parse_kv)]
    kv: KvType,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
}

fn parse_kv(s: &str) -> std::result::Result<KvType, String> {
    KvType::parse(s).ok_or_else(|| format!("unknown KV cache type `{s}` (f16, q8, f32)"))
}

/// Mean and sample standard deviation.
fn mean_sd(v: &[f64]) -> (f64, f64) {
    if v.is_empty() {
        return (0.0, 0.0);
    }
    let m = v.iter().sum::<f64>() / v.len() as f64;
    if v.len() < 2 {
        return (m, 0.0);
    }
    let var = v.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / (v.len() - 1) as f64;
    (m, var.sqrt())
}

/// Peak resident set size in MiB (`VmHWM` of /proc/self/status; 0 where unavailable).
pub fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// CPU seconds (user + system) used by this process so far, from /proc/self/stat (clock ticks
/// of 1/100 s); 0 where unavailable. The machine may be shared: `cpu / (wall · threads)` tells
/// how much of the requested cores the run actually got.
fn cpu_seconds() -> f64 {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            // fields after the parenthesised command name; utime and stime are fields 14, 15
            let rest = &s[s.rfind(')')? + 2..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some((f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?) / 100.0)
        })
        .unwrap_or(0.0)
}

fn mat_bytes(m: Mat) -> usize {
    match m {
        Mat::F32(w) => std::mem::size_of_val(w),
        Mat::Bf16(w) | Mat::F16(w) => std::mem::size_of_val(w),
        Mat::Q4(w) => std::mem::size_of_val(w),
        Mat::Q4L(w) => std::mem::size_of_val(w),
        Mat::Q8(w) => std::mem::size_of_val(w),
    }
}

/// Weight bytes one decode step reads: every matrix product's weights (attention, dense FFN,
/// router, shared expert, `experts_per_tok` routed experts per MoE layer, output) plus the norms;
/// the embedding contributes one row.
pub fn bytes_per_token(model: &Model) -> usize {
    let c = &model.config;
    let emb = mat_bytes(model.mat(model.tok_embeddings));
    let mut b = emb / c.vocab_size.max(1);
    b += mat_bytes(model.mat(model.output));
    b += model.vec(model.output_norm).len() * 4;
    for lw in &model.layers {
        for w in [lw.wq, lw.wk, lw.wv, lw.wo] {
            b += mat_bytes(model.mat(w));
        }
        b += (model.vec(lw.attn_norm).len() + model.vec(lw.ffn_norm).len()) * 4;
        match &lw.ffn {
            FfnWeights::Dense { gate, up, down } => {
                for w in [gate, up, down] {
                    b += mat_bytes(model.mat(*w));
                }
            }
            FfnWeights::Moe {
                router,
                shared,
                experts,
            } => {
                b += model.vec(*router).len() * 4;
                for w in shared.iter().flatten() {
                    b += mat_bytes(model.mat(*w));
                }
                if let Some(e) = experts.first() {
                    let one: usize = e.iter().map(|w| mat_bytes(model.mat(*w))).sum();
                    b += one * c.num_experts_per_tok.min(experts.len());
                }
            }
        }
    }
    b
}

pub fn run(a: Args) -> Result<()> {
    if a.reps == 0 {
        return Err(ferroq::Error::Config {
            field: "--reps".into(),
            msg: "must be at least 1 (the warm-up run is not counted)".into(),
        });
    }
    let t0 = Instant::now();
    let model = Model::open(&a.model)?;
    let load_ms = t0.elapsed().as_secs_f64() * 1e3;
    let c = &model.config;
    let threads = if a.threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        a.threads
    };
    let batch = a.batch.clamp(1, a.n_prompt.max(1));
    let ctx = a.n_prompt.max(a.n_gen).max(1);
    let mut st = State::with_kv(&model, ctx, batch, false, threads, a.kv);
    // fixed pseudo-random prompt ids (xorshift), away from the special tokens at the start
    let mut s = 0x9E37_79B9_7F4A_7C15u64;
    let prompt: Vec<u32> = (0..a.n_prompt)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s % (c.vocab_size as u64 - 100).max(1)) as u32 + 100.min(c.vocab_size as u32 - 1)
        })
        .collect();

    let mut pp = Vec::new();
    let (mut pp_wall, mut pp_cpu, mut tg_wall, mut tg_cpu) = (0.0, 0.0, 0.0, 0.0);
    if a.n_prompt > 0 {
        for rep in 0..=a.reps {
            st.reset();
            let (t, c0) = (Instant::now(), cpu_seconds());
            for ch in prompt.chunks(batch) {
                model.forward(&mut st, ch, Logits::Last)?;
            }
            let dt = t.elapsed().as_secs_f64();
            if rep > 0 {
                (pp_wall, pp_cpu) = (pp_wall + dt, pp_cpu + cpu_seconds() - c0);
            }
            eprintln!(
                "bench: pp{} rep {rep}{}: {:.1} t/s",
                a.n_prompt,
                if rep == 0 { " (warm-up)" } else { "" },
                a.n_prompt as f64 / dt
            );
            if rep > 0 {
                pp.push(a.n_prompt as f64 / dt);
            }
        }
    }
    let mut tg = Vec::new();
    if a.n_gen > 0 {
        for rep in 0..=a.reps {
            st.reset();
            let mut tok = prompt.first().copied().unwrap_or(1);
            let (t, c0) = (Instant::now(), cpu_seconds());
            for _ in 0..a.n_gen {
                model.forward(&mut st, &[tok], Logits::Last)?;
                tok = argmax(st.logits());
            }
            let dt = t.elapsed().as_secs_f64();
            if rep > 0 {
                (tg_wall, tg_cpu) = (tg_wall + dt, tg_cpu + cpu_seconds() - c0);
            }
            eprintln!(
                "bench: tg{} rep {rep}{}: {:.1} t/s",
                a.n_gen,
                if rep == 0 { " (warm-up)" } else { "" },
                a.n_gen as f64 / dt
            );
            if rep > 0 {
                tg.push(a.n_gen as f64 / dt);
            }
        }
    }
    let rss = peak_rss_mb();
    let bpt = bytes_per_token(&model);
    let bw = if a.bw_bytes > 0 {
        eprintln!("bench: measuring read bandwidth ({threads} threads) ...");
        ferroq::pool::measure_read_bandwidth(a.bw_bytes, threads)
    } else {
        0.0
    };
    let (pp_m, pp_s) = mean_sd(&pp);
    let (tg_m, tg_s) = mean_sd(&tg);
    let tg_gbs = tg_m * bpt as f64 / 1e9;
    let bound = if bpt > 0 { bw * 1e9 / bpt as f64 } else { 0.0 };
    let share = if bw > 0.0 { tg_gbs / bw } else { 0.0 };
    let share_of = |cpu: f64, wall: f64| {
        if wall > 0.0 {
            cpu / (wall * threads as f64)
        } else {
            0.0
        }
    };
    let (pp_cpu_share, tg_cpu_share) = (share_of(pp_cpu, pp_wall), share_of(tg_cpu, tg_wall));
    let name = a.model.display().to_string();
    // what was not run or not measured is null in JSON and left out of the table
    let (ran_pp, ran_tg, measured_bw) = (a.n_prompt > 0, a.n_gen > 0, bw > 0.0);
    let some = |ran: bool, v: f64| ran.then_some(v);
    if a.json {
        let o = serde_json::json!({
            "model": name,
            "kernels": model.kernels.level.name(),
            "threads": threads,
            "kv": format!("{:?}", a.kv).to_lowercase(),
            "n_prompt": a.n_prompt,
            "n_gen": a.n_gen,
            "batch": batch,
            "reps": a.reps,
            "pp_tps": some(ran_pp, pp_m),
            "pp_tps_sd": some(ran_pp, pp_s),
            "tg_tps": some(ran_tg, tg_m),
            "tg_tps_sd": some(ran_tg, tg_s),
            "load_ms": load_ms,
            "peak_rss_mb": rss,
            "bytes_per_token": bpt,
            "tg_read_gbs": some(ran_tg, tg_gbs),
            "machine_read_gbs": some(measured_bw, bw),
            "tg_bound_tps": some(measured_bw, bound),
            "tg_bandwidth_share": some(ran_tg && measured_bw, share),
            "pp_cpu_share": some(ran_pp, pp_cpu_share),
            "tg_cpu_share": some(ran_tg, tg_cpu_share),
        });
        println!("{o}");
    } else {
        println!(
            "model {name}: {} layers, hidden {}, vocab {}; kernels {}, {threads} threads",
            c.num_layers,
            c.hidden_size,
            c.vocab_size,
            model.kernels.level.name()
        );
        println!("| test | t/s |");
        println!("|---|---|");
        if a.n_prompt > 0 {
            println!("| pp{} | {pp_m:.1} ± {pp_s:.1} |", a.n_prompt);
        }
        if a.n_gen > 0 {
            println!("| tg{} | {tg_m:.1} ± {tg_s:.1} |", a.n_gen);
        }
        println!("load {load_ms:.1} ms, peak RSS {rss:.1} MiB");
        let cpu: Vec<String> = [("pp", ran_pp, pp_cpu_share), ("tg", ran_tg, tg_cpu_share)]
            .iter()
            .filter(|(_, ran, _)| *ran)
            .map(|(t, _, v)| format!("{t} {:.0} %", v * 100.0))
            .collect();
        if !cpu.is_empty() {
            println!(
                "CPU time / (wall x threads): {} (below 100 %: the cores were shared with other \
                 processes)",
                cpu.join(", ")
            );
        }
        let mut line = format!(
            "weights read per generated token {:.1} MB",
            bpt as f64 / 1e6
        );
        if ran_tg {
            line += &format!("; tg reads {tg_gbs:.2} GB/s");
        }
        if measured_bw {
            line += &if ran_tg {
                format!(" = {:.0} % of the measured", share * 100.0)
            } else {
                "; measured read bandwidth".to_string()
            };
            line += &format!(" {bw:.2} GB/s ({threads} threads; bound {bound:.0} t/s)");
        } else {
            line += " (machine bandwidth not measured: --bw-bytes 0)";
        }
        println!("{line}");
    }
    Ok(())
}

fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best as u32
}
