//! GGUF reader (llama.cpp's model format, versions 2 and 3).
//!
//! A GGUF file is untrusted input: every count, length, type, offset and size is checked
//! against caps and against the file length before use, and every failure is an
//! [`Error`] naming the file and the field or tensor. Nothing here panics on any input.
//!
//! Layout (little endian): magic `GGUF`, `u32` version, `u64` tensor count, `u64` metadata
//! count, the metadata key/value pairs, the tensor infos (name, `u32` n_dims, `u64` dims
//! innermost first, `u32` ggml type, `u64` offset relative to the data section), padding to
//! `general.alignment` (default 32), then the data section.
//!
//! [`open`] turns a `llama` or `llama4` (`convert/src/gguf_llama4.rs`) architecture GGUF into a
//! [`Checkpoint`] with Hugging Face tensor names and shapes, a synthesized `config.json`,
//! `tokenizer.json`, `tokenizer_config.json`, `generation_config.json` and the chat template.
//! Tensors are dequantized to f32 exactly as ggml defines it (F32, F16, BF16, Q8_0, Q4_0, Q4_1,
//! Q5_0, Q5_1, Q4_K, Q6_K), one tensor (or one expert's slice of a stacked expert tensor) at a
//! time, straight from the memory map; llama.cpp's Q/K row permutation is undone (`llama`;
//! `llama4` files are not permuted). A `rope_freqs.weight` tensor (Llama 3 RoPE scaling as
//! per-frequency divisors) becomes [`Checkpoint::rope_freq_factors`].

use std::collections::HashMap;
use std::path::Path;

use serde_json::{json, Map, Value as Json};

use super::source::{Checkpoint, SrcTensor, TensorSource};
use ferroq::{Error, Result};

/// Most tensors a file may declare.
pub const MAX_TENSORS: u64 = 1 << 20;
/// Most metadata pairs a file may declare.
pub const MAX_KV: u64 = 1 << 20;
/// Longest string (key, value, tensor name) accepted, in bytes.
pub const MAX_STRING: u64 = 1 << 26;
/// Longest metadata array accepted, in elements.
pub const MAX_ARRAY: u64 = 1 << 24;
/// Most dimensions of a tensor (ggml's `GGML_MAX_DIMS`).
pub const MAX_DIMS: u32 = 4;
/// Default data alignment when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;

// ---------------------------------------------------------------------------------------------
// Metadata values

/// A typed metadata array.
#[derive(Clone, Debug, PartialEq)]
pub enum Array {
    U8(Vec<u8>),
    I8(Vec<i8>),
    U16(Vec<u16>),
    I16(Vec<i16>),
    U32(Vec<u32>),
    I32(Vec<i32>),
    F32(Vec<f32>),
    Bool(Vec<bool>),
    Str(Vec<String>),
    U64(Vec<u64>),
    I64(Vec<i64>),
    F64(Vec<f64>),
}

impl Array {
    pub fn len(&self) -> usize {
        match self {
            Array::U8(v) => v.len(),
            Array::I8(v) => v.len(),
            Array::U16(v) => v.len(),
            Array::I16(v) => v.len(),
            Array::U32(v) => v.len(),
            Array::I32(v) => v.len(),
            Array::F32(v) => v.len(),
            Array::Bool(v) => v.len(),
            Array::Str(v) => v.len(),
            Array::U64(v) => v.len(),
            Array::I64(v) => v.len(),
            Array::F64(v) => v.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Integer elements as i64 (None for float, bool or string arrays, or u64 beyond i64).
    pub fn to_i64(&self) -> Option<Vec<i64>> {
        Some(match self {
            Array::U8(v) => v.iter().map(|&x| x as i64).collect(),
            Array::I8(v) => v.iter().map(|&x| x as i64).collect(),
            Array::U16(v) => v.iter().map(|&x| x as i64).collect(),
            Array::I16(v) => v.iter().map(|&x| x as i64).collect(),
            Array::U32(v) => v.iter().map(|&x| x as i64).collect(),
            Array::I32(v) => v.iter().map(|&x| x as i64).collect(),
            Array::U64(v) => v
                .iter()
                .map(|&x| i64::try_from(x).ok())
                .collect::<Option<Vec<_>>>()?,
            Array::I64(v) => v.clone(),
            _ => return None,
        })
    }
}

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    Array(Array),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    /// Any integer type as u64 (None when negative or not an integer).
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(x) => Some(x as u64),
            Value::U16(x) => Some(x as u64),
            Value::U32(x) => Some(x as u64),
            Value::U64(x) => Some(x),
            Value::I8(x) => u64::try_from(x).ok(),
            Value::I16(x) => u64::try_from(x).ok(),
            Value::I32(x) => u64::try_from(x).ok(),
            Value::I64(x) => u64::try_from(x).ok(),
            _ => None,
        }
    }
    /// Any float (or integer) type as f64. f32 values go through their shortest decimal
    /// form, so `1e-5f32` becomes `1e-5` (as in the Hugging Face config it came from).
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(x) => x.to_string().parse::<f64>().ok(),
            Value::F64(x) => Some(x),
            _ => self.as_u64().map(|x| x as f64),
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&Array> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// ggml tensor types

/// The ggml tensor types this reader knows the size of. `dequantize` supports a subset.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    Q8K,
    I8,
    I16,
    I32,
    I64,
    F64,
    BF16,
}

impl GgmlType {
    /// From the numeric id stored in the file (ggml.h `enum ggml_type`).
    pub fn from_id(id: u32) -> Option<GgmlType> {
        use GgmlType::*;
        Some(match id {
            0 => F32,
            1 => F16,
            2 => Q4_0,
            3 => Q4_1,
            6 => Q5_0,
            7 => Q5_1,
            8 => Q8_0,
            9 => Q8_1,
            10 => Q2K,
            11 => Q3K,
            12 => Q4K,
            13 => Q5K,
            14 => Q6K,
            15 => Q8K,
            24 => I8,
            25 => I16,
            26 => I32,
            27 => I64,
            28 => F64,
            30 => BF16,
            _ => return None,
        })
    }
    /// The numeric id stored in the file.
    pub fn id(self) -> u32 {
        use GgmlType::*;
        match self {
            F32 => 0,
            F16 => 1,
            Q4_0 => 2,
            Q4_1 => 3,
            Q5_0 => 6,
            Q5_1 => 7,
            Q8_0 => 8,
            Q8_1 => 9,
            Q2K => 10,
            Q3K => 11,
            Q4K => 12,
            Q5K => 13,
            Q6K => 14,
            Q8K => 15,
            I8 => 24,
            I16 => 25,
            I32 => 26,
            I64 => 27,
            F64 => 28,
            BF16 => 30,
        }
    }
    /// Elements per block.
    pub fn block_size(self) -> u64 {
        use GgmlType::*;
        match self {
            F32 | F16 | BF16 | I8 | I16 | I32 | I64 | F64 => 1,
            Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0 | Q8_1 => 32,
            Q2K | Q3K | Q4K | Q5K | Q6K | Q8K => 256,
        }
    }
    /// Bytes per block.
    pub fn type_size(self) -> u64 {
        use GgmlType::*;
        match self {
            F32 | I32 => 4,
            F16 | BF16 | I16 => 2,
            I8 => 1,
            I64 | F64 => 8,
            Q4_0 => 18,
            Q4_1 => 20,
            Q5_0 => 22,
            Q5_1 => 24,
            Q8_0 => 34,
            Q8_1 => 36,
            Q2K => 84,
            Q3K => 110,
            Q4K => 144,
            Q5K => 176,
            Q6K => 210,
            Q8K => 292,
        }
    }
    /// Lower-case name, as the recipe and messages show it.
    pub fn name(self) -> &'static str {
        use GgmlType::*;
        match self {
            F32 => "f32",
            F16 => "f16",
            Q4_0 => "q4_0",
            Q4_1 => "q4_1",
            Q5_0 => "q5_0",
            Q5_1 => "q5_1",
            Q8_0 => "q8_0",
            Q8_1 => "q8_1",
            Q2K => "q2_k",
            Q3K => "q3_k",
            Q4K => "q4_k",
            Q5K => "q5_k",
            Q6K => "q6_k",
            Q8K => "q8_k",
            I8 => "i8",
            I16 => "i16",
            I32 => "i32",
            I64 => "i64",
            F64 => "f64",
            BF16 => "bf16",
        }
    }
    /// Whether [`dequantize`] supports this type.
    pub fn can_dequantize(self) -> bool {
        use GgmlType::*;
        matches!(
            self,
            F32 | F16 | BF16 | Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0 | Q4K | Q6K
        )
    }
}

