//! `ferroq bench`: prompt processing (pp) and text generation (tg) speed, like `llama-bench`.
//!
//! * pp: a prompt of `-p` tokens (fixed pseudo-random ids) in batches of `-b`, from an empty
//!   cache, last logits only.
//! * tg: `-n` tokens one at a time from an empty cache (the llama-bench definition), each
//!   computing the last logits.
//!
//! `-p`, `-n`, `-b` and `-t` take comma-separated lists, like llama-bench: every pp test runs at
//! every (threads, batch), every tg test at every thread count; the table then has a row per
//! test, and `--json` prints one object per test and line. With one value each, the table and
//! the single JSON object of `pp_tps`/`tg_tps` are as documented in the README.
//!
//! Each is run once to warm up, then `-r` times; tokens/s are reported as mean ± stdev. Also:
//! model open time, peak RSS (`VmHWM`), weight bytes read per generated token (every matrix
//! of a decode step; for MoE layers only `experts_per_tok` routed experts), and the achieved
//! weight-read bandwidth against the machine's measured read bandwidth. Progress goes to
//! stderr; the report (or one JSON object with `--json`) to stdout.

use ferroq::internals::model::weights::FfnWeights;
use ferroq::internals::model::{KvType, Logits, Model, State};
use ferroq::internals::ops::Mat;
use ferroq::Result;
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args)]
pub struct Args {
    /// Model file (.fqm).
    #[arg(short, long)]
    model: PathBuf,
    /// Check every tensor against the file's checksums before running (reads the whole model).
    #[arg(long)]
    verify: bool,
    /// Prompt tokens of the pp test (0 skips it); a comma-separated list runs each, like
    /// llama-bench.
    #[arg(short = 'p', long, value_delimiter = ',', default_value = "512")]
    n_prompt: Vec<usize>,
    /// Generated tokens of the tg test (0 skips it); a list runs each.
    #[arg(short = 'n', long, value_delimiter = ',', default_value = "128")]
    n_gen: Vec<usize>,
    /// Batch size of the prompt (tokens per forward call); a list runs each pp test with each.
    #[arg(short = 'b', long, value_delimiter = ',', default_value = "512")]
    batch: Vec<usize>,
    /// Threads (0 = all cores); a list runs every test with each.
    #[arg(short = 't', long, value_delimiter = ',', default_value = "0")]
    threads: Vec<usize>,
    /// Repetitions (after one warm-up run; at least 1).
    #[arg(short = 'r', long, default_value_t = 3)]
    reps: usize,
    /// Bytes of the buffer used to measure the machine's read bandwidth (0 skips it; default
    /// 512 MiB, or a quarter of the available memory if that is less).
    #[arg(long)]
    bw_bytes: Option<usize>,
    /// KV cache type: f16 (default), q8, q4 or f32.
    #[arg(long, default_value = "f16", value_parser = parse_kv)]
    kv: KvType,
    /// Print JSON instead of the table: one object, or with lists one object per test and line.
    #[arg(long)]
    json: bool,
    /// Allow tests longer than the model's max_position_embeddings.
    #[arg(long)]
    ctx_override: bool,
    /// Memory for the model: `auto` (what is free), `off` (plain mapping, the page cache
    /// decides) or a size (12G, 800M): MoE models larger than it page their routed experts.
    #[arg(long, default_value = "auto", value_parser = super::run::parse_mem)]
    mem: ferroq::internals::engine::MemBudget,
    /// Lock the resident weights in memory.
    #[arg(long)]
    mlock: bool,
    /// Paged experts: do not read the next MoE layer's experts ahead in prefill (to measure
    /// what the read-ahead gives).
    #[arg(long)]
    no_prefetch: bool,
    /// Paged experts, decode: predict the next MoE layer's picks (its router applied to this
    /// layer's input) and read them ahead.
    #[arg(long)]
    expert_predict: bool,
    /// Print the expert cache's hits/misses and bytes read from disk per token of each test.
    #[arg(long)]
    verbose: bool,
}

