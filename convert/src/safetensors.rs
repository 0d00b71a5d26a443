//! Memory-mapped safetensors reader: one file, or a sharded checkpoint described by
//! `model.safetensors.index.json`.
//!
//! The files are untrusted input: the header length, the JSON header, every dtype, shape and
//! data offset are validated against the file length when the file is opened, so a corrupt file
//! yields an [`Error`] naming the file and tensor, never a panic or an out-of-bounds read.
//! Tensor data is converted to f32 on demand, one tensor (or one slice along dim 0) at a time.

use super::source::{SrcTensor, TensorSource};
use ferroq::{Error, Result};
use memmap2::Mmap;
use rayon::prelude::*;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Cap on the JSON header (the format itself caps it at 100 MB).
const MAX_HEADER: u64 = 100 << 20;

/// Element types we can convert to f32.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StDType {
    F32,
    F16,
    Bf16,
    /// A type the format knows but the converter does not read (I64, F8_E4M3, ...):
    /// element size in bytes.
    Other(usize),
    /// A dtype string we do not know: no size check possible, reading it is an error.
    Unknown,
}

impl StDType {
    fn parse(s: &str) -> StDType {
        match s {
            "F32" => StDType::F32,
            "F16" => StDType::F16,
            "BF16" => StDType::Bf16,
            "F64" | "I64" | "U64" => StDType::Other(8),
            "I32" | "U32" => StDType::Other(4),
            "I16" | "U16" => StDType::Other(2),
            "I8" | "U8" | "BOOL" | "F8_E4M3" | "F8_E5M2" | "F8_E8M0" => StDType::Other(1),
            _ => StDType::Unknown,
        }
    }
    fn size(self) -> Option<usize> {
        match self {
            StDType::F32 => Some(4),
            StDType::F16 | StDType::Bf16 => Some(2),
            StDType::Other(n) => Some(n),
            StDType::Unknown => None,
        }
    }
}

struct Shard {
    path: PathBuf,
    map: Mmap,
}

struct Entry {
    shard: usize,
    dtype: StDType,
    /// Absolute byte range inside the shard's mapping.
    start: usize,
    end: usize,
}

/// A safetensors checkpoint (one or many files), memory-mapped.
pub struct SafetensorsSource {
    shards: Vec<Shard>,
    tensors: Vec<SrcTensor>,
    entries: Vec<Entry>,
    index: HashMap<String, usize>,
}

