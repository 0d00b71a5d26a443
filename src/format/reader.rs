//! `.fqm` reader: map, validate everything, hand out typed views.

use super::xxh64::xxh64;
use super::{
    DType, HEADER_SIZE, MAGIC, MAX_DIMS, MAX_META_LEN, MAX_NAME_LEN, MAX_TENSORS, MIN_VERSION,
    TENSOR_ALIGN, VERSION,
};
use crate::{Error, Result};
use ferroq_kernels::block::{BlockQ4Lx8, BlockQ4x8, BlockQ6x8, BlockQ8x8};
use memmap2::Mmap;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Directory entry of one tensor (validated).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// Absolute byte offset in the file (multiple of 64).
    pub offset: usize,
    pub nbytes: usize,
    /// XXH64 of the tensor's bytes (format version 2; `None` in version 1 files).
    pub checksum: Option<u64>,
}

/// A typed view of one tensor's bytes inside the mapping.
#[derive(Clone, Copy, Debug)]
pub struct TensorView<'a> {
    pub info: &'a TensorInfo,
    pub data: &'a [u8],
}

impl<'a> TensorView<'a> {
    fn want(&self, d: DType) -> Result<()> {
        if self.info.dtype != d {
            return Err(Error::tensor(
                &self.info.name,
                format!("is {}, {} expected", self.info.dtype.name(), d.name()),
            ));
        }
        Ok(())
    }
    fn cast<T: bytemuck::Pod>(&self) -> Result<&'a [T]> {
        bytemuck::try_cast_slice(self.data)
            .map_err(|e| Error::tensor(&self.info.name, format!("bad alignment or size: {e}")))
    }
    pub fn f32s(&self) -> Result<&'a [f32]> {
        self.want(DType::F32)?;
        self.cast()
    }
    /// bf16 or f16 bits.
    pub fn u16s(&self) -> Result<&'a [u16]> {
        if !matches!(self.info.dtype, DType::Bf16 | DType::F16) {
            return Err(Error::tensor(&self.info.name, "16-bit float expected"));
        }
        self.cast()
    }
    /// The blocks of a quantized tensor, typed by its registered weight type.
    pub fn qmat(&self) -> Result<ferroq_kernels::QMat<'a>> {
        ferroq_kernels::QMat::cast(self.info.dtype.name(), self.data).ok_or_else(|| {
            Error::tensor(
                &self.info.name,
                format!(
                    "is {}, not a quantized type (or misaligned)",
                    self.info.dtype.name()
                ),
            )
        })
    }
    /// The blocks of a tensor of registered weight type `B`.
    pub fn blocks<B: ferroq_kernels::WeightType>(&self) -> Result<&'a [B]> {
        if self.info.dtype.name() != B::NAME {
            return Err(Error::tensor(
                &self.info.name,
                format!("is {}, {} expected", self.info.dtype.name(), B::NAME),
            ));
        }
        self.cast()
    }
    pub fn q4x8(&self) -> Result<&'a [BlockQ4x8]> {
        self.blocks()
    }
    pub fn q4lx8(&self) -> Result<&'a [BlockQ4Lx8]> {
        self.blocks()
    }
    pub fn q6x8(&self) -> Result<&'a [BlockQ6x8]> {
        self.blocks()
    }
    pub fn q8x8(&self) -> Result<&'a [BlockQ8x8]> {
        self.blocks()
    }
}

/// What [`FqmFile::verify`] checked.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct VerifyReport {
    pub tensors: usize,
    pub bytes: u64,
    pub seconds: f64,
}

/// Files up to this size are read into memory at open instead of mapped (a few ms): a small
/// model then cannot be changed or truncated underneath (no SIGBUS). Larger ones are mapped, so
/// opening stays instant and resident memory is the pages the forward pass touches.
pub const COPY_BELOW: u64 = 64 << 20;

/// An open, validated `.fqm` file.
pub struct FqmFile {
    path: PathBuf,
    version: u32,
    /// Read into anonymous memory (files up to [`COPY_BELOW`]) rather than mapped from the file.
    copied: bool,
    map: Mmap,
    meta: serde_json::Value,
    tensors: Vec<TensorInfo>,
    index: HashMap<String, usize>,
}

