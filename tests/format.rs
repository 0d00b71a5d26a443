//! `.fqm` format: write → read round trip, and the reader against truncated and corrupted files.

use ferroq::internals::format::{
    DType, FqmFile, FqmWriter, EXPERT_ALIGN, HEADER_SIZE, MAGIC, VERSION,
};
use ferroq::internals::kernels::block::{BlockQ4Lx8, BlockQ4x8, BlockQ8x8};
use serde_json::json;
use std::path::{Path, PathBuf};

/// A fresh, empty scratch directory for one test.
fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ferroq-format-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn files_in(d: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Deterministic pseudo-random bytes.
fn bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 56) as u8
        })
        .collect()
}

struct T {
    name: &'static str,
    dtype: DType,
    shape: Vec<usize>,
    align: u64,
}

fn sample_tensors() -> Vec<(T, Vec<u8>)> {
    let ts = vec![
        T {
            name: "a.f32",
            dtype: DType::F32,
            shape: vec![3, 5],
            align: 64,
        },
        T {
            name: "b.bf16",
            dtype: DType::Bf16,
            shape: vec![7],
            align: 64,
        },
        T {
            name: "c.f16",
            dtype: DType::F16,
            shape: vec![2, 3, 4],
            align: 64,
        },
        T {
            name: "layers.0.experts.0.gate",
            dtype: DType::Q4x8,
            shape: vec![9, 64],
            align: EXPERT_ALIGN,
        },
        T {
            name: "layers.0.experts.0.up",
            dtype: DType::Q8x8,
            shape: vec![8, 32],
            align: 64,
        },
        T {
            name: "layers.0.wq",
            dtype: DType::Q4Lx8,
            shape: vec![16, 96],
            align: 64,
        },
        T {
            name: "blob.x",
            dtype: DType::U8,
            shape: vec![13],
            align: 64,
        },
        T {
            name: "empty",
            dtype: DType::U8,
            shape: vec![0],
            align: 64,
        },
        T {
            name: "scalar",
            dtype: DType::F32,
            shape: vec![],
            align: 64,
        },
    ];
    ts.into_iter()
        .enumerate()
        .map(|(i, t)| {
            let n = t.dtype.nbytes(&t.shape).unwrap();
            let b = bytes(n, i as u64);
            (t, b)
        })
        .collect()
}

fn write_sample(path: &Path) -> serde_json::Value {
    let meta = json!({"ferroq_format": VERSION, "hello": "wörld", "n": [1, 2, 3]});
    let mut w = FqmWriter::create(path).unwrap();
    for (t, b) in sample_tensors() {
        w.add_tensor(t.name, t.dtype, &t.shape, &b, t.align)
            .unwrap();
    }
    w.finish(&meta).unwrap();
    meta
}