#[inline]
fn f16_at(b: &[u8], i: usize) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

/// Dequantize `out.len()` elements of type `ty` from `src`, exactly as ggml's
/// `dequantize_row_*` (reference C) does. `src` must hold exactly the bytes of those elements.
pub fn dequantize(ty: GgmlType, src: &[u8], out: &mut [f32]) -> Result<()> {
    use GgmlType::*;
    let n = out.len() as u64;
    let bs = ty.block_size();
    if !ty.can_dequantize() {
        return Err(Error::Other(format!(
            "ggml type {} is not supported for dequantization",
            ty.name()
        )));
    }
    if !n.is_multiple_of(bs) || (n / bs).checked_mul(ty.type_size()) != Some(src.len() as u64) {
        return Err(Error::Other(format!(
            "{}: {} elements need {} bytes, got {}",
            ty.name(),
            n,
            (n / bs).saturating_mul(ty.type_size()),
            src.len()
        )));
    }
    match ty {
        F32 => {
            for (o, c) in out.iter_mut().zip(src.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        F16 => {
            for (o, c) in out.iter_mut().zip(src.chunks_exact(2)) {
                *o = half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
            }
        }
        BF16 => {
            for (o, c) in out.iter_mut().zip(src.chunks_exact(2)) {
                *o = f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16);
            }
        }
        Q8_0 => {
            // struct { f16 d; i8 qs[32]; }: x = qs[j] * d
            for (o, b) in out.chunks_exact_mut(32).zip(src.chunks_exact(34)) {
                let d = f16_at(b, 0);
                for j in 0..32 {
                    o[j] = (b[2 + j] as i8) as f32 * d;
                }
            }
        }
        Q4_0 => {
            // struct { f16 d; u8 qs[16]; }: low nibbles are elements 0..16, high 16..32; x = (q - 8) * d
            for (o, b) in out.chunks_exact_mut(32).zip(src.chunks_exact(18)) {
                let d = f16_at(b, 0);
                for j in 0..16 {
                    let q = b[2 + j];
                    o[j] = ((q & 0x0F) as i32 - 8) as f32 * d;
                    o[j + 16] = ((q >> 4) as i32 - 8) as f32 * d;
                }
            }
        }
        Q4_1 => {
            // struct { f16 d; f16 m; u8 qs[16]; }: x = q * d + m
            for (o, b) in out.chunks_exact_mut(32).zip(src.chunks_exact(20)) {
                let d = f16_at(b, 0);
                let m = f16_at(b, 2);
                for j in 0..16 {
                    let q = b[4 + j];
                    o[j] = (q & 0x0F) as f32 * d + m;
                    o[j + 16] = (q >> 4) as f32 * d + m;
                }
            }
        }
        Q5_0 => {
            // struct { f16 d; u8 qh[4]; u8 qs[16]; }: 5th bit of element j in bit j of qh;
            // x = (q - 16) * d
            for (o, b) in out.chunks_exact_mut(32).zip(src.chunks_exact(22)) {
                let d = f16_at(b, 0);
                let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
                for j in 0..16 {
                    let xh0 = ((qh >> j) << 4) & 0x10;
                    let xh1 = (qh >> (j + 12)) & 0x10;
                    let q = b[6 + j] as u32;
                    o[j] = (((q & 0x0F) | xh0) as i32 - 16) as f32 * d;
                    o[j + 16] = (((q >> 4) | xh1) as i32 - 16) as f32 * d;
                }
            }
        }
        Q5_1 => {
            // struct { f16 d; f16 m; u8 qh[4]; u8 qs[16]; }: x = q * d + m
            for (o, b) in out.chunks_exact_mut(32).zip(src.chunks_exact(24)) {
                let d = f16_at(b, 0);
                let m = f16_at(b, 2);
                let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
                for j in 0..16 {
                    let xh0 = ((qh >> j) << 4) & 0x10;
                    let xh1 = (qh >> (j + 12)) & 0x10;
                    let q = b[8 + j] as u32;
                    o[j] = ((q & 0x0F) | xh0) as f32 * d + m;
                    o[j + 16] = ((q >> 4) | xh1) as f32 * d + m;
                }
            }
        }
        Q4K => {
            // struct { f16 d; f16 dmin; u8 scales[12]; u8 qs[128]; }: 8 sub-blocks of 32 with
            // 6-bit scales and mins; x = d * sc * q - dmin * m
            for (o, b) in out.chunks_exact_mut(256).zip(src.chunks_exact(144)) {
                let d = f16_at(b, 0);
                let dmin = f16_at(b, 2);
                let sc = &b[4..16];
                let qs = &b[16..144];
                let scale_min = |j: usize| -> (u8, u8) {
                    if j < 4 {
                        (sc[j] & 63, sc[j + 4] & 63)
                    } else {
                        (
                            (sc[j + 4] & 0xF) | ((sc[j - 4] >> 6) << 4),
                            (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4),
                        )
                    }
                };
                for c in 0..4 {
                    let (s1, m1) = scale_min(2 * c);
                    let (s2, m2) = scale_min(2 * c + 1);
                    let (d1, m1) = (d * s1 as f32, dmin * m1 as f32);
                    let (d2, m2) = (d * s2 as f32, dmin * m2 as f32);
                    let q = &qs[32 * c..32 * c + 32];
                    let y = &mut o[64 * c..64 * c + 64];
                    for l in 0..32 {
                        y[l] = d1 * (q[l] & 0xF) as f32 - m1;
                        y[l + 32] = d2 * (q[l] >> 4) as f32 - m2;
                    }
                }
            }
        }
        Q6K => {
            // struct { u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d; }: x = d * sc * (q - 32)
            for (o, b) in out.chunks_exact_mut(256).zip(src.chunks_exact(210)) {
                let d = f16_at(b, 208);
                for h in 0..2 {
                    let ql = &b[64 * h..64 * h + 64];
                    let qh = &b[128 + 32 * h..128 + 32 * h + 32];
                    let sc = &b[192 + 8 * h..192 + 8 * h + 8];
                    let y = &mut o[128 * h..128 * h + 128];
                    for l in 0..32 {
                        let is = l / 16;
                        let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
                        let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                        let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                        let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                        let s = |k: usize| d * (sc[is + k] as i8) as f32;
                        y[l] = s(0) * q1 as f32;
                        y[l + 32] = s(2) * q2 as f32;
                        y[l + 64] = s(4) * q3 as f32;
                        y[l + 96] = s(6) * q4 as f32;
                    }
                }
            }
        }
        _ => unreachable!("checked by can_dequantize"),
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Q/K row permutation (llama.cpp's convert_hf_to_gguf.py `LlamaModel.permute`)

/// Hugging Face → GGUF: within each head, row `i * (hd/2) + j` moves to row `2 * j + i`
/// (rotate-half layout → interleaved pairs). `data` is `[n_head * hd, cols]` row-major.
pub fn permute_qk_rows(data: &mut [f32], n_head: usize, cols: usize) -> Result<()> {
    permute_impl(data, n_head, cols, false)
}

/// GGUF → Hugging Face: the exact inverse of [`permute_qk_rows`].
pub fn unpermute_qk_rows(data: &mut [f32], n_head: usize, cols: usize) -> Result<()> {
    permute_impl(data, n_head, cols, true)
}

fn permute_impl(data: &mut [f32], n_head: usize, cols: usize, inverse: bool) -> Result<()> {
    let bad = || {
        Error::Other(format!(
            "Q/K permutation: {} values are not n_head ({n_head}) x even head_dim x {cols} columns",
            data.len()
        ))
    };
    if n_head == 0 || cols == 0 || !data.len().is_multiple_of(cols) {
        return Err(bad());
    }
    let rows = data.len() / cols;
    if !rows.is_multiple_of(n_head) || !(rows / n_head).is_multiple_of(2) {
        return Err(bad());
    }
    let hd = rows / n_head;
    let half = hd / 2;
    let mut tmp = vec![0f32; hd * cols];
    for head in data.chunks_exact_mut(hd * cols) {
        tmp.copy_from_slice(head);
        for i in 0..2 {
            for j in 0..half {
                let hf = i * half + j;
                let gg = 2 * j + i;
                let (dst, src) = if inverse { (hf, gg) } else { (gg, hf) };
                head[dst * cols..(dst + 1) * cols]
                    .copy_from_slice(&tmp[src * cols..(src + 1) * cols]);
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Raw file

/// One tensor as the GGUF file declares it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GgufTensor {
    pub name: String,
    /// ggml dims, innermost (contiguous) first.
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Absolute byte offset of the data in the file.
    pub offset: u64,
    /// Byte size of the data.
    pub size: u64,
    /// Number of elements.
    pub n_elements: u64,
}

enum Bytes {
    Map(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Bytes {
    fn as_slice(&self) -> &[u8] {
        match self {
            Bytes::Map(m) => m,
            Bytes::Owned(v) => v,
        }
    }
}

/// A parsed, validated GGUF file: metadata, tensor infos and the mapped bytes.
pub struct GgufFile {
    origin: String,
    bytes: Bytes,
    pub version: u32,
    pub alignment: u64,
    /// Absolute offset of the data section.
    pub data_offset: u64,
    /// Metadata in file order.
    pub metadata: Vec<(String, Value)>,
    /// Tensor infos in file order.
    pub tensors: Vec<GgufTensor>,
    kv_index: HashMap<String, usize>,
    tensor_index: HashMap<String, usize>,
}

struct Cursor<'a> {
    b: &'a [u8],
    pos: usize,
    file: &'a str,
}

impl<'a> Cursor<'a> {
    fn err(&self, what: &str, msg: impl std::fmt::Display) -> Error {
        Error::format(self.file, format!("{what}: {msg} (at byte {})", self.pos))
    }
    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8]> {
        let rem = (self.b.len() - self.pos) as u64;
        if n > rem {
            return Err(self.err(what, format!("truncated file: need {n} bytes, {rem} left")));
        }
        let s = &self.b[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }
    fn remaining(&self) -> u64 {
        (self.b.len() - self.pos) as u64
    }
    fn arr<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let s = self.take(N as u64, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }
    fn u8(&mut self, what: &str) -> Result<u8> {
        Ok(self.arr::<1>(what)?[0])
    }
    fn u16(&mut self, what: &str) -> Result<u16> {
        Ok(u16::from_le_bytes(self.arr(what)?))
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.arr(what)?))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.arr(what)?))
    }
    fn bool(&mut self, what: &str) -> Result<bool> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            x => Err(self.err(what, format!("bool must be 0 or 1, got {x}"))),
        }
    }
    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.u64(what)?;
        if n > MAX_STRING {
            return Err(self.err(
                what,
                format!("string length {n} exceeds the cap of {MAX_STRING} bytes"),
            ));
        }
        let s = self.take(n, what)?;
        String::from_utf8(s.to_vec()).map_err(|_| self.err(what, "string is not valid UTF-8"))
    }
}

const T_U8: u32 = 0;
const T_I8: u32 = 1;
const T_U16: u32 = 2;
const T_I16: u32 = 3;
const T_U32: u32 = 4;
const T_I32: u32 = 5;
const T_F32: u32 = 6;
const T_BOOL: u32 = 7;
const T_STR: u32 = 8;
const T_ARR: u32 = 9;
const T_U64: u32 = 10;
const T_I64: u32 = 11;
const T_F64: u32 = 12;

fn read_value(c: &mut Cursor, ty: u32, what: &str) -> Result<Value> {
    Ok(match ty {
        T_U8 => Value::U8(c.u8(what)?),
        T_I8 => Value::I8(c.u8(what)? as i8),
        T_U16 => Value::U16(c.u16(what)?),
        T_I16 => Value::I16(c.u16(what)? as i16),
        T_U32 => Value::U32(c.u32(what)?),
        T_I32 => Value::I32(c.u32(what)? as i32),
        T_F32 => Value::F32(f32::from_bits(c.u32(what)?)),
        T_BOOL => Value::Bool(c.bool(what)?),
        T_STR => Value::Str(c.string(what)?),
        T_U64 => Value::U64(c.u64(what)?),
        T_I64 => Value::I64(c.u64(what)? as i64),
        T_F64 => Value::F64(f64::from_bits(c.u64(what)?)),
        T_ARR => {
            let ety = c.u32(what)?;
            let n = c.u64(what)?;
            let min_size: u64 = match ety {
                T_U8 | T_I8 | T_BOOL => 1,
                T_U16 | T_I16 => 2,
                T_U32 | T_I32 | T_F32 => 4,
                T_U64 | T_I64 | T_F64 | T_STR => 8,
                T_ARR => return Err(c.err(what, "nested arrays are not supported")),
                x => return Err(c.err(what, format!("unknown array element type {x}"))),
            };
            if n > MAX_ARRAY {
                return Err(c.err(
                    what,
                    format!("array length {n} exceeds the cap of {MAX_ARRAY}"),
                ));
            }
            if n.saturating_mul(min_size) > c.remaining() {
                return Err(c.err(
                    what,
                    format!(
                        "array of {n} elements does not fit in the {} bytes left",
                        c.remaining()
                    ),
                ));
            }
            let n = n as usize;
            macro_rules! rd {
                ($variant:ident, $e:expr) => {{
                    let mut v = Vec::with_capacity(n);
                    for _ in 0..n {
                        v.push($e);
                    }
                    Array::$variant(v)
                }};
            }
            Value::Array(match ety {
                T_U8 => rd!(U8, c.u8(what)?),
                T_I8 => rd!(I8, c.u8(what)? as i8),
                T_U16 => rd!(U16, c.u16(what)?),
                T_I16 => rd!(I16, c.u16(what)? as i16),
                T_U32 => rd!(U32, c.u32(what)?),
                T_I32 => rd!(I32, c.u32(what)? as i32),
                T_F32 => rd!(F32, f32::from_bits(c.u32(what)?)),
                T_BOOL => rd!(Bool, c.bool(what)?),
                T_STR => {
                    let mut v = Vec::with_capacity(n);
                    for i in 0..n {
                        v.push(c.string(&format!("{what}[{i}]"))?);
                    }
                    Array::Str(v)
                }
                T_U64 => rd!(U64, c.u64(what)?),
                T_I64 => rd!(I64, c.u64(what)? as i64),
                _ => rd!(F64, f64::from_bits(c.u64(what)?)),
            })
        }
        x => return Err(c.err(what, format!("unknown value type {x}"))),
    })
}

impl GgufFile {
    /// Map and parse a GGUF file.
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile> {
        let path = path.as_ref();
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        let bytes = if len == 0 {
            Bytes::Owned(Vec::new())
        } else {
            // SAFETY: the mapping is read-only and private to this process; like every
            // memory-mapped reader we rely on nobody truncating or rewriting the file while
            // it is open. All reads are bounds-checked against the mapped length.
            Bytes::Map(unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?)
        };
        Self::parse(path.display().to_string(), bytes)
    }

    /// Parse a GGUF image held in memory (`origin` names it in messages).
    pub fn from_bytes(origin: impl Into<String>, bytes: Vec<u8>) -> Result<GgufFile> {
        Self::parse(origin.into(), Bytes::Owned(bytes))
    }

    fn parse(origin: String, bytes: Bytes) -> Result<GgufFile> {
        let b = bytes.as_slice();
        let mut c = Cursor {
            b,
            pos: 0,
            file: &origin,
        };
        let magic = c.take(4, "magic")?;
        if magic != b"GGUF" {
            return Err(Error::format(
                &origin,
                format!("magic: not a GGUF file (starts with {magic:?}, expected \"GGUF\")"),
            ));
        }
        let version = c.u32("version")?;
        if version != 2 && version != 3 {
            return Err(Error::format(
                &origin,
                format!("version: GGUF version {version} is not supported (2 or 3 expected)"),
            ));
        }
        let n_tensors = c.u64("tensor_count")?;
        if n_tensors > MAX_TENSORS {
            return Err(c.err(
                "tensor_count",
                format!("{n_tensors} tensors exceeds the cap of {MAX_TENSORS}"),
            ));
        }
        let n_kv = c.u64("metadata_kv_count")?;
        if n_kv > MAX_KV {
            return Err(c.err(
                "metadata_kv_count",
                format!("{n_kv} pairs exceeds the cap of {MAX_KV}"),
            ));
        }
        // Each pair needs at least 8 (key length) + 4 (type) + 1 bytes; each tensor info at
        // least 8 + 4 + 4 + 8 bytes. Reject impossible counts before allocating.
        if n_kv.saturating_mul(13) > c.remaining() {
            return Err(c.err(
                "metadata_kv_count",
                format!(
                    "{n_kv} pairs cannot fit in the {} bytes left",
                    c.remaining()
                ),
            ));
        }
        let mut metadata = Vec::with_capacity(n_kv as usize);
        let mut kv_index = HashMap::new();
        for i in 0..n_kv {
            let key = c.string(&format!("metadata key #{i}"))?;
            if key.is_empty() {
                return Err(c.err(&format!("metadata key #{i}"), "empty key"));
            }
            let ty = c.u32(&format!("type of metadata `{key}`"))?;
            let v = read_value(&mut c, ty, &format!("metadata `{key}`"))?;
            if kv_index.insert(key.clone(), metadata.len()).is_some() {
                return Err(c.err(&format!("metadata `{key}`"), "duplicate key"));
            }
            metadata.push((key, v));
        }
        let alignment = match kv_index.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(&i) => match metadata[i].1 {
                Value::U32(a) if a != 0 && a.is_power_of_two() => a as u64,
                ref v => {
                    return Err(Error::format(
                        &origin,
                        format!(
                            "metadata `general.alignment`: must be a u32 power of two, got {v:?}"
                        ),
                    ))
                }
            },
        };
        if n_tensors.saturating_mul(24) > c.remaining() {
            return Err(c.err(
                "tensor_count",
                format!(
                    "{n_tensors} tensor infos cannot fit in the {} bytes left",
                    c.remaining()
                ),
            ));
        }
        struct Info {
            name: String,
            dims: Vec<u64>,
            ty: GgmlType,
            rel: u64,
            size: u64,
            n: u64,
        }
        let mut infos = Vec::with_capacity(n_tensors as usize);
        let mut tensor_index = HashMap::new();
        for i in 0..n_tensors {
            let name = c.string(&format!("tensor #{i} name"))?;
            let what = format!("tensor `{name}`");
            if name.is_empty() {
                return Err(c.err(&format!("tensor #{i}"), "empty name"));
            }
            let nd = c.u32(&what)?;
            if nd == 0 || nd > MAX_DIMS {
                return Err(c.err(&what, format!("n_dims {nd} out of range 1..={MAX_DIMS}")));
            }
            let mut dims = Vec::with_capacity(nd as usize);
            for _ in 0..nd {
                dims.push(c.u64(&what)?);
            }
            let tid = c.u32(&what)?;
            let ty = GgmlType::from_id(tid)
                .ok_or_else(|| c.err(&what, format!("unknown ggml type {tid}")))?;
            let rel = c.u64(&what)?;
            let mut n: u64 = 1;
            for &d in &dims {
                if d == 0 {
                    return Err(c.err(&what, format!("zero dimension in {dims:?}")));
                }
                n = n
                    .checked_mul(d)
                    .filter(|&n| n <= i64::MAX as u64)
                    .ok_or_else(|| c.err(&what, format!("dims {dims:?} overflow")))?;
            }
            if dims[0] % ty.block_size() != 0 {
                return Err(c.err(
                    &what,
                    format!(
                        "row length {} is not a multiple of the {} block size {}",
                        dims[0],
                        ty.name(),
                        ty.block_size()
                    ),
                ));
            }
            let size = (n / ty.block_size())
                .checked_mul(ty.type_size())
                .ok_or_else(|| c.err(&what, format!("byte size of dims {dims:?} overflows")))?;
            if rel % alignment != 0 {
                return Err(c.err(
                    &what,
                    format!("data offset {rel} is not a multiple of the alignment {alignment}"),
                ));
            }
            if tensor_index.insert(name.clone(), infos.len()).is_some() {
                return Err(c.err(&what, "duplicate tensor name"));
            }
            infos.push(Info {
                name,
                dims,
                ty,
                rel,
                size,
                n,
            });
        }
        let file_len = b.len() as u64;
        let data_offset = (c.pos as u64).div_ceil(alignment) * alignment;
        if data_offset > file_len && !infos.is_empty() {
            return Err(Error::format(
                &origin,
                format!("data section: starts at {data_offset}, beyond the file end {file_len}"),
            ));
        }
        let mut tensors = Vec::with_capacity(infos.len());
        for t in infos {
            let start = data_offset.checked_add(t.rel);
            let end = start.and_then(|s| s.checked_add(t.size));
            match (start, end) {
                (Some(s), Some(e)) if e <= file_len => tensors.push(GgufTensor {
                    name: t.name,
                    dims: t.dims,
                    ty: t.ty,
                    offset: s,
                    size: t.size,
                    n_elements: t.n,
                }),
                _ => {
                    return Err(Error::format(
                        &origin,
                        format!(
                        "tensor `{}`: data [{} + {}, +{} bytes) lies outside the file ({} bytes)",
                        t.name, data_offset, t.rel, t.size, file_len
                    ),
                    ))
                }
            }
        }
        // Tensors must not overlap.
        let mut order: Vec<usize> = (0..tensors.len()).collect();
        order.sort_by_key(|&i| tensors[i].offset);
        for w in order.windows(2) {
            let (a, b2) = (&tensors[w[0]], &tensors[w[1]]);
            if a.offset + a.size > b2.offset {
                return Err(Error::format(
                    &origin,
                    format!("tensor `{}`: data overlaps tensor `{}`", b2.name, a.name),
                ));
            }
        }
        Ok(GgufFile {
            origin,
            bytes,
            version,
            alignment,
            data_offset,
            metadata,
            tensors,
            kv_index,
            tensor_index,
        })
    }

    /// Where the file came from.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// Metadata value by key.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.kv_index.get(key).map(|&i| &self.metadata[i].1)
    }

    /// Tensor info by GGUF name.
    pub fn tensor(&self, name: &str) -> Option<&GgufTensor> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    /// The raw bytes of a tensor.
    pub fn tensor_bytes(&self, t: &GgufTensor) -> &[u8] {
        // Offsets were validated against the file length in `parse`.
        &self.bytes.as_slice()[t.offset as usize..(t.offset + t.size) as usize]
    }

    /// Dequantize GGUF tensor `name` to f32 in ggml order (innermost dim contiguous).
    pub fn read_f32(&self, name: &str, out: &mut Vec<f32>) -> Result<()> {
        let t = self
            .tensor(name)
            .ok_or_else(|| Error::tensor(name, format!("not in {}", self.origin)))?;
        let n = usize::try_from(t.n_elements)
            .map_err(|_| Error::tensor(name, "too many elements for this platform"))?;
        out.clear();
        out.try_reserve_exact(n)
            .map_err(|_| Error::tensor(name, format!("cannot allocate {n} f32 values")))?;
        out.resize(n, 0.0);
        dequantize(t.ty, self.tensor_bytes(t), out)
            .map_err(|e| Error::tensor(name, format!("{}: {e}", self.origin)))
    }

    /// Dequantize slice `index` of the outermost ggml dimension of `t` (e.g. expert `index`
    /// of a `[in, out, E]` tensor: `in * out` values, ggml order) without touching the rest.
    pub fn read_f32_outer(&self, t: &GgufTensor, index: usize, out: &mut Vec<f32>) -> Result<()> {
        let outer = *t.dims.last().unwrap_or(&1);
        if t.dims.len() < 2 || index as u64 >= outer {
            return Err(Error::tensor(
                &t.name,
                format!(
                    "{}: slice {index} requested of dims {:?}",
                    self.origin, t.dims
                ),
            ));
        }
        // dims[0] is a whole number of blocks (checked in `parse`), so every slice is too
        let n = t.n_elements / outer;
        let bytes = t.size / outer;
        let n = usize::try_from(n)
            .map_err(|_| Error::tensor(&t.name, "too many elements for this platform"))?;
        out.clear();
        out.try_reserve_exact(n)
            .map_err(|_| Error::tensor(&t.name, format!("cannot allocate {n} f32 values")))?;
        out.resize(n, 0.0);
        let all = self.tensor_bytes(t);
        let start = bytes as usize * index;
        dequantize(t.ty, &all[start..start + bytes as usize], out)
            .map_err(|e| Error::tensor(&t.name, format!("{}: slice {index}: {e}", self.origin)))
    }

    pub(crate) fn meta_err(&self, key: &str, msg: impl Into<String>) -> Error {
        Error::format(&self.origin, format!("metadata `{key}`: {}", msg.into()))
    }

    pub(crate) fn req_u64(&self, key: &str) -> Result<u64> {
        self.get(key)
            .ok_or_else(|| self.meta_err(key, "missing"))?
            .as_u64()
            .ok_or_else(|| self.meta_err(key, "expected a non-negative integer"))
    }

    pub fn opt_u64(&self, key: &str) -> Result<Option<u64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(Some)
                .ok_or_else(|| self.meta_err(key, "expected a non-negative integer")),
        }
    }

    pub(crate) fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .filter(|x| x.is_finite())
                .map(Some)
                .ok_or_else(|| self.meta_err(key, "expected a finite number")),
        }
    }

    pub(crate) fn opt_str(&self, key: &str) -> Result<Option<&str>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| self.meta_err(key, "expected a string")),
        }
    }

    pub(crate) fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.meta_err(key, "expected a bool")),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Checkpoint: Hugging Face names, shapes, config and tokenizer