impl std::fmt::Debug for SafetensorsSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SafetensorsSource")
            .field("shards", &self.shards.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl SafetensorsSource {
    /// Open one `.safetensors` file.
    pub fn open_file(path: impl AsRef<Path>) -> Result<SafetensorsSource> {
        let mut s = SafetensorsSource::empty();
        s.add_shard(path.as_ref())?;
        Ok(s)
    }

    /// Open the safetensors of a Hugging Face model directory: the shards listed in
    /// `model.safetensors.index.json` if present, else `model.safetensors`, else every
    /// `*.safetensors` file in the directory (sorted by name).
    pub fn open_dir(dir: impl AsRef<Path>) -> Result<SafetensorsSource> {
        let dir = dir.as_ref();
        let index_path = dir.join("model.safetensors.index.json");
        let mut s = SafetensorsSource::empty();
        if index_path.is_file() {
            let text = std::fs::read(&index_path).map_err(|e| Error::io(&index_path, e))?;
            let v: serde_json::Value = serde_json::from_slice(&text)
                .map_err(|e| Error::format(&index_path, format!("not valid JSON: {e}")))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| Error::format(&index_path, "no `weight_map` object"))?;
            let mut files: Vec<&str> = Vec::new();
            for (name, f) in map {
                let f = f.as_str().ok_or_else(|| {
                    Error::format(&index_path, format!("weight_map[`{name}`] is not a string"))
                })?;
                // the index is untrusted: shard names must be plain file names in `dir`
                if f.is_empty() || f.contains('/') || f.contains('\\') || f.starts_with('.') {
                    return Err(Error::format(
                        &index_path,
                        format!("weight_map[`{name}`]: `{f}` is not a plain file name"),
                    ));
                }
                if !files.contains(&f) {
                    files.push(f);
                }
            }
            files.sort_unstable();
            for f in &files {
                s.add_shard(&dir.join(f))?;
            }
            for (name, f) in map {
                let Some(&i) = s.index.get(name) else {
                    return Err(Error::format(
                        &index_path,
                        format!("tensor `{name}` is listed for `{}` but not in it", f),
                    ));
                };
                let shard = &s.shards[s.entries[i].shard].path;
                if shard.file_name().and_then(|n| n.to_str()) != f.as_str() {
                    return Err(Error::format(
                        &index_path,
                        format!(
                            "tensor `{name}` is listed for {f} but found in {}",
                            shard.display()
                        ),
                    ));
                }
            }
        } else if dir.join("model.safetensors").is_file() {
            s.add_shard(&dir.join("model.safetensors"))?;
        } else {
            let rd = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
            let mut files: Vec<PathBuf> = rd
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "safetensors") && p.is_file())
                .collect();
            files.sort();
            if files.is_empty() {
                return Err(Error::format(
                    dir,
                    "no *.safetensors files in this directory",
                ));
            }
            for f in &files {
                s.add_shard(f)?;
            }
        }
        Ok(s)
    }

    fn empty() -> SafetensorsSource {
        SafetensorsSource {
            shards: vec![],
            tensors: vec![],
            entries: vec![],
            index: HashMap::new(),
        }
    }

    fn add_shard(&mut self, path: &Path) -> Result<()> {
        let bad = |m: String| Error::format(path, m);
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        if len < 8 {
            return Err(bad(format!(
                "{len} bytes: too short for a safetensors header"
            )));
        }
        // SAFETY: read-only private mapping; all accesses go through bounds-checked slices. A
        // concurrent truncation of the file by another process could fault (the usual mmap
        // caveat); we never write through the mapping.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let n = u64::from_le_bytes(map[0..8].try_into().expect("8 bytes"));
        if n > MAX_HEADER || n > len - 8 {
            return Err(bad(format!(
                "header length {n} exceeds the file ({len} bytes) or the 100 MB cap"
            )));
        }
        let data_start = 8 + n as usize;
        let data_len = map.len() - data_start;
        let header: serde_json::Value = serde_json::from_slice(&map[8..data_start])
            .map_err(|e| bad(format!("header is not valid JSON: {e}")))?;
        let obj = header
            .as_object()
            .ok_or_else(|| bad("header is not a JSON object".into()))?;
        let shard = self.shards.len();
        let mut new: Vec<(String, SrcTensor, Entry)> = Vec::with_capacity(obj.len());
        for (name, t) in obj {
            if name == "__metadata__" {
                continue;
            }
            let tbad = |m: &str| Error::format(path, format!("tensor `{name}`: {m}"));
            let dts = t
                .get("dtype")
                .and_then(|d| d.as_str())
                .ok_or_else(|| tbad("no string `dtype`"))?;
            let dtype = StDType::parse(dts);
            let shape_v = t
                .get("shape")
                .and_then(|s| s.as_array())
                .ok_or_else(|| tbad("no `shape` array"))?;
            let mut shape = Vec::with_capacity(shape_v.len());
            for d in shape_v {
                let d = d
                    .as_u64()
                    .and_then(|d| usize::try_from(d).ok())
                    .ok_or_else(|| tbad("shape entries must be non-negative integers"))?;
                shape.push(d);
            }
            let offs = t
                .get("data_offsets")
                .and_then(|o| o.as_array())
                .filter(|o| o.len() == 2)
                .ok_or_else(|| tbad("no `data_offsets` pair"))?;
            let (a, b) = match (offs[0].as_u64(), offs[1].as_u64()) {
                (Some(a), Some(b)) if a <= b && b <= data_len as u64 => (a as usize, b as usize),
                _ => {
                    return Err(tbad(&format!(
                        "data_offsets {offs:?} lie outside the {data_len}-byte data section"
                    )))
                }
            };
            if let Some(sz) = dtype.size() {
                let want = shape
                    .iter()
                    .try_fold(sz, |acc: usize, &d| acc.checked_mul(d))
                    .ok_or_else(|| tbad(&format!("shape {shape:?} overflows")))?;
                if want != b - a {
                    return Err(tbad(&format!(
                        "{} bytes stored but {dts} {shape:?} needs {want}",
                        b - a
                    )));
                }
            }
            let src = SrcTensor {
                name: name.clone(),
                shape,
                dtype: dts.to_ascii_lowercase(),
            };
            let e = Entry {
                shard,
                dtype,
                start: data_start + a,
                end: data_start + b,
            };
            new.push((name.clone(), src, e));
        }
        // file order (by offset) makes streaming reads sequential
        new.sort_by_key(|(_, _, e)| e.start);
        for (name, src, e) in new {
            if self.index.contains_key(&name) {
                return Err(bad(format!("tensor `{name}` appears in two shards")));
            }
            self.index.insert(name, self.tensors.len());
            self.tensors.push(src);
            self.entries.push(e);
        }
        self.shards.push(Shard {
            path: path.to_path_buf(),
            map,
        });
        Ok(())
    }

    /// Drop the pages of bytes `start..end` of a shard from our resident set once they have been
    /// converted, so that a conversion's RSS stays at about one tensor instead of growing to the
    /// whole checkpoint (file pages of a mapping count as resident). Only whole 64 KiB units
    /// inside the range are dropped (a multiple of every common page size); a failure is
    /// ignored, this is only a hint.
    fn release(&self, shard: usize, start: usize, end: usize) {
        #[cfg(unix)]
        {
            const UNIT: usize = 64 << 10;
            let (a, b) = (start.next_multiple_of(UNIT), end / UNIT * UNIT);
            if b > a {
                // SAFETY: the mapping is a read-only, private mapping of a file that we never
                // write, so it holds no modified (copy-on-write) pages. MADV_DONTNEED on such
                // a range only drops the page references: the next access (by any thread)
                // faults the same bytes back in from the file, so no live borrow of the
                // mapping can observe a change. `a..b` lies inside the mapping.
                let _ = unsafe {
                    self.shards[shard].map.unchecked_advise_range(
                        memmap2::UncheckedAdvice::DontNeed,
                        a,
                        b - a,
                    )
                };
            }
        }
    }

    /// Bytes of `name`, with its entry.
    fn raw(&self, name: &str) -> Result<(&SrcTensor, &Entry, &[u8])> {
        let &i = self
            .index
            .get(name)
            .ok_or_else(|| Error::tensor(name, "missing from the checkpoint"))?;
        let e = &self.entries[i];
        Ok((
            &self.tensors[i],
            e,
            &self.shards[e.shard].map[e.start..e.end],
        ))
    }
}

