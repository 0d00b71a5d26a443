//! llama.cpp's importance matrices (`llama-imatrix`), read into an [`Imatrix`] so that
//! `ferroq convert --imatrix` takes them as it takes its own.
//!
//! Two formats, told apart by their first bytes:
//! - **GGUF** (`llama-imatrix`'s default since 2025): per matrix `W` of the model, an f32 tensor
//!   `W.in_sum2` of ggml dims `[n_per_row, n_mat]` (the sums of the squared activations per
//!   column, per matrix of a stacked expert tensor) and `W.counts` of `[n_mat]` (the
//!   activation rows summed); the mean square is `in_sum2 / counts`.
//! - **legacy `.dat`** (`--output-format dat`), little-endian: `i32 n_entries`, then per entry
//!   `i32 len`, the name, `i32 ncall`, `i32 nval`, `f32 × nval` holding `mean · ncall` per
//!   column (stacked experts one after another), then `i32` last chunk and the dataset name;
//!   the mean square is `value / ncall`, as `llama-quantize` reads it.
//!
//! Matrix names are GGUF's (`blk.3.attn_q.weight`, `blk.0.ffn_down_exps.weight`, ...); they
//! map to the `.fqm` names of the same matrices (a stacked expert tensor to its experts).
//! Tensors ferroq keeps unquantized (the router `ffn_gate_inp`) or does not have are skipped.
//! Like llama.cpp, the statistics are of the matrices' inputs as the model computes them
//! (Llama 4's routed inputs already scaled by the router's sigmoid), so a file collected by
//! llama.cpp on the same model weighs the same columns as `ferroq imatrix` would.

use super::gguf::{GgmlType, GgufFile};
use super::imatrix::{Entry, Imatrix};
use ferroq::internals::model::tensors::{LayerTensor, Proj, TensorKey};
use ferroq::{Error, Result};
use std::path::Path;

/// The most entries, name bytes and values per entry a legacy file may claim.
const MAX_ENTRIES: usize = 1 << 20;
const MAX_NAME: usize = 4096;
const MAX_VALUES: usize = 1 << 28;

/// Whether `b` starts like a llama.cpp imatrix (GGUF magic, or a plausible legacy header).
pub fn is_llama(b: &[u8]) -> bool {
    b.starts_with(b"GGUF") || legacy_header(b)
}

fn legacy_header(b: &[u8]) -> bool {
    let i32_at = |o: usize| {
        b.get(o..o + 4)
            .map(|v| i32::from_le_bytes([v[0], v[1], v[2], v[3]]))
    };
    matches!((i32_at(0), i32_at(4)), (Some(n), Some(l)) if n > 0 && (n as usize) <= MAX_ENTRIES && l > 0 && (l as usize) <= MAX_NAME)
}

/// The `.fqm` names of GGUF matrix `name` holding `n_mat` matrices (stacked experts), or `None`
/// for a tensor ferroq does not weigh by an imatrix.
pub fn fqm_names(name: &str, n_mat: usize) -> Option<Vec<String>> {
    use LayerTensor as L;
    if name == "output.weight" {
        return (n_mat == 1).then(|| vec![TensorKey::Output.to_string()]);
    }
    let (layer, part) = name.strip_prefix("blk.")?.split_once('.')?;
    if layer.is_empty() || layer.len() > 9 || !layer.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let layer: usize = layer.parse().ok()?;
    let part = part.strip_suffix(".weight")?;
    let one = |t: LayerTensor| (n_mat == 1).then(|| vec![TensorKey::Layer(layer, t).to_string()]);
    let experts = |p: Proj| {
        Some(
            (0..n_mat)
                .map(|e| TensorKey::Layer(layer, L::Expert(e, p)).to_string())
                .collect(),
        )
    };
    match part {
        "attn_q" => one(L::Wq),
        "attn_k" => one(L::Wk),
        "attn_v" => one(L::Wv),
        "attn_output" => one(L::Wo),
        "ffn_gate" => one(L::Ffn(Proj::Gate)),
        "ffn_up" => one(L::Ffn(Proj::Up)),
        "ffn_down" => one(L::Ffn(Proj::Down)),
        "ffn_gate_shexp" => one(L::Shared(Proj::Gate)),
        "ffn_up_shexp" => one(L::Shared(Proj::Up)),
        "ffn_down_shexp" => one(L::Shared(Proj::Down)),
        "ffn_gate_exps" => experts(Proj::Gate),
        "ffn_up_exps" => experts(Proj::Up),
        "ffn_down_exps" => experts(Proj::Down),
        _ => None,
    }
}