/// How a GGUF tensor maps to a Hugging Face tensor.
#[derive(Clone, Debug)]
struct Mapped {
    gguf: usize,
    /// `Some(n_head)` when the rows must be un-permuted.
    unpermute: Option<usize>,
    /// `Some(e)`: the tensor is slice `e` of the outermost ggml dimension (one expert of a
    /// stacked `ffn_*_exps` tensor, ggml dims `[in, out, E]`), read straight from the map.
    expert: Option<usize>,
}

/// The [`TensorSource`] of a GGUF checkpoint.
pub struct GgufSource {
    file: GgufFile,
    tensors: Vec<SrcTensor>,
    map: Vec<Mapped>,
    index: HashMap<String, usize>,
}

impl GgufSource {
    /// The underlying file.
    pub fn file(&self) -> &GgufFile {
        &self.file
    }
}

impl TensorSource for GgufSource {
    fn tensors(&self) -> &[SrcTensor] {
        &self.tensors
    }

    fn read_f32(&self, name: &str, out: &mut Vec<f32>) -> Result<()> {
        let &i = self
            .index
            .get(name)
            .ok_or_else(|| Error::tensor(name, format!("not in {}", self.file.origin)))?;
        let m = &self.map[i];
        let t = &self.file.tensors[m.gguf];
        if let Some(e) = m.expert {
            return self.file.read_f32_outer(t, e, out);
        }
        self.file.read_f32(&t.name, out)?;
        if let Some(n_head) = m.unpermute {
            let cols = t.dims[0] as usize;
            unpermute_qk_rows(out, n_head, cols).map_err(|e| Error::tensor(name, e.to_string()))?;
        }
        Ok(())
    }