impl std::fmt::Debug for FqmFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FqmFile")
            .field("path", &self.path)
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

/// Little-endian cursor over the directory that reports truncation instead of panicking.
struct Cursor<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let s = self.b.get(self.pos..end)?;
        self.pos = end;
        Some(s)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|s| s[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|s| u16::from_le_bytes([s[0], s[1]]))
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8)
            .map(|s| u64::from_le_bytes(s.try_into().unwrap()))
    }
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}
fn le_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

impl FqmFile {
    /// Map and validate `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<FqmFile> {
        let path = path.as_ref();
        let bad = |msg: String| Error::format(path, msg);
        if cfg!(target_endian = "big") {
            return Err(bad(
                "the .fqm format is little-endian; big-endian hosts are not supported".into(),
            ));
        }
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let meta = file.metadata().map_err(|e| Error::io(path, e))?;
        if meta.is_dir() {
            return Err(bad(
                "is a directory, not a .fqm model (`ferroq convert DIR -o model.fqm` makes one \
                 from a Hugging Face checkpoint directory)"
                    .into(),
            ));
        }
        let len = meta.len();
        if len < HEADER_SIZE as u64 {
            return Err(bad(format!(
                "file is {len} bytes, shorter than the {HEADER_SIZE}-byte header"
            )));
        }
        let map = if len <= COPY_BELOW {
            // small files are copied into anonymous memory with read(2): a file truncated or
            // rewritten later cannot change the bytes or raise SIGBUS (docs/reliability.md)
            let mut m = memmap2::MmapMut::map_anon(len as usize).map_err(|e| Error::io(path, e))?;
            let mut f = &file;
            std::io::Read::read_exact(&mut f, &mut m).map_err(|e| Error::io(path, e))?;
            m.make_read_only().map_err(|e| Error::io(path, e))?
        } else {
            // SAFETY: the mapping is read-only and private to this process. Another process
            // truncating or rewriting the file while it is mapped could change the bytes under
            // us (SIGBUS on truncation); this is the standard mmap caveat, documented in
            // SPEC.md and docs/reliability.md. All reads go through bounds-checked slices of
            // the mapping.
            unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?
        };
        let b: &[u8] = &map;
        // header
        if b[0..8] != MAGIC {
            return Err(bad("not a ferroq model (bad magic)".into()));
        }
        let version = le_u32(b, 8);
        if !(MIN_VERSION..=VERSION).contains(&version) {
            return Err(bad(format!(
                "format version {version} is not supported (this build reads \
                 {MIN_VERSION}..={VERSION}; a newer ferroq may read it)"
            )));
        }
        let v2 = version >= 2;
        let header_size = le_u32(b, 12) as usize;
        if header_size != HEADER_SIZE {
            return Err(bad(format!(
                "header_size {header_size}, expected {HEADER_SIZE}"
            )));
        }
        let (meta_off, meta_len, dir_off, dir_len, n_tensors, file_len) = (
            le_u64(b, 16),
            le_u64(b, 24),
            le_u64(b, 32),
            le_u64(b, 40),
            le_u64(b, 48),
            le_u64(b, 56),
        );
        if file_len != len {
            return Err(bad(format!(
                "header says {file_len} bytes but the file has {len} (truncated or padded?)"
            )));
        }
        let range = |what: &str, off: u64, n: u64| -> Result<std::ops::Range<usize>> {
            match off.checked_add(n) {
                Some(end) if off >= HEADER_SIZE as u64 && end <= len => {
                    Ok(off as usize..end as usize)
                }
                _ => Err(Error::format(
                    path,
                    format!("{what} (offset {off}, {n} bytes) lies outside the file"),
                )),
            }
        };
        if meta_len > MAX_META_LEN {
            return Err(bad(format!("metadata length {meta_len} exceeds the cap")));
        }
        if n_tensors > MAX_TENSORS {
            return Err(bad(format!("tensor count {n_tensors} exceeds the cap")));
        }
        let meta_r = range("metadata", meta_off, meta_len)?;
        let dir_r = range("tensor directory", dir_off, dir_len)?;
        // version 2: the directory ends with the checksums of the metadata and of itself,
        // checked before anything in them is trusted (both are small: opening stays instant)
        let dir_r = if v2 {
            let d = &b[dir_r.clone()];
            if d.len() < 16 {
                return Err(bad(format!(
                    "tensor directory is {} bytes, shorter than its 16-byte checksum trailer",
                    d.len()
                )));
            }
            let (body, dir_sum) = d.split_at(d.len() - 8);
            if xxh64(body).to_le_bytes() != dir_sum {
                return Err(bad(
                    "checksum mismatch in the tensor directory: the file is corrupt (copy or \
                     download it again, or reconvert it)"
                        .into(),
                ));
            }
            let meta_sum = &body[body.len() - 8..];
            if xxh64(&b[meta_r.clone()]).to_le_bytes() != meta_sum {
                return Err(bad(
                    "checksum mismatch in the metadata: the file is corrupt (copy or download \
                     it again, or reconvert it)"
                        .into(),
                ));
            }
            dir_r.start..dir_r.end - 16
        } else {
            dir_r
        };
        let meta: serde_json::Value = serde_json::from_slice(&b[meta_r])
            .map_err(|e| bad(format!("metadata is not valid JSON: {e}")))?;
        if !meta.is_object() {
            return Err(bad("metadata is not a JSON object".into()));
        }
        // directory
        let mut cur = Cursor {
            b: &b[dir_r],
            pos: 0,
        };
        // a corrupt count must not make us reserve gigabytes: an entry takes at least
        // MIN_ENTRY bytes of the directory
        let min_entry: u64 = 2 + 1 + 1 + 1 + 8 + 8 + if v2 { 8 } else { 0 };
        let cap = n_tensors.min(dir_len / min_entry) as usize;
        let mut tensors = Vec::with_capacity(cap);
        let mut index = HashMap::with_capacity(cap);
        for i in 0..n_tensors {
            let trunc = || Error::format(path, format!("tensor directory truncated at entry {i}"));
            let name_len = cur.u16().ok_or_else(trunc)? as usize;
            if name_len == 0 || name_len > MAX_NAME_LEN {
                return Err(bad(format!(
                    "tensor entry {i}: name length {name_len} out of range"
                )));
            }
            let name = std::str::from_utf8(cur.take(name_len).ok_or_else(trunc)?)
                .map_err(|_| bad(format!("tensor entry {i}: name is not UTF-8")))?
                .to_string();
            let tbad = |msg: String| Error::format(path, format!("tensor `{name}`: {msg}"));
            let dt = cur.u8().ok_or_else(trunc)?;
            let dtype =
                DType::from_u8(dt).ok_or_else(|| tbad(format!("unknown dtype code {dt}")))?;
            let ndim = cur.u8().ok_or_else(trunc)? as usize;
            if ndim > MAX_DIMS {
                return Err(tbad(format!("rank {ndim} exceeds {MAX_DIMS}")));
            }
            let mut shape = Vec::with_capacity(ndim);
            for _ in 0..ndim {
                let d = cur.u64().ok_or_else(trunc)?;
                shape.push(
                    usize::try_from(d).map_err(|_| tbad(format!("dimension {d} too large")))?,
                );
            }
            let offset = cur.u64().ok_or_else(trunc)?;
            let nbytes = cur.u64().ok_or_else(trunc)?;
            let checksum = if v2 {
                Some(cur.u64().ok_or_else(trunc)?)
            } else {
                None
            };
            let expect = dtype.nbytes(&shape).ok_or_else(|| {
                tbad(format!(
                    "shape {shape:?} is invalid for {} or overflows",
                    dtype.name()
                ))
            })?;
            if expect as u64 != nbytes {
                return Err(tbad(format!(
                    "{nbytes} bytes recorded, {expect} expected for {} {shape:?}",
                    dtype.name()
                )));
            }
            if offset % TENSOR_ALIGN != 0 {
                return Err(tbad(format!(
                    "offset {offset} is not {TENSOR_ALIGN}-byte aligned"
                )));
            }
            let r = range(&format!("tensor `{name}`"), offset, nbytes)?;
            if index.insert(name.clone(), tensors.len()).is_some() {
                return Err(tbad("appears twice in the directory".into()));
            }
            tensors.push(TensorInfo {
                name,
                dtype,
                shape,
                offset: r.start,
                nbytes: r.len(),
                checksum,
            });
        }
        if cur.pos != cur.b.len() {
            return Err(bad(format!(
                "{} trailing bytes after the tensor directory",
                cur.b.len() - cur.pos
            )));
        }
        Ok(FqmFile {
            path: path.to_path_buf(),
            version,
            copied: len <= COPY_BELOW,
            map,
            meta,
            tensors,
            index,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the bytes are a private copy (files up to [`COPY_BELOW`]) rather than a mapping
    /// of the file. `madvise(MADV_DONTNEED)` on a copy would zero it: page-management code must
    /// check this.
    pub fn is_copied(&self) -> bool {
        self.copied
    }

    /// The file's format version (1: no checksums; 2: checksummed).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Check every tensor's bytes against its recorded checksum (reads the whole file, in
    /// parallel over tensors). `progress(done_bytes, total_bytes)` is called as tensors finish.
    /// An error names the first (in file order) corrupt tensor; a version 1 file has no
    /// checksums and is an error too (nothing could be verified).
    pub fn verify(&self, progress: &(dyn Fn(u64, u64) + Sync)) -> Result<VerifyReport> {
        use rayon::prelude::*;
        use std::sync::atomic::{AtomicU64, Ordering};
        if self.version < 2 {
            return Err(Error::format(
                &self.path,
                format!(
                    "format version {} has no checksums, so it cannot be verified (reconvert \
                     the model with this ferroq to add them)",
                    self.version
                ),
            ));
        }
        let total: u64 = self.tensors.iter().map(|t| t.nbytes as u64).sum();
        let done = AtomicU64::new(0);
        let t0 = std::time::Instant::now();
        let bad: Vec<usize> = self
            .tensors
            .par_iter()
            .enumerate()
            .filter_map(|(i, t)| {
                let ok = t.checksum == Some(xxh64(&self.map[t.offset..t.offset + t.nbytes]));
                let d = done.fetch_add(t.nbytes as u64, Ordering::Relaxed) + t.nbytes as u64;
                progress(d, total);
                (!ok).then_some(i)
            })
            .collect();
        if let Some(&i) = bad.iter().min() {
            let names: Vec<&str> = bad
                .iter()
                .take(5)
                .map(|&j| self.tensors[j].name.as_str())
                .collect();
            return Err(Error::format(
                &self.path,
                format!(
                    "checksum mismatch in tensor `{}` ({} corrupt tensor(s){}): the file is \
                     corrupt (copy or download it again, or reconvert it)",
                    self.tensors[i].name,
                    bad.len(),
                    if bad.len() > 1 {
                        format!(": {}", names.join(", "))
                    } else {
                        String::new()
                    }
                ),
            ));
        }
        Ok(VerifyReport {
            tensors: self.tensors.len(),
            bytes: total,
            seconds: t0.elapsed().as_secs_f64(),
        })
    }

    /// The metadata object (config, tokenizer info, provenance, recipe).
    pub fn meta(&self) -> &serde_json::Value {
        &self.meta
    }

    /// All tensors, in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// Position of tensor `name` in [`FqmFile::tensors`], if present.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.index.get(name).copied()
    }

    /// The tensor called `name`, if present.
    pub fn get(&self, name: &str) -> Option<TensorView<'_>> {
        let info = &self.tensors[*self.index.get(name)?];
        Some(TensorView {
            info,
            data: &self.map[info.offset..info.offset + info.nbytes],
        })
    }

    /// The tensor called `name`, or an error naming it and the file.
    pub fn tensor(&self, name: &str) -> Result<TensorView<'_>> {
        self.get(name)
            .ok_or_else(|| Error::format(&self.path, format!("tensor `{name}` is missing")))
    }

    /// The whole mapping (for callers that keep byte ranges from [`TensorInfo`]).
    pub fn bytes(&self) -> &[u8] {
        &self.map
    }
}