/// Matrices of a stacked GGUF tensor `name` in a model of `n_experts` routed experts per
/// MoE layer (its experts), else 1.
fn n_mat_of(name: &str, n_experts: usize) -> usize {
    if name.ends_with("_exps.weight") {
        n_experts.max(1)
    } else {
        1
    }
}

/// Push the entries of GGUF matrix `name`: `n_mat` matrices of `cols` columns, matrix `m`'s
/// mean squares `mean(m, c)` over `rows(m)` rows (matrices with no rows are left out).
fn push(
    out: &mut Imatrix,
    name: &str,
    n_mat: usize,
    cols: usize,
    rows: &dyn Fn(usize) -> u64,
    mean: &dyn Fn(usize, usize) -> f32,
) -> usize {
    let Some(names) = fqm_names(name, n_mat) else {
        return 0;
    };
    let mut n = 0;
    for (m, t) in names.into_iter().enumerate() {
        let r = rows(m);
        if r == 0 {
            continue;
        }
        let values: Vec<f32> = (0..cols).map(|c| mean(m, c)).collect();
        out.entries.push(Entry {
            tensors: vec![t],
            rows: r,
            values,
        });
        n += 1;
    }
    n
}

/// Read a llama.cpp imatrix (either format) for a model with `n_experts` routed experts per
/// MoE layer (the legacy format does not record how a stacked tensor splits); `path` names
/// the file in errors. Never panics on bad input.
pub fn read(b: Vec<u8>, n_experts: usize, path: &Path) -> Result<Imatrix> {
    let mut im = if b.starts_with(b"GGUF") {
        read_gguf(b, path)?
    } else {
        read_legacy(&b, n_experts, path)?
    };
    if im.entries.is_empty() {
        return Err(Error::format(
            path,
            "llama.cpp imatrix: no statistics for a matrix ferroq quantizes (made for another \
             architecture?)",
        ));
    }
    im.model = format!("llama.cpp imatrix {}", path.display());
    Ok(im)
}

fn bad(path: &Path, msg: impl Into<String>) -> Error {
    Error::format(path, format!("llama.cpp imatrix: {}", msg.into()))
}

fn read_gguf(b: Vec<u8>, path: &Path) -> Result<Imatrix> {
    let g = GgufFile::from_bytes(path.display().to_string(), b)?;
    let mut im = Imatrix {
        n_chunks: g.opt_u64("imatrix.chunk_count").ok().flatten().unwrap_or(0) as u32,
        n_ctx: g.opt_u64("imatrix.chunk_size").ok().flatten().unwrap_or(0) as u32,
        ..Imatrix::default()
    };
    let (mut sums, mut counts) = (Vec::new(), Vec::new());
    for t in &g.tensors {
        let Some(name) = t.name.strip_suffix(".in_sum2") else {
            continue;
        };
        let ct = format!("{name}.counts");
        let Some(c) = g.tensor(&ct) else {
            return Err(bad(path, format!("`{}` has no `{ct}`", t.name)));
        };
        if t.ty != GgmlType::F32 || c.ty != GgmlType::F32 {
            return Err(bad(path, format!("`{}` or its counts are not f32", t.name)));
        }
        let cols = *t.dims.first().unwrap_or(&0) as usize;
        let n_mat = t.dims.iter().skip(1).product::<u64>() as usize;
        if cols == 0 || n_mat == 0 || c.n_elements as usize != n_mat {
            return Err(bad(
                path,
                format!(
                    "`{}` has dims {:?} but {} counts",
                    t.name, t.dims, c.n_elements
                ),
            ));
        }
        g.read_f32(&t.name, &mut sums)?;
        g.read_f32(&ct, &mut counts)?;
        if let Some(v) = sums
            .iter()
            .chain(&counts)
            .find(|v| !v.is_finite() || **v < 0.0)
        {
            return Err(bad(path, format!("`{name}` holds the value {v}")));
        }
        let (s, k) = (&sums, &counts);
        push(&mut im, name, n_mat, cols, &|m| k[m] as u64, &|m, col| {
            s[m * cols + col] / k[m]
        });
    }
    Ok(im)
}