    fn find(&self, name: &str) -> Option<&SrcTensor> {
        self.index.get(name).map(|&i| &self.tensors[i])
    }
}

/// GGUF tensor name → Hugging Face name (Llama family). `None` for unknown names.
pub fn hf_name(gguf: &str) -> Option<String> {
    match gguf {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    if layer.is_empty() || !layer.bytes().all(|c| c.is_ascii_digit()) || layer.len() > 9 {
        return None;
    }
    if layer.len() > 1 && layer.starts_with('0') {
        return None;
    }
    let (part, suffix) = rest.rsplit_once('.')?;
    if suffix != "weight" && suffix != "bias" {
        return None;
    }
    let hf = match part {
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{suffix}"))
}

/// Open a GGUF file as a [`Checkpoint`] (architecture `llama` or `llama4`).
pub fn open(path: impl AsRef<Path>) -> Result<Checkpoint> {
    checkpoint(GgufFile::open(path)?)
}

/// Build a [`Checkpoint`] from a parsed GGUF file (architecture `llama` or `llama4`).
pub fn checkpoint(file: GgufFile) -> Result<Checkpoint> {
    let arch = file
        .opt_str("general.architecture")?
        .ok_or_else(|| file.meta_err("general.architecture", "missing"))?
        .to_string();
    match arch.as_str() {
        "llama" => checkpoint_llama(file),
        "llama4" => super::gguf_llama4::checkpoint(file),
        _ => Err(file.meta_err(
            "general.architecture",
            format!("architecture `{arch}` is not supported (llama, llama4 are)"),
        )),
    }
}

/// The attention hyperparameters every Llama-like architecture stores alike (the keys
/// llama.cpp's `llama_model::load_hparams` reads for all of them), range-checked.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Common {
    pub hidden: u64,
    pub n_layers: u64,
    pub n_head: u64,
    pub n_kv: u64,
    pub head_dim: u64,
    pub eps: f64,
    pub ctx: u64,
}

impl Common {
    /// The `config.json` keys every family synthesizes alike from these fields: `architectures`
    /// and `model_type` as given, the shape, the norm epsilon, `rope_theta`, the context, SiLU
    /// and no attention bias.
    pub(crate) fn config(
        &self,
        architecture: &str,
        model_type: &str,
        theta: f64,
    ) -> Map<String, Json> {
        let mut cfg = Map::new();
        cfg.insert("architectures".into(), json!([architecture]));
        cfg.insert("model_type".into(), json!(model_type));
        cfg.insert("hidden_size".into(), json!(self.hidden));
        cfg.insert("num_hidden_layers".into(), json!(self.n_layers));
        cfg.insert("num_attention_heads".into(), json!(self.n_head));
        cfg.insert("num_key_value_heads".into(), json!(self.n_kv));
        cfg.insert("head_dim".into(), json!(self.head_dim));
        cfg.insert("hidden_act".into(), json!("silu"));
        cfg.insert("rms_norm_eps".into(), json!(self.eps));
        cfg.insert("rope_theta".into(), json!(theta));
        cfg.insert("max_position_embeddings".into(), json!(self.ctx));
        cfg.insert("attention_bias".into(), json!(false));
        cfg
    }
}

/// Largest size accepted for any count or width.
pub(crate) const SIZE_CAP: u64 = 1 << 24;

impl GgufFile {
    pub(crate) fn common(&self, arch: &str) -> Result<Common> {
        let k = |s: &str| format!("{arch}.{s}");
        let hidden = self.req_u64(&k("embedding_length"))?;
        let n_layers = self.req_u64(&k("block_count"))?;
        let n_head = self.req_u64(&k("attention.head_count"))?;
        let n_kv = self
            .opt_u64(&k("attention.head_count_kv"))?
            .unwrap_or(n_head);
        let cap = SIZE_CAP;
        for (key, v) in [
            ("embedding_length", hidden),
            ("block_count", n_layers),
            ("attention.head_count", n_head),
            ("attention.head_count_kv", n_kv),
        ] {
            if v == 0 || v > cap {
                return Err(self.meta_err(&k(key), format!("{v} out of range 1..={cap}")));
            }
        }
        if n_head % n_kv != 0 {
            return Err(self.meta_err(
                &k("attention.head_count_kv"),
                format!("{n_kv} does not divide the head count {n_head}"),
            ));
        }
        let head_dim = match self.opt_u64(&k("attention.key_length"))? {
            Some(d) => d,
            None => {
                if hidden % n_head != 0 {
                    return Err(self.meta_err(
                        &k("attention.head_count"),
                        format!("{n_head} does not divide embedding_length {hidden}"),
                    ));
                }
                hidden / n_head
            }
        };
        if head_dim == 0 || head_dim % 2 != 0 || head_dim > cap {
            return Err(self.meta_err(
                &k("attention.key_length"),
                format!("head dim {head_dim} must be even and positive"),
            ));
        }
        if let Some(vl) = self.opt_u64(&k("attention.value_length"))? {
            if vl != head_dim {
                return Err(self.meta_err(
                    &k("attention.value_length"),
                    format!("{vl} differs from the key length {head_dim} (unsupported)"),
                ));
            }
        }
        if let Some(rd) = self.opt_u64(&k("rope.dimension_count"))? {
            if rd != head_dim {
                return Err(self.meta_err(
                    &k("rope.dimension_count"),
                    format!("partial rotary ({rd} of {head_dim}) is not supported"),
                ));
            }
        }
        let eps = self
            .opt_f64(&k("attention.layer_norm_rms_epsilon"))?
            .ok_or_else(|| self.meta_err(&k("attention.layer_norm_rms_epsilon"), "missing"))?;
        let ctx = self.req_u64(&k("context_length"))?;
        Ok(Common {
            hidden,
            n_layers,
            n_head,
            n_kv,
            head_dim,
            eps,
            ctx,
        })
    }

    /// `rope.scaling.type` as a Hugging Face `rope_scaling` object (`None`: no scaling).
    pub(crate) fn rope_scaling(&self, arch: &str) -> Result<Option<Json>> {
        let k = |s: &str| format!("{arch}.{s}");
        Ok(match self.opt_str(&k("rope.scaling.type"))? {
            None | Some("none") => None,
            Some(t @ ("linear" | "yarn")) => {
                let factor = self
                    .opt_f64(&k("rope.scaling.factor"))?
                    .ok_or_else(|| self.meta_err(&k("rope.scaling.factor"), "missing"))?;
                let mut m = Map::new();
                m.insert("rope_type".into(), json!(t));
                m.insert("factor".into(), json!(factor));
                if let Some(o) = self.opt_u64(&k("rope.scaling.original_context_length"))? {
                    m.insert("original_max_position_embeddings".into(), json!(o));
                }
                Some(Json::Object(m))
            }
            Some(t) => {
                return Err(self.meta_err(
                    &k("rope.scaling.type"),
                    format!("scaling type `{t}` is not supported"),
                ))
            }
        })
    }

    /// The refusal of a tensor whose ggml type [`dequantize`] cannot read.
    pub(crate) fn unsupported_type(&self, t: &GgufTensor) -> Error {
        Error::tensor(
            &t.name,
            format!(
                "{}: ggml type {} is not supported (ferroq reads f32, f16, bf16, q8_0, q4_0, \
                 q4_1, q5_0, q5_1, q4_k, q6_k): re-quantize the file with llama-quantize to one \
                 of those, or convert the Hugging Face checkpoint",
                self.origin,
                t.ty.name()
            ),
        )
    }

    /// `rope_freqs.weight` (llama.cpp's per-frequency RoPE divisors for Llama 3 scaling,
    /// written by `LlamaModel.generate_extra_tensors`), checked: `head_dim / 2` finite
    /// positive values. `None` when the file has none.
    pub(crate) fn rope_freqs(&self, head_dim: u64) -> Result<Option<Vec<f32>>> {
        let name = "rope_freqs.weight";
        let Some(t) = self.tensor(name) else {
            return Ok(None);
        };
        if t.dims != [head_dim / 2] {
            return Err(Error::tensor(
                name,
                format!(
                    "{}: dims {:?}, [{}] (head_dim / 2) expected",
                    self.origin,
                    t.dims,
                    head_dim / 2
                ),
            ));
        }
        if !t.ty.can_dequantize() {
            return Err(self.unsupported_type(t));
        }
        let mut v = Vec::new();
        self.read_f32(name, &mut v)?;
        if let Some((j, x)) = v
            .iter()
            .enumerate()
            .find(|(_, x)| !(x.is_finite() && **x > 0.0))
        {
            return Err(Error::tensor(
                name,
                format!(
                    "{}: value {j} is {x} (factors must be finite and > 0)",
                    self.origin
                ),
            ));
        }
        Ok(Some(v))
    }
}

/// What the architecture-specific readers hand to [`finish`].
pub(crate) struct Parts {
    pub arch: String,
    /// The synthesized `config.json` so far (everything but vocabulary, tying and tokens).
    pub cfg: Map<String, Json>,
    pub ctx: u64,
    pub hidden: u64,
    pub tensors: Vec<SrcTensor>,
    pub map: Vec<(usize, Option<usize>, Option<usize>)>,
    pub rope_freq_factors: Option<Vec<f32>>,
}

/// The common tail: embedding and vocabulary checks, tying, the tokenizer and the
/// generation/tokenizer configs, and the [`Checkpoint`] itself.
pub(crate) fn finish(file: GgufFile, p: Parts) -> Result<Checkpoint> {
    let Parts {
        arch,
        mut cfg,
        ctx,
        hidden,
        tensors,
        map,
        rope_freq_factors,
    } = p;
    let embd = file
        .tensor("token_embd.weight")
        .ok_or_else(|| Error::tensor("token_embd.weight", format!("missing in {}", file.origin)))?;
    if embd.dims.len() != 2 || embd.dims[0] != hidden {
        return Err(Error::tensor(
            "token_embd.weight",
            format!("dims {:?} but embedding_length is {hidden}", embd.dims),
        ));
    }
    let tied = file.tensor("output.weight").is_none();

    // Tokenizer.
    let tok = tokenizer(&file)?;
    let vocab_size = match file.opt_u64(&format!("{arch}.vocab_size"))? {
        Some(v) => v,
        None => match &tok {
            Some(t) => t.n_tokens as u64,
            None => embd.dims[1],
        },
    };
    if vocab_size != embd.dims[1] {
        return Err(Error::tensor(
            "token_embd.weight",
            format!("{} rows but vocab_size is {vocab_size}", embd.dims[1]),
        ));
    }
    cfg.insert("vocab_size".into(), json!(vocab_size));
    cfg.insert("tie_word_embeddings".into(), json!(tied));
    let mut gen = Map::new();
    let mut tcfg = Map::new();
    let mut tokenizer_json = None;
    if let Some(t) = &tok {
        if let Some(b) = t.bos {
            cfg.insert("bos_token_id".into(), json!(b));
            gen.insert("bos_token_id".into(), json!(b));
            tcfg.insert("bos_token".into(), json!(t.tokens[b as usize]));
        }
        if let Some(e) = t.eos {
            cfg.insert("eos_token_id".into(), json!(e));
            tcfg.insert("eos_token".into(), json!(t.tokens[e as usize]));
            match t.eot.filter(|&x| x != e) {
                Some(x) => gen.insert("eos_token_id".into(), json!([e, x])),
                None => gen.insert("eos_token_id".into(), json!(e)),
            };
        }
        if let Some(p) = t.pad {
            cfg.insert("pad_token_id".into(), json!(p));
            gen.insert("pad_token_id".into(), json!(p));
            tcfg.insert("pad_token".into(), json!(t.tokens[p as usize]));
        }
        if let Some(u) = t.unk {
            tcfg.insert("unk_token".into(), json!(t.tokens[u as usize]));
        }
        tcfg.insert("add_bos_token".into(), json!(t.add_bos));
        tcfg.insert("add_eos_token".into(), json!(t.add_eos));
        tcfg.insert("model_max_length".into(), json!(ctx));
        tcfg.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
        tokenizer_json = Some(
            serde_json::to_vec(&t.json)
                .map_err(|e| Error::Other(format!("tokenizer.json: {e}")))?,
        );
    }
    let chat_template = file.opt_str("tokenizer.chat_template")?.map(str::to_string);
    let origin = file.origin.clone();
    let has_tok = tok.is_some();
    drop(tok);
    let map: Vec<Mapped> = map
        .into_iter()
        .map(|(gguf, unpermute, expert)| Mapped {
            gguf,
            unpermute,
            expert,
        })
        .collect();
    let index = tensors
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name.clone(), i))
        .collect();
    Ok(Checkpoint {
        origin,
        config: Json::Object(cfg),
        generation_config: has_tok.then_some(Json::Object(gen)),
        tokenizer_config: has_tok.then_some(Json::Object(tcfg)),
        tokenizer_json,
        tokenizer_model: None,
        chat_template,
        rope_freq_factors,
        source: Box::new(GgufSource {
            file,
            tensors,
            map,
            index,
        }),
    })
}

