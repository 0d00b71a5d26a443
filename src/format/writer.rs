//! Streaming `.fqm` writer: tensors are appended one by one (memory stays at one tensor), the
//! metadata and directory go at the end, and the file appears under its final name only when
//! complete (written to a temporary name in the same folder, then renamed).

use super::xxh64::xxh64;
use super::{DType, HEADER_SIZE, MAGIC, VERSION};
use crate::atomic::AtomicFile;
use crate::{Error, Result};
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;

struct Entry {
    name: String,
    dtype: DType,
    shape: Vec<usize>,
    offset: u64,
    nbytes: u64,
    hash: u64,
}

/// Writes one `.fqm` file (through [`AtomicFile`]: dropping it before [`FqmWriter::finish`]
/// removes the partial file, and so does SIGINT/SIGTERM in the CLI).
pub struct FqmWriter {
    out: Option<AtomicFile>,
    pos: u64,
    entries: Vec<Entry>,
}

impl FqmWriter {
    /// Start writing `dest`. Nothing at `dest` is touched until [`FqmWriter::finish`].
    pub fn create(dest: impl AsRef<Path>) -> Result<FqmWriter> {
        Self::create_from(dest, &[])
    }

    /// [`FqmWriter::create`], refusing a `dest` that is one of `inputs` (see
    /// [`crate::atomic::check_output`]).
    pub fn create_from(dest: impl AsRef<Path>, inputs: &[&Path]) -> Result<FqmWriter> {
        let out = AtomicFile::create(dest, inputs)?;
        let mut w = FqmWriter {
            out: Some(out),
            pos: 0,
            entries: vec![],
        };
        w.write(&[0u8; HEADER_SIZE])?; // placeholder, filled by finish()
        Ok(w)
    }

    fn write(&mut self, b: &[u8]) -> Result<()> {
        let out = self.out.as_mut().expect("writer used after finish");
        out.write_all(b)?;
        self.pos += b.len() as u64;
        Ok(())
    }

    fn pad_to(&mut self, align: u64) -> Result<()> {
        let pad = self.pos.next_multiple_of(align) - self.pos;
        const ZEROS: [u8; 4096] = [0; 4096];
        let mut left = pad as usize;
        while left > 0 {
            let n = left.min(ZEROS.len());
            self.write(&ZEROS[..n])?;
            left -= n;
        }
        Ok(())
    }

    /// Append a tensor whose data starts at a multiple of `align` (≥ 64, a power of two).
    pub fn add_tensor(
        &mut self,
        name: &str,
        dtype: DType,
        shape: &[usize],
        data: &[u8],
        align: u64,
    ) -> Result<()> {
        let expect = dtype.nbytes(shape).ok_or_else(|| {
            Error::tensor(
                name,
                format!("shape {shape:?} is invalid for {}", dtype.name()),
            )
        })?;
        if expect != data.len() {
            return Err(Error::tensor(
                name,
                format!("{} bytes given, {expect} expected", data.len()),
            ));
        }
        if name.is_empty() || name.len() > super::MAX_NAME_LEN || shape.len() > super::MAX_DIMS {
            return Err(Error::tensor(name, "name or rank out of range"));
        }
        if self.entries.iter().any(|e| e.name == name) {
            return Err(Error::tensor(name, "written twice"));
        }
        self.pad_to(align.max(super::TENSOR_ALIGN))?;
        let offset = self.pos;
        self.write(data)?;
        self.entries.push(Entry {
            name: name.to_string(),
            dtype,
            shape: shape.to_vec(),
            offset,
            nbytes: data.len() as u64,
            hash: xxh64(data),
        });
        Ok(())
    }

    /// Write the metadata and directory, fill in the header, flush, and rename the file to its
    /// final name.
    pub fn finish(self, meta: &serde_json::Value) -> Result<()> {
        self.finish_checked(meta, |_| Ok(()))
    }

    /// [`FqmWriter::finish`], running `check` on the complete temporary file before the rename
    /// (the converter re-opens the model it wrote there): on an error nothing appears at the
    /// destination.
    pub fn finish_checked(
        mut self,
        meta: &serde_json::Value,
        check: impl FnOnce(&Path) -> Result<()>,
    ) -> Result<()> {
        // metadata JSON
        self.pad_to(8)?;
        let meta_bytes =
            serde_json::to_vec(meta).map_err(|e| Error::Other(format!("metadata: {e}")))?;
        let (meta_off, meta_len) = (self.pos, meta_bytes.len() as u64);
        self.write(&meta_bytes)?;
        // directory
        self.pad_to(8)?;
        let mut dir = Vec::new();
        for e in &self.entries {
            dir.extend_from_slice(&(e.name.len() as u16).to_le_bytes());
            dir.extend_from_slice(e.name.as_bytes());
            dir.push(e.dtype as u8);
            dir.push(e.shape.len() as u8);
            for &d in &e.shape {
                dir.extend_from_slice(&(d as u64).to_le_bytes());
            }
            dir.extend_from_slice(&e.offset.to_le_bytes());
            dir.extend_from_slice(&e.nbytes.to_le_bytes());
            dir.extend_from_slice(&e.hash.to_le_bytes());
        }
        // version 2 trailer: checksums of the metadata and of the directory before this hash
        dir.extend_from_slice(&xxh64(&meta_bytes).to_le_bytes());
        let dir_hash = xxh64(&dir);
        dir.extend_from_slice(&dir_hash.to_le_bytes());
        let (dir_off, dir_len) = (self.pos, dir.len() as u64);
        self.write(&dir)?;
        // end padding: a whole page, so the mapping of the last tensor never ends mid-page
        self.pad_to(4096)?;
        let file_len = self.pos;
        // header
        let mut h = Vec::with_capacity(HEADER_SIZE);
        h.extend_from_slice(&MAGIC);
        h.extend_from_slice(&VERSION.to_le_bytes());
        h.extend_from_slice(&(HEADER_SIZE as u32).to_le_bytes());
        for v in [
            meta_off,
            meta_len,
            dir_off,
            dir_len,
            self.entries.len() as u64,
            file_len,
        ] {
            h.extend_from_slice(&v.to_le_bytes());
        }
        debug_assert_eq!(h.len(), HEADER_SIZE);
        let mut out = self.out.take().expect("finish called once");
        let w = out.writer();
        let r = w
            .flush()
            .and_then(|_| w.get_mut().seek(SeekFrom::Start(0)).map(|_| ()))
            .and_then(|_| w.get_mut().write_all(&h));
        r.map_err(|e| out.io_err(e))?;
        out.commit_checked(check)
    }
}