#[test]
fn round_trip_identical_views() {
    let d = scratch("roundtrip");
    let p = d.join("m.fqm");
    let meta = write_sample(&p);
    assert_eq!(files_in(&d), vec!["m.fqm"], "no temporary file left");
    let f = FqmFile::open(&p).unwrap();
    assert_eq!(f.meta(), &meta);
    let len = f.bytes().len();
    assert_eq!(len % 4096, 0, "file end padded to a page");
    let samples = sample_tensors();
    assert_eq!(f.tensors().len(), samples.len());
    for ((t, b), info) in samples.iter().zip(f.tensors()) {
        assert_eq!(info.name, t.name, "directory keeps write order");
        let v = f.tensor(t.name).unwrap();
        assert_eq!(v.info.dtype, t.dtype);
        assert_eq!(v.info.shape, t.shape);
        assert_eq!(v.data, &b[..], "{}", t.name);
        assert_eq!(v.info.offset % 64, 0);
        assert_eq!(v.info.offset as u64 % t.align, 0, "{} alignment", t.name);
        assert_eq!(
            v.data.as_ptr() as usize % 64,
            0,
            "view is 64-byte aligned in memory"
        );
    }
    // typed views
    let a = f.tensor("a.f32").unwrap().f32s().unwrap();
    assert_eq!(a.len(), 15);
    assert_eq!(bytemuck::cast_slice::<f32, u8>(a), &samples[0].1[..]);
    assert_eq!(f.tensor("b.bf16").unwrap().u16s().unwrap().len(), 7);
    assert_eq!(f.tensor("c.f16").unwrap().u16s().unwrap().len(), 24);
    let q4: &[BlockQ4x8] = f.tensor("layers.0.experts.0.gate").unwrap().q4x8().unwrap();
    assert_eq!(q4.len(), 2 * 2);
    let q8: &[BlockQ8x8] = f.tensor("layers.0.experts.0.up").unwrap().q8x8().unwrap();
    assert_eq!(q8.len(), 1);
    let q4l: &[BlockQ4Lx8] = f.tensor("layers.0.wq").unwrap().q4lx8().unwrap();
    assert_eq!(q4l.len(), 2 * 3);
    // the two 4-bit types share a layout but not a reader
    assert!(f.tensor("layers.0.wq").unwrap().q4x8().is_err());
    assert!(f
        .tensor("layers.0.experts.0.gate")
        .unwrap()
        .q4lx8()
        .is_err());
    // wrong-type views are errors, not panics
    assert!(f.tensor("a.f32").unwrap().q4x8().is_err());
    assert!(f.tensor("b.bf16").unwrap().f32s().is_err());
    assert!(f.tensor("nope").is_err());
    assert!(f.get("nope").is_none());
    // write → read → write gives the same bytes
    let p2 = d.join("m2.fqm");
    let mut w = FqmWriter::create(&p2).unwrap();
    for info in f.tensors() {
        let v = f.tensor(&info.name).unwrap();
        let align = if info.name.ends_with(".gate") {
            EXPERT_ALIGN
        } else {
            64
        };
        w.add_tensor(&info.name, info.dtype, &info.shape, v.data, align)
            .unwrap();
    }
    w.finish(f.meta()).unwrap();
    assert_eq!(std::fs::read(&p).unwrap(), std::fs::read(&p2).unwrap());
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn writer_rejects_bad_input_and_drop_removes_partial_file() {
    let d = scratch("writer");
    let p = d.join("m.fqm");
    let mut w = FqmWriter::create(&p).unwrap();
    w.add_tensor("x", DType::F32, &[2], &[0; 8], 64).unwrap();
    assert!(
        w.add_tensor("x", DType::F32, &[2], &[0; 8], 64).is_err(),
        "duplicate"
    );
    assert!(
        w.add_tensor("y", DType::F32, &[3], &[0; 8], 64).is_err(),
        "size mismatch"
    );
    assert!(
        w.add_tensor("z", DType::Q4x8, &[8, 31], &[], 64).is_err(),
        "cols % 32"
    );
    assert!(
        w.add_tensor("", DType::U8, &[0], &[], 64).is_err(),
        "empty name"
    );
    assert_eq!(
        files_in(&d).len(),
        1,
        "only the temporary file exists while writing"
    );
    assert!(!p.exists());
    drop(w);
    assert!(
        files_in(&d).is_empty(),
        "dropping the writer removes the partial file"
    );
    std::fs::remove_dir_all(&d).unwrap();
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}
fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// Byte positions of the fields of directory entry `k`.
struct EntryPos {
    name_len: usize,
    name: usize,
    dtype: usize,
    ndim: usize,
    dims: usize,
    offset: usize,
    nbytes: usize,
}

fn entry_pos(b: &[u8], k: usize) -> EntryPos {
    let mut at = le64(b, 32) as usize;
    for i in 0.. {
        let name_len = u16::from_le_bytes([b[at], b[at + 1]]) as usize;
        let ndim = b[at + 2 + name_len + 1] as usize;
        let e = EntryPos {
            name_len: at,
            name: at + 2,
            dtype: at + 2 + name_len,
            ndim: at + 2 + name_len + 1,
            dims: at + 2 + name_len + 2,
            offset: at + 2 + name_len + 2 + 8 * ndim,
            nbytes: at + 2 + name_len + 2 + 8 * ndim + 8,
        };
        if i == k {
            return e;
        }
        at = e.nbytes + 8 + 8; // nbytes, then the version 2 checksum
    }
    unreachable!()
}

/// Recompute the version 2 metadata and directory checksums where the header points (when it
/// points inside the file), so that an edited field reaches the check it is about instead of
/// failing the checksum first.
fn fix_sums(b: &mut [u8]) {
    if b.len() < HEADER_SIZE {
        return;
    }
    let (mo, ml, d_o, dl) = (le64(b, 16), le64(b, 24), le64(b, 32), le64(b, 40));
    let (Some(me), Some(de)) = (mo.checked_add(ml), d_o.checked_add(dl)) else {
        return;
    };
    let (mo, me, d_o, de) = (mo as usize, me as usize, d_o as usize, de as usize);
    if me > b.len() || de > b.len() || de < d_o + 16 {
        return;
    }
    let mh = ferroq::internals::format::xxh64(&b[mo..me]);
    b[de - 16..de - 8].copy_from_slice(&mh.to_le_bytes());
    let dh = ferroq::internals::format::xxh64(&b[d_o..de - 8]);
    b[de - 8..de].copy_from_slice(&dh.to_le_bytes());
}

/// Write `b` (checksums fixed up, see [`fix_sums`]) to a file and open it; the error message
/// must contain `want`.
fn expect_err(d: &Path, b: &[u8], want: &str) {
    let p = d.join("bad.fqm");
    let mut b = b.to_vec();
    fix_sums(&mut b);
    std::fs::write(&p, &b).unwrap();
    match FqmFile::open(&p) {
        Ok(_) => panic!("corrupt file accepted (expected error containing `{want}`)"),
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.contains(want),
                "error `{msg}` does not mention `{want}`"
            );
        }
    }
}