/// Architecture `llama` (Llama 2/3, SmolLM2, ...): q/k rows un-permuted.
fn checkpoint_llama(file: GgufFile) -> Result<Checkpoint> {
    let arch = "llama";
    let k = |s: &str| format!("{arch}.{s}");
    let common = file.common(arch)?;
    let Common {
        hidden,
        n_layers,
        n_head,
        n_kv,
        head_dim,
        ctx,
        ..
    } = common;
    let ffn = file.req_u64(&k("feed_forward_length"))?;
    if ffn == 0 || ffn > SIZE_CAP {
        return Err(file.meta_err(
            &k("feed_forward_length"),
            format!("{ffn} out of range 1..={SIZE_CAP}"),
        ));
    }
    let theta = file.opt_f64(&k("rope.freq_base"))?.unwrap_or(10000.0);
    let rope_scaling = file.rope_scaling(arch)?;
    let rope_freq_factors = file.rope_freqs(head_dim)?;
    if rope_freq_factors.is_some() && rope_scaling.is_some() {
        return Err(Error::tensor(
            "rope_freqs.weight",
            format!(
                "{}: RoPE frequency factors together with rope.scaling.type (one of them only)",
                file.origin
            ),
        ));
    }

    // Tensors.
    let mut tensors = Vec::with_capacity(file.tensors.len());
    let mut map = Vec::with_capacity(file.tensors.len());
    let q_rows = n_head * head_dim;
    let kv_rows = n_kv * head_dim;
    for (gi, t) in file.tensors.iter().enumerate() {
        if t.name == "rope_freqs.weight" {
            continue; // read above
        }
        let name = hf_name(&t.name).ok_or_else(|| {
            Error::tensor(
                &t.name,
                format!("{}: unknown tensor for architecture `llama`", file.origin),
            )
        })?;
        if let Some(l) = name
            .strip_prefix("model.layers.")
            .and_then(|r| r.split('.').next())
            .and_then(|l| l.parse::<u64>().ok())
        {
            if l >= n_layers {
                return Err(Error::tensor(
                    &t.name,
                    format!("layer {l} beyond block_count {n_layers}"),
                ));
            }
        }
        if !t.ty.can_dequantize() {
            return Err(file.unsupported_type(t));
        }
        let shape: Vec<usize> = t.dims.iter().rev().map(|&d| d as usize).collect();
        let is_q = name.ends_with("self_attn.q_proj.weight");
        let is_k = name.ends_with("self_attn.k_proj.weight");
        let unpermute = if is_q || is_k {
            let (rows, heads) = if is_q {
                (q_rows, n_head)
            } else {
                (kv_rows, n_kv)
            };
            if t.dims.len() != 2 || t.dims[1] != rows || t.dims[0] != hidden {
                return Err(Error::tensor(
                    &t.name,
                    format!(
                        "{}: shape {shape:?} but [{rows}, {hidden}] expected from the metadata",
                        file.origin
                    ),
                ));
            }
            Some(heads as usize)
        } else {
            None
        };
        tensors.push(SrcTensor {
            name,
            shape,
            dtype: t.ty.name().to_string(),
        });
        map.push((gi, unpermute, None));
    }

    let mut cfg = common.config("LlamaForCausalLM", "llama", theta);
    cfg.insert("intermediate_size".into(), json!(ffn));
    cfg.insert("rope_scaling".into(), rope_scaling.unwrap_or(Json::Null));
    cfg.insert("mlp_bias".into(), json!(false));
    finish(
        file,
        Parts {
            arch: arch.into(),
            cfg,
            ctx,
            hidden,
            tensors,
            map,
            rope_freq_factors,
        },
    )
}

