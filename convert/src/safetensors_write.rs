//! A small streaming safetensors writer.
//!
//! The header (names, dtypes, shapes, offsets) is fixed up front from the tensor list, then the
//! data is streamed in file order with [`SafetensorsWriter::write`]: nothing but the caller's
//! current buffer is ever held in memory, so multi-gigabyte files can be written with bounded
//! memory. Format: 8-byte little-endian header length, JSON header padded with spaces to a
//! multiple of 8 bytes, then the raw little-endian tensor data in offset order.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use ferroq::{Error, Result};

/// One tensor to be written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StTensor {
    pub name: String,
    /// safetensors dtype string: `"BF16"`, `"F16"`, `"F32"`, `"I32"`, ...
    pub dtype: &'static str,
    pub shape: Vec<usize>,
}

/// Bytes per element of a safetensors dtype string.
pub fn dtype_size(dtype: &str) -> Option<usize> {
    Some(match dtype {
        "BOOL" | "U8" | "I8" | "F8_E4M3" | "F8_E5M2" => 1,
        "BF16" | "F16" | "I16" | "U16" => 2,
        "F32" | "I32" | "U32" => 4,
        "F64" | "I64" | "U64" => 8,
        _ => return None,
    })
}

impl StTensor {
    /// Size of the tensor's data in bytes.
    pub fn nbytes(&self) -> u64 {
        let n: u64 = self.shape.iter().map(|&d| d as u64).product();
        n * dtype_size(self.dtype).unwrap_or(0) as u64
    }
}

/// Build the (padded) JSON header for `tensors`, data laid out in the given order.
pub fn header_bytes(tensors: &[StTensor], metadata: &[(&str, &str)]) -> Result<Vec<u8>> {
    let mut map = serde_json::Map::new();
    if !metadata.is_empty() {
        let m: serde_json::Map<String, serde_json::Value> = metadata
            .iter()
            .map(|(k, v)| (k.to_string(), serde_json::Value::from(*v)))
            .collect();
        map.insert("__metadata__".into(), m.into());
    }
    let mut off = 0u64;
    for t in tensors {
        if dtype_size(t.dtype).is_none() {
            return Err(Error::tensor(&t.name, format!("unknown dtype {}", t.dtype)));
        }
        if map.contains_key(&t.name) {
            return Err(Error::tensor(&t.name, "duplicate tensor name"));
        }
        let end = off + t.nbytes();
        map.insert(
            t.name.clone(),
            serde_json::json!({ "dtype": t.dtype, "shape": t.shape, "data_offsets": [off, end] }),
        );
        off = end;
    }
    let mut json = serde_json::to_vec(&serde_json::Value::Object(map))
        .map_err(|e| Error::Other(format!("safetensors header: {e}")))?;
    while json.len() % 8 != 0 {
        json.push(b' ');
    }
    Ok(json)
}

/// Streams one safetensors file. Create it with the full tensor list, then call
/// [`write`](Self::write) with the data of the tensors in order (any chunking), then
/// [`finish`](Self::finish), which checks that exactly the announced number of bytes came.
pub struct SafetensorsWriter {
    file: File,
    path: PathBuf,
    expected: u64,
    written: u64,
}

impl SafetensorsWriter {
    /// Create `path` and write the header.
    pub fn create(
        path: impl AsRef<Path>,
        tensors: &[StTensor],
        metadata: &[(&str, &str)],
    ) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let header = header_bytes(tensors, metadata)?;
        let mut file = File::create(&path).map_err(|e| Error::io(&path, e))?;
        file.write_all(&(header.len() as u64).to_le_bytes())
            .and_then(|_| file.write_all(&header))
            .map_err(|e| Error::io(&path, e))?;
        Ok(SafetensorsWriter {
            file,
            path,
            expected: tensors.iter().map(StTensor::nbytes).sum(),
            written: 0,
        })
    }

    /// Append raw little-endian tensor data.
    pub fn write(&mut self, data: &[u8]) -> Result<()> {
        if self.written + data.len() as u64 > self.expected {
            return Err(Error::format(
                &self.path,
                "more tensor data than the header says",
            ));
        }
        self.file
            .write_all(data)
            .map_err(|e| Error::io(&self.path, e))?;
        self.written += data.len() as u64;
        Ok(())
    }

    /// Check the byte count and flush to the OS.
    pub fn finish(mut self) -> Result<()> {
        if self.written != self.expected {
            return Err(Error::format(
                &self.path,
                format!(
                    "{} bytes of tensor data written, header says {}",
                    self.written, self.expected
                ),
            ));
        }
        self.file.flush().map_err(|e| Error::io(&self.path, e))
    }
}