/// Every truncation point of a small file is an error. Past the directory the file is only
/// padding, so there every 256th point is tried.
#[test]
fn every_truncation_is_an_error() {
    let d = scratch("trunc");
    let p = d.join("m.fqm");
    let mut w = FqmWriter::create(&p).unwrap();
    w.add_tensor("a", DType::F32, &[3], &bytes(12, 1), 64)
        .unwrap();
    w.add_tensor("q", DType::Q8x8, &[8, 32], &bytes(272, 2), 64)
        .unwrap();
    w.add_tensor("blob.t", DType::U8, &[5], b"hello", 64)
        .unwrap();
    w.finish(&json!({"k": "v"})).unwrap();
    let full = std::fs::read(&p).unwrap();
    let dir_end = (le64(&full, 32) + le64(&full, 40)) as usize;
    let tp = d.join("t.fqm");
    for n in (0..full.len()).filter(|&n| n <= dir_end || n % 256 == 0) {
        // plain truncation
        std::fs::write(&tp, &full[..n]).unwrap();
        assert!(FqmFile::open(&tp).is_err(), "truncated at {n} accepted");
        // truncation with the header's file_len patched to match: the deeper checks
        // (metadata, directory, tensor ranges) must catch it
        if (HEADER_SIZE..dir_end).contains(&n) {
            let mut b = full[..n].to_vec();
            put64(&mut b, 56, n as u64);
            std::fs::write(&tp, &b).unwrap();
            assert!(
                FqmFile::open(&tp).is_err(),
                "truncated at {n} with patched length accepted"
            );
        }
    }
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn corrupted_fields_are_named_errors() {
    let d = scratch("corrupt");
    let p = d.join("m.fqm");
    write_sample(&p);
    let good = std::fs::read(&p).unwrap();
    assert!(FqmFile::open(&p).is_ok());
    let m = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut b = good.clone();
        f(&mut b);
        b
    };
    expect_err(&d, &m(&|b| b[0] = b'X'), "magic");
    expect_err(
        &d,
        &m(&|b| b[8..12].copy_from_slice(&(VERSION + 1).to_le_bytes())),
        "version",
    );
    expect_err(&d, &m(&|b| b[12] = 65), "header_size");
    expect_err(
        &d,
        &m(&|b| put64(b, 56, good.len() as u64 + 1)),
        "truncated",
    );
    expect_err(&d, &m(&|b| put64(b, 16, good.len() as u64)), "metadata");
    expect_err(&d, &m(&|b| put64(b, 16, u64::MAX - 3)), "metadata");
    expect_err(&d, &m(&|b| put64(b, 24, 1 << 40)), "metadata length");
    expect_err(&d, &m(&|b| put64(b, 16, 0)), "metadata");
    expect_err(&d, &m(&|b| put64(b, 24, le64(&good, 24) - 1)), "JSON");
    expect_err(&d, &m(&|b| put64(b, 32, u64::MAX)), "directory");
    expect_err(&d, &m(&|b| put64(b, 40, le64(&good, 40) + 1)), "trailing");
    expect_err(&d, &m(&|b| put64(b, 40, le64(&good, 40) - 1)), "truncated");
    expect_err(
        &d,
        &m(&|b| put64(b, 48, le64(&good, 48) + 1)),
        "truncated at entry",
    );
    expect_err(&d, &m(&|b| put64(b, 48, le64(&good, 48) - 1)), "trailing");
    expect_err(&d, &m(&|b| put64(b, 48, u64::MAX)), "tensor count");
    // directory entry fields (entry 0 is `a.f32` [3, 5])
    let e = entry_pos(&good, 0);
    expect_err(&d, &m(&|b| b[e.dtype] = 99), "unknown dtype code 99");
    expect_err(&d, &m(&|b| b[e.dtype] = DType::Q4x8 as u8), "a.f32");
    expect_err(&d, &m(&|b| b[e.dtype] = DType::Q4Lx8 as u8), "a.f32");
    expect_err(&d, &m(&|b| b[e.ndim] = 9), "rank");
    expect_err(&d, &m(&|b| b[e.name] = 0xFF), "UTF-8");
    expect_err(
        &d,
        &m(&|b| b[e.name_len..e.name_len + 2].copy_from_slice(&0u16.to_le_bytes())),
        "name length",
    );
    expect_err(&d, &m(&|b| put64(b, e.dims, u64::MAX)), "a.f32");
    expect_err(
        &d,
        &m(&|b| {
            put64(b, e.dims, 1 << 40);
            put64(b, e.dims + 8, 1 << 40);
        }),
        "overflow",
    );
    expect_err(&d, &m(&|b| put64(b, e.nbytes, 61)), "a.f32");
    expect_err(
        &d,
        &m(&|b| put64(b, e.offset, le64(&good, e.offset) + 8)),
        "aligned",
    );
    expect_err(
        &d,
        &m(&|b| put64(b, e.offset, good.len() as u64)),
        "outside the file",
    );
    expect_err(
        &d,
        &m(&|b| put64(b, e.offset, u64::MAX - 63)),
        "outside the file",
    );
    // shape overflow on a quantized tensor (entry 3)
    let e3 = entry_pos(&good, 3);
    expect_err(&d, &m(&|b| put64(b, e3.dims + 8, 33)), "invalid");
    expect_err(
        &d,
        &m(&|b| put64(b, e3.dims, u64::MAX / 2)),
        "layers.0.experts.0.gate",
    );
    // metadata not an object
    let meta_off = le64(&good, 16) as usize;
    expect_err(&d, &m(&|b| b[meta_off] = b'['), "");
    // short files
    expect_err(&d, &MAGIC, "shorter");
    expect_err(&d, &[], "shorter");
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn duplicate_names_rejected() {
    let d = scratch("dup");
    let p = d.join("m.fqm");
    let mut w = FqmWriter::create(&p).unwrap();
    w.add_tensor("aa", DType::U8, &[1], &[1], 64).unwrap();
    w.add_tensor("ab", DType::U8, &[1], &[2], 64).unwrap();
    w.finish(&json!({})).unwrap();
    let mut b = std::fs::read(&p).unwrap();
    let e1 = entry_pos(&b, 1);
    b[e1.name + 1] = b'a';
    expect_err(&d, &b, "twice");
    std::fs::remove_dir_all(&d).unwrap();
}

/// Flip every byte of the header, metadata and directory (one at a time): the reader must return
/// `Ok` or `Err`, never panic.
#[test]
fn single_byte_corruption_never_panics() {
    let d = scratch("flip");
    let p = d.join("m.fqm");
    write_sample(&p);
    let good = std::fs::read(&p).unwrap();
    let meta_off = le64(&good, 16) as usize;
    let dir_end = (le64(&good, 32) + le64(&good, 40)) as usize;
    let tp = d.join("t.fqm");
    let positions = (0..HEADER_SIZE).chain(meta_off..dir_end);
    for i in positions {
        for x in [0xFFu8, 0x01, 0x80] {
            let mut b = good.clone();
            b[i] ^= x;
            std::fs::write(&tp, &b).unwrap();
            let _ = FqmFile::open(&tp);
        }
    }
    std::fs::remove_dir_all(&d).unwrap();
}

/// Version 2 checksums: an edited directory or metadata byte fails at open, an edited tensor
/// byte only `verify` (opening reads no tensor data).
#[test]
fn checksums_catch_edits() {
    let d = scratch("sums");
    let p = d.join("m.fqm");
    write_sample(&p);
    let good = std::fs::read(&p).unwrap();
    let f = FqmFile::open(&p).unwrap();
    assert_eq!(f.version(), 2);
    assert!(f.tensors().iter().all(|t| t.checksum.is_some()));
    f.verify(&|_, _| {}).unwrap();
    let t = f.tensors()[1].clone();
    drop(f);
    let meta_off = le64(&good, 16) as usize;
    let e = entry_pos(&good, 0);
    for (at, want) in [
        (meta_off + 3, "checksum mismatch in the metadata"),
        (e.offset, "checksum mismatch in the tensor directory"),
        (e.dtype, "checksum mismatch in the tensor directory"),
    ] {
        let mut b = good.clone();
        b[at] ^= 0x40;
        std::fs::write(&p, &b).unwrap();
        let msg = FqmFile::open(&p).unwrap_err().to_string();
        assert!(msg.contains(want), "{msg}");
    }
    let mut b = good.clone();
    b[t.offset] ^= 1;
    std::fs::write(&p, &b).unwrap();
    let f = FqmFile::open(&p).unwrap();
    let msg = f.verify(&|_, _| {}).unwrap_err().to_string();
    assert!(
        msg.contains(&t.name) && msg.contains("checksum mismatch"),
        "{msg}"
    );
    std::fs::remove_dir_all(&d).unwrap();
}