struct Tok<'a> {
    json: Json,
    tokens: &'a [String],
    n_tokens: usize,
    bos: Option<u64>,
    eos: Option<u64>,
    eot: Option<u64>,
    pad: Option<u64>,
    unk: Option<u64>,
    add_bos: bool,
    add_eos: bool,
}

/// The Llama 3 pre-tokenizer regex (Hugging Face `tokenizer.json` of Llama 3).
pub const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The Llama 4 pre-tokenizer regex (the `Split` pattern of the Hugging Face `tokenizer.json`
/// of Llama 4 Scout/Maverick; llama.cpp's `LLAMA_VOCAB_PRE_TYPE_LLAMA4`, `tokenizer.ggml.pre`
/// `llama4`).
pub const LLAMA4_PATTERN: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The Hugging Face `tokenizer.json` synthesized from the file's `tokenizer.ggml.*` (what a
/// converted model carries); `Ok(None)` when the file has no tokenizer.
pub fn tokenizer_json(file: &GgufFile) -> Result<Option<Vec<u8>>> {
    match tokenizer(file)? {
        None => Ok(None),
        Some(t) => serde_json::to_vec(&t.json)
            .map(Some)
            .map_err(|e| Error::Other(format!("tokenizer.json: {e}"))),
    }
}

// llama.cpp `llama_token_type` / gguf `TokenType` (2 UNKNOWN and 5 UNUSED are plain vocab).
const TT_NORMAL: i64 = 1;
const TT_CONTROL: i64 = 3;
const TT_USER_DEFINED: i64 = 4;
const TT_BYTE: i64 = 6;

/// Synthesize a Hugging Face `tokenizer.json` from `tokenizer.ggml.*`. `Ok(None)` when the
/// file has no tokenizer.
fn tokenizer(file: &GgufFile) -> Result<Option<Tok<'_>>> {
    let model = match file.opt_str("tokenizer.ggml.model")? {
        None => return Ok(None),
        Some(m) => m,
    };
    if model != "gpt2" {
        return Err(file.meta_err(
            "tokenizer.ggml.model",
            format!("tokenizer `{model}` is not supported (only byte-level BPE `gpt2`)"),
        ));
    }
    let tokens: &[String] = match file.get("tokenizer.ggml.tokens") {
        Some(Value::Array(Array::Str(v))) if !v.is_empty() => v,
        Some(_) => {
            return Err(file.meta_err(
                "tokenizer.ggml.tokens",
                "expected a non-empty array of strings",
            ))
        }
        None => return Err(file.meta_err("tokenizer.ggml.tokens", "missing")),
    };
    let n = tokens.len();
    let types: Vec<i64> = match file.get("tokenizer.ggml.token_type") {
        None => vec![TT_NORMAL; n],
        Some(v) => {
            let t = v.as_array().and_then(Array::to_i64).ok_or_else(|| {
                file.meta_err("tokenizer.ggml.token_type", "expected an integer array")
            })?;
            if t.len() != n {
                return Err(file.meta_err(
                    "tokenizer.ggml.token_type",
                    format!("{} entries for {n} tokens", t.len()),
                ));
            }
            if let Some((i, x)) = t
                .iter()
                .enumerate()
                .find(|(_, &x)| !(TT_NORMAL..=TT_BYTE).contains(&x))
            {
                return Err(file.meta_err(
                    "tokenizer.ggml.token_type",
                    format!("token {i}: unknown type {x}"),
                ));
            }
            t
        }
    };
    let merges: &[String] = match file.get("tokenizer.ggml.merges") {
        Some(Value::Array(Array::Str(v))) => v,
        Some(Value::Array(a)) if a.is_empty() => &[],
        Some(_) => {
            return Err(file.meta_err("tokenizer.ggml.merges", "expected an array of strings"))
        }
        None => return Err(file.meta_err("tokenizer.ggml.merges", "missing")),
    };
    let id = |key: &str| -> Result<Option<u64>> {
        match file.opt_u64(key)? {
            Some(i) if i as usize >= n || i > u32::MAX as u64 => Err(file.meta_err(
                key,
                format!("token id {i} out of range (vocabulary of {n})"),
            )),
            x => Ok(x),
        }
    };
    let bos = id("tokenizer.ggml.bos_token_id")?;
    let eos = id("tokenizer.ggml.eos_token_id")?;
    let eot = id("tokenizer.ggml.eot_token_id")?;
    let pad = id("tokenizer.ggml.padding_token_id")?;
    let unk = id("tokenizer.ggml.unknown_token_id")?;
    let add_bos = file
        .opt_bool("tokenizer.ggml.add_bos_token")?
        .unwrap_or(false);
    let add_eos = file
        .opt_bool("tokenizer.ggml.add_eos_token")?
        .unwrap_or(false);
    let pre = file.opt_str("tokenizer.ggml.pre")?.unwrap_or("default");

    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let (pre_tokenizer, ignore_merges) = match pre {
        "default" | "gpt2" | "gpt-2" | "smollm" => (byte_level(true), false),
        "llama-bpe" | "llama3" | "llama-v3" => (
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": LLAMA3_PATTERN},
                 "behavior": "Isolated", "invert": false},
                byte_level(false)
            ]}),
            true,
        ),
        "llama4" => (
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": LLAMA4_PATTERN},
                 "behavior": "Isolated", "invert": false},
                byte_level(false)
            ]}),
            true,
        ),
        other => {
            return Err(file.meta_err(
                "tokenizer.ggml.pre",
                format!(
                    "pre-tokenizer `{other}` is not supported (gpt2, smollm, llama-bpe, llama4)"
                ),
            ))
        }
    };

    let mut vocab = Map::new();
    for (i, t) in tokens.iter().enumerate() {
        if vocab.insert(t.clone(), json!(i)).is_some() {
            // Hugging Face maps a string to one id; a duplicate would silently change ids.
            return Err(file.meta_err(
                "tokenizer.ggml.tokens",
                format!("token {i} {t:?} is a duplicate"),
            ));
        }
    }
    let mut merge_pairs = Vec::with_capacity(merges.len());
    for (i, m) in merges.iter().enumerate() {
        let (a, b) = m.split_once(' ').ok_or_else(|| {
            file.meta_err(
                "tokenizer.ggml.merges",
                format!("merge {i} {m:?} is not two tokens separated by a space"),
            )
        })?;
        if b.contains(' ') || a.is_empty() || b.is_empty() {
            return Err(file.meta_err(
                "tokenizer.ggml.merges",
                format!("merge {i} {m:?} is not two tokens separated by a space"),
            ));
        }
        merge_pairs.push(json!([a, b]));
    }
    let mut added = Vec::new();
    for (i, (t, &ty)) in tokens.iter().zip(&types).enumerate() {
        let special = match ty {
            TT_CONTROL => true,
            TT_USER_DEFINED => false,
            _ => continue,
        };
        added.push(json!({
            "id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
            "normalized": !special, "special": special
        }));
    }
    let post_processor = match (
        add_bos.then_some(bos).flatten(),
        add_eos.then_some(eos).flatten(),
    ) {
        (None, None) => json!({"type": "TemplateProcessing",
            "single": [{"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {}}),
        (b, e) => {
            let mut single = Vec::new();
            let mut pair = Vec::new();
            let mut specials = Map::new();
            let sp = |id: u64| {
                let s = &tokens[id as usize];
                (
                    json!({"SpecialToken": {"id": s, "type_id": 0}}),
                    json!({"id": s, "ids": [id], "tokens": [s]}),
                )
            };
            if let Some(b) = b {
                let (x, d) = sp(b);
                single.push(x.clone());
                pair.push(x);
                specials.insert(tokens[b as usize].clone(), d);
            }
            single.push(json!({"Sequence": {"id": "A", "type_id": 0}}));
            pair.push(json!({"Sequence": {"id": "A", "type_id": 0}}));
            if let Some(e) = e {
                let (x, d) = sp(e);
                single.push(x.clone());
                pair.push(x);
                specials.insert(tokens[e as usize].clone(), d);
            }
            if let Some(b) = b {
                pair.push(json!({"SpecialToken": {"id": &tokens[b as usize], "type_id": 1}}));
            }
            pair.push(json!({"Sequence": {"id": "B", "type_id": 1}}));
            if let Some(e) = e {
                pair.push(json!({"SpecialToken": {"id": &tokens[e as usize], "type_id": 1}}));
            }
            json!({"type": "TemplateProcessing", "single": single, "pair": pair,
                   "special_tokens": specials})
        }
    };
    let tj = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null,
            "continuing_subword_prefix": "", "end_of_word_suffix": "",
            "fuse_unk": false, "byte_fallback": false, "ignore_merges": ignore_merges,
            "vocab": vocab, "merges": merge_pairs
        }
    });
    Ok(Some(Tok {
        json: tj,
        tokens,
        n_tokens: n,
        bos,
        eos,
        eot,
        pad,
        unk,
        add_bos,
        add_eos,
    }))
}