/// Convert little-endian `bytes` of `dtype` to f32 into `out` (resized), in parallel for large
/// tensors.
fn to_f32(
    name: &str,
    src_dtype: &str,
    dtype: StDType,
    bytes: &[u8],
    out: &mut Vec<f32>,
) -> Result<()> {
    const CHUNK: usize = 1 << 16;
    match dtype {
        StDType::F32 => {
            out.clear();
            out.resize(bytes.len() / 4, 0.0);
            out.par_chunks_mut(CHUNK)
                .zip(bytes.par_chunks(CHUNK * 4))
                .for_each(|(o, b)| {
                    for (x, c) in o.iter_mut().zip(b.chunks_exact(4)) {
                        *x = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                    }
                });
        }
        StDType::Bf16 | StDType::F16 => {
            out.clear();
            out.resize(bytes.len() / 2, 0.0);
            let is_bf16 = dtype == StDType::Bf16;
            out.par_chunks_mut(CHUNK)
                .zip(bytes.par_chunks(CHUNK * 2))
                .for_each(|(o, b)| {
                    for (x, c) in o.iter_mut().zip(b.chunks_exact(2)) {
                        let bits = u16::from_le_bytes([c[0], c[1]]);
                        *x = if is_bf16 {
                            half::bf16::from_bits(bits).to_f32()
                        } else {
                            half::f16::from_bits(bits).to_f32()
                        };
                    }
                });
        }
        StDType::Other(_) | StDType::Unknown => {
            return Err(Error::tensor(
                name,
                format!("unsupported dtype {src_dtype} (the converter reads f32, f16 and bf16)"),
            ))
        }
    }
    Ok(())
}

impl TensorSource for SafetensorsSource {
    fn tensors(&self) -> &[SrcTensor] {
        &self.tensors
    }

    fn find(&self, name: &str) -> Option<&SrcTensor> {
        self.index.get(name).map(|&i| &self.tensors[i])
    }

    fn read_f32(&self, name: &str, out: &mut Vec<f32>) -> Result<()> {
        let (t, e, bytes) = self.raw(name)?;
        to_f32(name, &t.dtype, e.dtype, bytes, out)?;
        self.release(e.shard, e.start, e.end);
        Ok(())
    }

    fn read_f32_outer(&self, name: &str, index: usize, out: &mut Vec<f32>) -> Result<()> {
        let (t, e, bytes) = self.raw(name)?;
        let Some(&outer) = t.shape.first() else {
            return Err(Error::tensor(name, "a scalar has no slices"));
        };
        if index >= outer {
            return Err(Error::tensor(
                name,
                format!("slice {index} requested of shape {:?}", t.shape),
            ));
        }
        // sizes were validated at open: bytes.len() == outer * slice
        let slice = bytes.len() / outer;
        to_f32(
            name,
            &t.dtype,
            e.dtype,
            &bytes[index * slice..(index + 1) * slice],
            out,
        )?;
        let start = e.start + index * slice;
        self.release(e.shard, start, start + slice);
        Ok(())
    }
}