fn parse_kv(s: &str) -> std::result::Result<KvType, String> {
    KvType::parse(s).ok_or_else(|| format!("unknown KV cache type `{s}` ({})", KvType::NAMES))
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
        Mat::Q(w) => ferroq::internals::kernels::with_qmat!(w, w => std::mem::size_of_val(w)),
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

/// One measured test: `pp<n>` or `tg<n>` at a thread count (and, for pp, a batch size).
struct Test {
    pp: bool,
    n: usize,
    threads: usize,
    batch: usize,
    tps: (f64, f64),
    cpu_share: f64,
    /// Bytes read from disk per token over the test's runs (warm-up included).
    disk_per_token: f64,
    /// Expert cache hit rate over the test's runs (paging only).
    hit_rate: Option<f64>,
}

impl Test {
    fn name(&self) -> String {
        format!("{}{}", if self.pp { "pp" } else { "tg" }, self.n)
    }
}

/// `-r` timed runs after one warm-up of `step` (which does `work` tokens from an empty cache):
/// (mean, sd) tokens/s and the CPU share over the timed runs.
fn measure(
    label: &str,
    work: usize,
    reps: usize,
    threads: usize,
    mut step: impl FnMut() -> Result<()>,
) -> Result<((f64, f64), f64)> {
    let (mut tps, mut wall, mut cpu) = (Vec::new(), 0.0, 0.0);
    for rep in 0..=reps {
        let (t, c0) = (Instant::now(), cpu_seconds());
        step()?;
        let dt = t.elapsed().as_secs_f64();
        eprintln!(
            "bench: {label} rep {rep}{}: {:.1} t/s",
            if rep == 0 { " (warm-up)" } else { "" },
            work as f64 / dt
        );
        if rep > 0 {
            (wall, cpu) = (wall + dt, cpu + cpu_seconds() - c0);
            tps.push(work as f64 / dt);
        }
    }
    let share = if wall > 0.0 {
        cpu / (wall * threads as f64)
    } else {
        0.0
    };
    Ok((mean_sd(&tps), share))
}

/// The expert cache's counters and the bytes read from disk so far.
fn io_snapshot(model: &Model) -> (ferroq::internals::model::residency::CacheStats, u64) {
    let s = model
        .residency
        .as_ref()
        .map(|r| r.stats())
        .unwrap_or_default();
    (s, super::run::disk_read_bytes())
}

/// Disk bytes per token and the expert hit rate since `before` (printed with `--verbose`).
fn io_report(
    model: &Model,
    before: &(ferroq::internals::model::residency::CacheStats, u64),
    tokens: usize,
    label: &str,
    verbose: bool,
) -> (f64, Option<f64>) {
    let disk = super::run::disk_read_bytes().saturating_sub(before.1);
    if verbose {
        eprintln!("bench: {label}, all runs:");
        super::run::print_cache_stats(model, &before.0, disk, tokens);
    }
    let hit = model
        .residency
        .as_ref()
        .map(|r| r.stats().since(&before.0).hit_rate());
    (disk as f64 / tokens.max(1) as f64, hit)
}

pub fn run(a: Args) -> Result<()> {
    if a.reps == 0 {
        return Err(ferroq::Error::Config {
            field: "--reps".into(),
            msg: "must be at least 1 (the warm-up run is not counted)".into(),
        });
    }
    // settings the runs would refuse later, refused before the model is opened and tested
    for &t in &a.threads {
        ferroq::internals::pool::check_threads(t)?;
    }
    let bw_bytes = match a.bw_bytes {
        Some(b) => b,
        None => ferroq::internals::pool::default_bandwidth_buffer(),
    };
    if bw_bytes > 0 {
        ferroq::internals::pool::check_bandwidth_buffer(bw_bytes)?;
    }
    let t0 = Instant::now();
    let mut model = Model::open(&a.model)?;
    if a.verify {
        model.file.verify(&|_, _| {})?;
    }
    if a.ctx_override {
        model.allow_any_context();
    }
    let budget = match a.mem {
        ferroq::internals::engine::MemBudget::Off => None,
        ferroq::internals::engine::MemBudget::Auto => Some(None),
        ferroq::internals::engine::MemBudget::Bytes(b) => Some(Some(b)),
    };
    let paged = match budget {
        Some(budget) => {
            model.enable_paging(&ferroq::internals::model::residency::PagingOptions {
                budget,
                mlock: a.mlock,
                force: false,
                no_prefetch: a.no_prefetch,
                predict: a.expert_predict,
            })?
        }
        None => false,
    };
    if a.mlock && !paged {
        model.lock_all()?;
    }
    super::run::print_paging(&model);
    let load_ms = t0.elapsed().as_secs_f64() * 1e3;
    let c = &model.config;
    let all_cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut threads: Vec<usize> = Vec::new();
    for t in a
        .threads
        .iter()
        .map(|&t| if t == 0 { all_cores } else { t })
    {
        if !threads.contains(&t) {
            threads.push(t);
        }
    }
    let pps: Vec<usize> = a.n_prompt.iter().copied().filter(|&p| p > 0).collect();
    let tgs: Vec<usize> = a.n_gen.iter().copied().filter(|&n| n > 0).collect();
    let max_p = pps.iter().copied().max().unwrap_or(0);
    let ctx = max_p.max(tgs.iter().copied().max().unwrap_or(0)).max(1);
    // fixed pseudo-random prompt ids (xorshift), away from the special tokens at the start
    let mut s = 0x9E37_79B9_7F4A_7C15u64;
    let prompt: Vec<u32> = (0..max_p)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s % (c.vocab_size as u64 - 100).max(1)) as u32 + 100.min(c.vocab_size as u32 - 1)
        })
        .collect();

    ferroq::internals::model::kvmem::check_context(c, ctx, model.ctx_limit)?;
    eprintln!(
        "bench: {}",
        ferroq::internals::model::kv_bytes(c, ctx, a.kv).describe(a.kv)
    );
    let mut tests: Vec<Test> = Vec::new();
    for &t in &threads {
        for (bi, &b) in a.batch.iter().enumerate() {
            let batch = b.clamp(1, max_p.max(1));
            let mut st = State::try_with_kv(&model, ctx, batch, false, t, a.kv)?;
            for &p in &pps {
                let label = format!("pp{p} (t {t}, b {})", batch.min(p));
                let io0 = io_snapshot(&model);
                let (tps, cpu_share) = measure(&label, p, a.reps, t, || {
                    st.reset();
                    for ch in prompt[..p].chunks(batch) {
                        model.forward(&mut st, ch, Logits::Last)?;
                    }
                    Ok(())
                })?;
                let batch = batch.min(p);
                let (disk_per_token, hit_rate) =
                    io_report(&model, &io0, p * (a.reps + 1), &label, a.verbose);
                tests.push(Test {
                    pp: true,
                    n: p,
                    threads: t,
                    batch,
                    tps,
                    cpu_share,
                    disk_per_token,
                    hit_rate,
                });
            }
            // generation does not depend on the prompt batch: once per thread count
            if bi > 0 {
                continue;
            }
            for &n in &tgs {
                let label = format!("tg{n} (t {t})");
                let io0 = io_snapshot(&model);
                let (tps, cpu_share) = measure(&label, n, a.reps, t, || {
                    st.reset();
                    let mut tok = prompt.first().copied().unwrap_or(1);
                    for _ in 0..n {
                        model.forward(&mut st, &[tok], Logits::Last)?;
                        tok = argmax(st.logits());
                    }
                    Ok(())
                })?;
                let (disk_per_token, hit_rate) =
                    io_report(&model, &io0, n * (a.reps + 1), &label, a.verbose);
                tests.push(Test {
                    pp: false,
                    n,
                    threads: t,
                    batch: 1,
                    tps,
                    cpu_share,
                    disk_per_token,
                    hit_rate,
                });
            }
        }
    }
    // peak RSS of the tests, before the bandwidth probe allocates its buffer
    let rss = peak_rss_mb();
    // machine read bandwidth (GB/s) per thread count, in the order of `threads`; 0 = not measured
    let mut bws = Vec::with_capacity(threads.len());
    for &t in &threads {
        bws.push(if bw_bytes > 0 {
            eprintln!("bench: measuring read bandwidth ({t} threads) ...");
            ferroq::internals::pool::measure_read_bandwidth(bw_bytes, t)?
        } else {
            0.0
        });
    }
    let bpt = bytes_per_token(&model);
    let bw_of = |t: usize| threads.iter().position(|&u| u == t).map_or(0.0, |i| bws[i]);
    // decode at the bandwidth `bw`: tokens/s if every byte read came at that rate
    let bound_of = |bw: f64| if bpt > 0 { bw * 1e9 / bpt as f64 } else { 0.0 };
    // decode figures of a tg test: (weights read GB/s, share of the measured bandwidth)
    let decode = |x: &Test| {
        let (gbs, bw) = (x.tps.0 * bpt as f64 / 1e9, bw_of(x.threads));
        (gbs, if bw > 0.0 { gbs / bw } else { 0.0 })
    };
    let name = a.model.display().to_string();
    let kv = format!("{:?}", a.kv).to_lowercase();
    let describe = format!(
        "model {name}: {} layers, hidden {}, vocab {}; kernels {}",
        c.num_layers,
        c.hidden_size,
        c.vocab_size,
        model.kernels.level.name()
    );
    let single = threads.len() == 1 && a.batch.len() == 1 && pps.len() <= 1 && tgs.len() <= 1;
    if single {
        // one configuration: the one object / table of earlier versions
        let t = threads[0];
        let pp = tests.iter().find(|x| x.pp);
        let tg = tests.iter().find(|x| !x.pp);
        let (tg_gbs, share) = tg.map_or((0.0, 0.0), decode);
        let (bw, bound) = (bws[0], bound_of(bws[0]));
        let measured_bw = bw > 0.0;
        let batch = a.batch[0].clamp(1, max_p.max(1));
        if a.json {
            let o = serde_json::json!({
                "model": name,
                "kernels": model.kernels.level.name(),
                "threads": t,
                "kv": kv,
                "n_prompt": pp.map_or(0, |x| x.n),
                "n_gen": tg.map_or(0, |x| x.n),
                "batch": batch,
                "reps": a.reps,
                "pp_tps": pp.map(|x| x.tps.0),
                "pp_tps_sd": pp.map(|x| x.tps.1),
                "tg_tps": tg.map(|x| x.tps.0),
                "tg_tps_sd": tg.map(|x| x.tps.1),
                "load_ms": load_ms,
                "peak_rss_mb": rss,
                "bytes_per_token": bpt,
                "tg_read_gbs": tg.map(|_| tg_gbs),
                "machine_read_gbs": measured_bw.then_some(bw),
                "tg_bound_tps": measured_bw.then_some(bound),
                "tg_bandwidth_share": (tg.is_some() && measured_bw).then_some(share),
                "pp_cpu_share": pp.map(|x| x.cpu_share),
                "tg_cpu_share": tg.map(|x| x.cpu_share),
                "paged": model.residency.is_some(),
                "pp_disk_bytes_per_token": pp.map(|x| x.disk_per_token),
                "tg_disk_bytes_per_token": tg.map(|x| x.disk_per_token),
                "pp_expert_hit_rate": pp.and_then(|x| x.hit_rate),
                "tg_expert_hit_rate": tg.and_then(|x| x.hit_rate),
            });
            println!("{o}");
            return Ok(());
        }
        println!("{describe}, {t} threads");
        println!("| test | t/s |");
        println!("|---|---|");
        for x in &tests {
            println!("| {} | {:.1} ± {:.1} |", x.name(), x.tps.0, x.tps.1);
        }
        println!("load {load_ms:.1} ms, peak RSS {rss:.1} MiB");
        let cpu: Vec<String> = tests
            .iter()
            .map(|x| format!("{} {:.0} %", &x.name()[..2], x.cpu_share * 100.0))
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
        if tg.is_some() {
            line += &format!("; tg reads {tg_gbs:.2} GB/s");
        }
        if measured_bw {
            line += &if tg.is_some() {
                format!(" = {:.0} % of the measured", share * 100.0)
            } else {
                "; measured read bandwidth".to_string()
            };
            line += &format!(" {bw:.2} GB/s ({t} threads; bound {bound:.0} t/s)");
        } else {
            line += " (machine bandwidth not measured: --bw-bytes 0)";
        }
        println!("{line}");
        return Ok(());
    }
    // lists: one row (or JSON line) per test
    if a.json {
        for x in &tests {
            let (gbs, share) = decode(x);
            let bw = bw_of(x.threads);
            let measured_bw = bw > 0.0;
            let o = serde_json::json!({
                "model": name,
                "kernels": model.kernels.level.name(),
                "kv": kv,
                "test": x.name(),
                "n_prompt": if x.pp { x.n } else { 0 },
                "n_gen": if x.pp { 0 } else { x.n },
                "threads": x.threads,
                "batch": x.pp.then_some(x.batch),
                "reps": a.reps,
                "tps": x.tps.0,
                "tps_sd": x.tps.1,
                "cpu_share": x.cpu_share,
                "load_ms": load_ms,
                "peak_rss_mb": rss,
                "bytes_per_token": bpt,
                "read_gbs": (!x.pp).then_some(gbs),
                "machine_read_gbs": measured_bw.then_some(bw),
                "bound_tps": (!x.pp && measured_bw).then_some(bound_of(bw)),
                "bandwidth_share": (!x.pp && measured_bw).then_some(share),
                "paged": model.residency.is_some(),
                "disk_bytes_per_token": x.disk_per_token,
                "expert_hit_rate": x.hit_rate,
            });
            println!("{o}");
        }
        return Ok(());
    }
    println!("{describe}");
    println!("| test | threads | batch | t/s | CPU % |");
    println!("|---|---|---|---|---|");
    for x in &tests {
        let batch = if x.pp {
            x.batch.to_string()
        } else {
            "-".into()
        };
        println!(
            "| {} | {} | {batch} | {:.1} ± {:.1} | {:.0} |",
            x.name(),
            x.threads,
            x.tps.0,
            x.tps.1,
            x.cpu_share * 100.0
        );
    }
    println!("load {load_ms:.1} ms, peak RSS {rss:.1} MiB; CPU % = CPU time / (wall x threads)");
    println!(
        "weights read per generated token {:.1} MB",
        bpt as f64 / 1e6
    );
    for (&t, &bw) in threads.iter().zip(&bws) {
        if bw > 0.0 {
            println!(
                "measured read bandwidth (-t {t}): {bw:.2} GB/s (bound {:.0} t/s)",
                bound_of(bw)
            );
        }
    }
    for x in tests.iter().filter(|x| !x.pp) {
        let (gbs, share) = decode(x);
        if bw_of(x.threads) > 0.0 {
            println!(
                "{} (-t {}) reads {gbs:.2} GB/s = {:.0} % of the measured",
                x.name(),
                x.threads,
                share * 100.0
            );
        } else {
            println!("{} (-t {}) reads {gbs:.2} GB/s", x.name(), x.threads);
        }
    }
    if bw_bytes == 0 {
        println!("(machine bandwidth not measured: --bw-bytes 0)");
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