/// A little-endian reader over a legacy file.
struct Le<'a> {
    b: &'a [u8],
    at: usize,
    path: &'a Path,
}

impl<'a> Le<'a> {
    fn bytes(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        let v = self
            .at
            .checked_add(n)
            .and_then(|end| self.b.get(self.at..end))
            .ok_or_else(|| bad(self.path, format!("the file ends inside {what}")))?;
        self.at += n;
        Ok(v)
    }
    fn i32(&mut self, what: &str) -> Result<i32> {
        let v = self.bytes(4, what)?;
        Ok(i32::from_le_bytes([v[0], v[1], v[2], v[3]]))
    }
}

fn read_legacy(b: &[u8], n_experts: usize, path: &Path) -> Result<Imatrix> {
    let mut r = Le { b, at: 0, path };
    let n = r.i32("the entry count")?;
    if n <= 0 || n as usize > MAX_ENTRIES {
        return Err(bad(path, format!("{n} entries (1 ..= {MAX_ENTRIES})")));
    }
    let mut entries = Vec::new();
    for i in 0..n as usize {
        let len = r.i32("a name length")?;
        if len <= 0 || len as usize > MAX_NAME {
            return Err(bad(path, format!("entry {i}: a name of {len} bytes")));
        }
        let name = std::str::from_utf8(r.bytes(len as usize, "a name")?)
            .map_err(|_| bad(path, format!("entry {i}: the name is not UTF-8")))?
            .to_string();
        let ncall = r.i32("ncall")?;
        let nval = r.i32("nval")?;
        if ncall < 0 || nval < 0 || nval as usize > MAX_VALUES {
            return Err(bad(path, format!("`{name}`: ncall {ncall}, nval {nval}")));
        }
        let raw = r.bytes(4 * nval as usize, "the values")?;
        let vals: Vec<f32> = raw
            .chunks_exact(4)
            .map(|v| f32::from_le_bytes([v[0], v[1], v[2], v[3]]))
            .collect();
        if let Some(v) = vals.iter().find(|v| !v.is_finite() || **v < 0.0) {
            return Err(bad(path, format!("`{name}` holds the value {v}")));
        }
        entries.push((name, ncall, vals));
    }
    // the trailing last chunk and dataset name are optional (older files end here)
    let mut im = Imatrix::default();
    if let Ok(chunks) = r.i32("the chunk count") {
        im.n_chunks = chunks.max(0) as u32;
        let len = r.i32("the dataset name's length").unwrap_or(0);
        if len > 0 && len as usize <= MAX_NAME {
            if let Ok(d) = r.bytes(len as usize, "the dataset name") {
                im.dataset = String::from_utf8_lossy(d).into_owned();
            }
        }
    }
    for (name, ncall, vals) in &entries {
        let n_mat = n_mat_of(name, n_experts);
        if vals.len() % n_mat != 0 {
            return Err(bad(
                path,
                format!(
                    "`{name}` has {} values, not a multiple of {n_mat} experts",
                    vals.len()
                ),
            ));
        }
        if vals.is_empty() || *ncall == 0 {
            continue;
        }
        let cols = vals.len() / n_mat;
        let nc = *ncall as f32;
        push(&mut im, name, n_mat, cols, &|_| *ncall as u64, &|m, c| {
            vals[m * cols + c] / nc
        });
    }
    Ok(im)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_fqm_matrices() {
        assert_eq!(
            fqm_names("blk.3.attn_q.weight", 1).unwrap(),
            ["layers.3.wq"]
        );
        assert_eq!(fqm_names("output.weight", 1).unwrap(), ["output"]);
        let e = fqm_names("blk.0.ffn_down_exps.weight", 3).unwrap();
        assert_eq!(
            e,
            [
                "layers.0.experts.0.down",
                "layers.0.experts.1.down",
                "layers.0.experts.2.down"
            ]
        );
        // the router stays f32; unknown and malformed names are skipped
        for n in [
            "blk.0.ffn_gate_inp.weight",
            "blk.x.attn_q.weight",
            "blk.01x.attn_q.weight",
            "token_embd.weight",
            "blk.0.attn_q.bias",
        ] {
            assert!(fqm_names(n, 1).is_none(), "{n}");
        }
        assert!(
            fqm_names("blk.0.attn_q.weight", 2).is_none(),
            "one matrix expected"
        );
    }

    fn legacy(entries: &[(&str, i32, &[f32])], tail: bool) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&(entries.len() as i32).to_le_bytes());
        for (name, ncall, vals) in entries {
            b.extend_from_slice(&(name.len() as i32).to_le_bytes());
            b.extend_from_slice(name.as_bytes());
            b.extend_from_slice(&ncall.to_le_bytes());
            b.extend_from_slice(&(vals.len() as i32).to_le_bytes());
            for v in *vals {
                b.extend_from_slice(&v.to_le_bytes());
            }
        }
        if tail {
            b.extend_from_slice(&7i32.to_le_bytes());
            b.extend_from_slice(&4i32.to_le_bytes());
            b.extend_from_slice(b"emma");
        }
        b
    }

    fn cfg(experts: usize) -> usize {
        experts
    }

    #[test]
    fn legacy_files_are_read_as_llama_quantize_reads_them() {
        let p = Path::new("x.dat");
        // values are mean · ncall; two experts of 2 columns stacked
        let b = legacy(
            &[
                ("blk.0.attn_q.weight", 4, &[4.0, 8.0]),
                ("blk.0.ffn_gate_inp.weight", 4, &[1.0, 1.0]),
                ("blk.1.ffn_up_exps.weight", 2, &[2.0, 4.0, 6.0, 8.0]),
            ],
            true,
        );
        assert!(is_llama(&b));
        let im = read(b.clone(), cfg(2), p).unwrap();
        assert_eq!((im.n_chunks, im.dataset.as_str()), (7, "emma"));
        let got: Vec<(String, Vec<f32>)> = im
            .entries
            .iter()
            .map(|e| (e.tensors[0].clone(), e.values.clone()))
            .collect();
        assert_eq!(
            got,
            [
                ("layers.0.wq".to_string(), vec![1.0, 2.0]),
                ("layers.1.experts.0.up".to_string(), vec![1.0, 2.0]),
                ("layers.1.experts.1.up".to_string(), vec![3.0, 4.0]),
            ]
        );
        // without the optional tail, too
        let b = legacy(&[("blk.0.attn_q.weight", 1, &[1.0])], false);
        assert_eq!(read(b.clone(), cfg(1), p).unwrap().entries.len(), 1);
    }

    #[test]
    fn bad_legacy_files_are_errors() {
        let p = Path::new("x.dat");
        let good = legacy(&[("blk.0.attn_q.weight", 4, &[4.0, 8.0])], true);
        for cut in [0, 3, 9, 20, 30] {
            assert!(
                read(good[..cut].to_vec(), cfg(1), p).is_err(),
                "cut at {cut}"
            );
        }
        for (b, want) in [
            (
                legacy(&[("blk.0.attn_q.weight", 1, &[f32::NAN])], true),
                "value",
            ),
            (
                legacy(&[("blk.0.attn_q.weight", 1, &[-1.0])], true),
                "value",
            ),
            (
                legacy(&[("blk.0.ffn_up_exps.weight", 1, &[1.0, 2.0, 3.0])], true),
                "multiple",
            ),
            (
                legacy(&[("blk.0.ffn_gate_inp.weight", 1, &[1.0])], true),
                "no statistics",
            ),
        ] {
            let e = read(b.clone(), cfg(2), p).unwrap_err().to_string();
            assert!(e.contains(want) && e.contains("x.dat"), "{e}");
        }
        let mut huge = 1_000_000_000i32.to_le_bytes().to_vec();
        huge.extend_from_slice(&[0; 16]);
        assert!(read(huge, cfg(1), p).is_err());
    }
}
