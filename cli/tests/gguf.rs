//! GGUF reader: dequantization against hand-computed values, v2/v3, the Q/K un-permutation,
//! corrupted and truncated files, and the real SmolLM2 GGUF.

mod support;

use ferroq_convert::gguf::{
    self, dequantize, hf_name, permute_qk_rows, unpermute_qk_rows, GgmlType, GgufFile,
};
use support::{f16_bits, GgufWriter, Meta};

// ggml type ids
const F32: u32 = 0;
const F16: u32 = 1;
const Q4_0: u32 = 2;
const Q4_1: u32 = 3;
const Q5_0: u32 = 6;
const Q5_1: u32 = 7;
const Q8_0: u32 = 8;
const BF16: u32 = 30;

fn one_tensor(version: u32, ty: u32, dims: &[u64], data: Vec<u8>) -> Vec<f32> {
    let mut w = GgufWriter::new(version);
    w.kv("general.architecture", Meta::s("test"));
    w.tensor("t", dims, ty, data);
    let f = GgufFile::from_bytes("mem.gguf", w.build()).expect("valid file");
    assert_eq!(f.version, version);
    let mut out = Vec::new();
    f.read_f32("t", &mut out).expect("dequantize");
    out
}

fn both_versions(ty: u32, dims: &[u64], data: Vec<u8>) -> Vec<f32> {
    let a = one_tensor(2, ty, dims, data.clone());
    let b = one_tensor(3, ty, dims, data);
    assert_eq!(a, b, "v2 and v3 must read the same");
    a
}

#[test]
fn f32_roundtrip() {
    let v = [1.5f32, -2.0, 0.0, f32::MIN_POSITIVE, 3.25e-7, -1e30];
    let data = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    assert_eq!(both_versions(F32, &[6], data), v);
}

#[test]
fn f16_values() {
    // 1.0, -2.0, 65504 (max), 2^-24 (smallest subnormal), 0x3555 = 0.333251953125, -0.0
    let bits: [u16; 6] = [0x3C00, 0xC000, 0x7BFF, 0x0001, 0x3555, 0x8000];
    let data = bits.iter().flat_map(|b| b.to_le_bytes()).collect();
    let got = both_versions(F16, &[6], data);
    assert_eq!(
        got,
        [1.0, -2.0, 65504.0, 2f32.powi(-24), 1365.0 / 4096.0, -0.0]
    );
    assert!(got[5].is_sign_negative());
}

#[test]
fn bf16_values() {
    // bf16 is the top half of an f32: 0x3F80 = 1.0, 0xC040 = -3.0, 0x3FC0 = 1.5, 0x4049 = 3.140625
    let bits: [u16; 4] = [0x3F80, 0xC040, 0x3FC0, 0x4049];
    let data = bits.iter().flat_map(|b| b.to_le_bytes()).collect();
    assert_eq!(both_versions(BF16, &[4], data), [1.0, -3.0, 1.5, 3.140625]);
}

#[test]
fn q8_0_two_blocks() {
    // block 0: d = 0.5, qs = -128, -1, 0, 1, 127, then j - 16
    // block 1: d = -0.25, qs = j
    let mut data = Vec::new();
    data.extend_from_slice(&f16_bits(0.5));
    let mut qs0 = [0i8; 32];
    qs0[..5].copy_from_slice(&[-128, -1, 0, 1, 127]);
    for (j, q) in qs0.iter_mut().enumerate().skip(5) {
        *q = j as i8 - 16;
    }
    data.extend(qs0.iter().map(|&q| q as u8));
    data.extend_from_slice(&f16_bits(-0.25));
    data.extend(0u8..32);
    let got = both_versions(Q8_0, &[64], data);
    assert_eq!(&got[..5], &[-64.0, -0.5, 0.0, 0.5, 63.5]);
    assert_eq!(got[5], -5.5); // (5 - 16) * 0.5
    assert_eq!(got[31], 7.5); // (31 - 16) * 0.5
    for j in 0..32 {
        assert_eq!(got[32 + j], j as f32 * -0.25);
    }
}

#[test]
fn q4_0_nibble_order() {
    // d = 0.25; byte j holds element j (low nibble) and element j + 16 (high nibble).
    // low nibble = j, high nibble = 15 - j  =>  x[j] = (j - 8) / 4, x[j+16] = (7 - j) / 4
    let mut data = f16_bits(0.25).to_vec();
    data.extend((0u8..16).map(|j| j | ((15 - j) << 4)));
    let got = both_versions(Q4_0, &[32], data);
    assert_eq!(got[0], -2.0);
    assert_eq!(got[8], 0.0);
    assert_eq!(got[15], 1.75);
    assert_eq!(got[16], 1.75);
    assert_eq!(got[31], -2.0);
    for j in 0..16 {
        assert_eq!(got[j], (j as f32 - 8.0) * 0.25);
        assert_eq!(got[j + 16], (7.0 - j as f32) * 0.25);
    }
}

#[test]
fn q4_1_scale_and_min() {
    // d = 0.5, m = -1.0: x = q * 0.5 - 1
    let mut data = f16_bits(0.5).to_vec();
    data.extend_from_slice(&f16_bits(-1.0));
    data.extend((0u8..16).map(|j| j | ((15 - j) << 4)));
    // second block: d = 2, m = 0.125 and all nibbles 0xF => 30.125
    data.extend_from_slice(&f16_bits(2.0));
    data.extend_from_slice(&f16_bits(0.125));
    data.extend([0xFFu8; 16]);
    let got = both_versions(Q4_1, &[32, 2], data);
    assert_eq!(got.len(), 64);
    assert_eq!(got[0], -1.0);
    assert_eq!(got[15], 6.5);
    assert_eq!(got[16], 6.5);
    assert_eq!(got[31], -1.0);
    assert_eq!(got[3], 0.5);
    assert!(got[32..].iter().all(|&x| x == 30.125));
}

#[test]
fn q5_0_high_bits() {
    // d = 1; qh bit j is the 5th bit of element j (bits 0..16 low half, 16..32 high half).
    // qh = bit 0 | bit 16 | bit 31; qs[0] = 0x21, qs[15] = 0xF0, rest 0.
    // x[0] = (1 | 16) - 16 = 1; x[16] = (2 | 16) - 16 = 2; x[31] = (15 | 16) - 16 = 15;
    // x[15] = 0 - 16 = -16; others -16.
    let mut data = f16_bits(1.0).to_vec();
    let qh: u32 = 1 | (1 << 16) | (1 << 31);
    data.extend_from_slice(&qh.to_le_bytes());
    let mut qs = [0u8; 16];
    qs[0] = 0x21;
    qs[15] = 0xF0;
    data.extend_from_slice(&qs);
    let got = both_versions(Q5_0, &[32], data);
    assert_eq!(got[0], 1.0);
    assert_eq!(got[16], 2.0);
    assert_eq!(got[31], 15.0);
    assert_eq!(got[15], -16.0);
    assert_eq!(got[1], -16.0);
    assert_eq!(got[17], -16.0);
}

#[test]
fn q5_1_high_bits() {
    // d = 0.5, m = 1; same bits as above but no -16 offset: x = q * 0.5 + 1
    let mut data = f16_bits(0.5).to_vec();
    data.extend_from_slice(&f16_bits(1.0));
    let qh: u32 = 1 | (1 << 16) | (1 << 31);
    data.extend_from_slice(&qh.to_le_bytes());
    let mut qs = [0u8; 16];
    qs[0] = 0x21;
    qs[15] = 0xF0;
    data.extend_from_slice(&qs);
    let got = both_versions(Q5_1, &[32], data);
    assert_eq!(got[0], 17.0 * 0.5 + 1.0);
    assert_eq!(got[16], 18.0 * 0.5 + 1.0);
    assert_eq!(got[31], 31.0 * 0.5 + 1.0);
    assert_eq!(got[15], 1.0);
    assert_eq!(got[1], 1.0);
}

#[test]
fn dequantize_checks_sizes() {
    let mut out = vec![0f32; 32];
    assert!(dequantize(GgmlType::Q8_0, &[0u8; 33], &mut out).is_err());
    let mut out = vec![0f32; 31];
    assert!(dequantize(GgmlType::Q8_0, &[0u8; 34], &mut out).is_err());
    let mut out = vec![0f32; 256];
    assert!(dequantize(GgmlType::Q6K, &[0u8; 209], &mut out).is_err());
    assert!(dequantize(GgmlType::Q3K, &[0u8; 110], &mut out).is_err());
}

// ---------------------------------------------------------------------------------------------
// Q/K permutation

/// convert_hf_to_gguf.py: w.reshape(n_head, 2, hd/2, cols).swapaxes(1, 2).reshape(w.shape),
/// written as index arithmetic independently of the library.
fn reference_permute(w: &[f32], n_head: usize, cols: usize) -> Vec<f32> {
    let hd = w.len() / cols / n_head;
    let half = hd / 2;
    let mut out = vec![0f32; w.len()];
    // out[h, j, i, c] = w[h, i, j, c]
    for h in 0..n_head {
        for j in 0..half {
            for i in 0..2 {
                for c in 0..cols {
                    out[((h * half + j) * 2 + i) * cols + c] =
                        w[((h * 2 + i) * half + j) * cols + c];
                }
            }
        }
    }
    out
}

#[test]
fn permutation_known_cases() {
    let mut a: Vec<f32> = (0..4).map(|x| x as f32).collect();
    permute_qk_rows(&mut a, 1, 1).unwrap();
    assert_eq!(a, [0.0, 2.0, 1.0, 3.0]);
    let mut b: Vec<f32> = (0..8).map(|x| x as f32).collect();
    permute_qk_rows(&mut b, 2, 1).unwrap();
    assert_eq!(b, [0.0, 2.0, 1.0, 3.0, 4.0, 6.0, 5.0, 7.0]);
    let mut c: Vec<f32> = (0..6).map(|x| x as f32).collect();
    permute_qk_rows(&mut c, 1, 1).unwrap();
    assert_eq!(c, [0.0, 3.0, 1.0, 4.0, 2.0, 5.0]);
    unpermute_qk_rows(&mut c, 1, 1).unwrap();
    assert_eq!(c, [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
    // whole rows move
    let mut d: Vec<f32> = (0..8).map(|x| x as f32).collect();
    permute_qk_rows(&mut d, 1, 2).unwrap();
    assert_eq!(d, [0.0, 1.0, 4.0, 5.0, 2.0, 3.0, 6.0, 7.0]);
}

#[test]
fn permutation_matches_reference_and_inverts() {
    for &(n_head, hd, cols) in &[(1, 2, 1), (3, 4, 5), (9, 64, 3), (2, 10, 7)] {
        let w: Vec<f32> = (0..n_head * hd * cols).map(|x| x as f32).collect();
        let mut p = w.clone();
        permute_qk_rows(&mut p, n_head, cols).unwrap();
        assert_eq!(p, reference_permute(&w, n_head, cols));
        unpermute_qk_rows(&mut p, n_head, cols).unwrap();
        assert_eq!(p, w, "unpermute(permute(w)) == w for {n_head}x{hd}x{cols}");
    }
    let mut bad = vec![0f32; 6];
    assert!(unpermute_qk_rows(&mut bad, 4, 1).is_err());
    assert!(unpermute_qk_rows(&mut bad, 2, 1).is_err()); // head dim 3 is odd
    assert!(unpermute_qk_rows(&mut bad, 0, 1).is_err());
}

#[test]
fn names() {
    assert_eq!(
        hf_name("token_embd.weight").as_deref(),
        Some("model.embed_tokens.weight")
    );
    assert_eq!(hf_name("output.weight").as_deref(), Some("lm_head.weight"));
    assert_eq!(
        hf_name("output_norm.weight").as_deref(),
        Some("model.norm.weight")
    );
    for (g, h) in [
        ("attn_q", "self_attn.q_proj"),
        ("attn_k", "self_attn.k_proj"),
        ("attn_v", "self_attn.v_proj"),
        ("attn_output", "self_attn.o_proj"),
        ("ffn_gate", "mlp.gate_proj"),
        ("ffn_up", "mlp.up_proj"),
        ("ffn_down", "mlp.down_proj"),
        ("attn_norm", "input_layernorm"),
        ("ffn_norm", "post_attention_layernorm"),
    ] {
        assert_eq!(
            hf_name(&format!("blk.17.{g}.weight")),
            Some(format!("model.layers.17.{h}.weight"))
        );
    }
    for bad in [
        "blk..attn_q.weight",
        "blk.x.attn_q.weight",
        "blk.01.attn_q.weight",
        "blk.1.foo.weight",
        "rope_freqs.weight",
        "blk.1.attn_q",
    ] {
        assert_eq!(hf_name(bad), None, "{bad}");
    }
}

// ---------------------------------------------------------------------------------------------
// A tiny llama model

const HIDDEN: usize = 8;
const HEADS: usize = 2;
const KV_HEADS: usize = 1;
const HEAD_DIM: usize = 4;
const FFN: usize = 32;
const LAYERS: usize = 2;

fn tiny_tokens() -> (Vec<String>, Vec<i32>, Vec<String>) {
    let mut tokens: Vec<String> = vec![
        "<|endoftext|>".into(),
        "<|im_start|>".into(),
        "<|im_end|>".into(),
        "<tool>".into(),
    ];
    let mut types = vec![3, 3, 3, 4];
    for t in ["a", "b", "c", "Ġ", "ab", "Ġa", "abc"] {
        tokens.push(t.into());
        types.push(1);
    }
    let merges = vec!["a b".to_string(), "Ġ a".into(), "ab c".into()];
    (tokens, types, merges)
}

fn seq(n: usize, seed: f32) -> Vec<f32> {
    (0..n).map(|i| ((i as f32 + seed) * 0.37).sin()).collect()
}

/// HF-layout q/k weights for layer l, and the writer with everything.
fn tiny_llama(version: u32, tied: bool, pre: &str) -> (GgufWriter, Vec<Vec<f32>>) {
    tiny_llama_down(version, tied, pre, false)
}

/// [`tiny_llama`] with the FFN down projections stored as Q4_0 instead of Q8_0 if `down_q4_0`.
fn tiny_llama_down(
    version: u32,
    tied: bool,
    pre: &str,
    down_q4_0: bool,
) -> (GgufWriter, Vec<Vec<f32>>) {
    let (tokens, types, merges) = tiny_tokens();
    let vocab = tokens.len();
    let mut w = GgufWriter::new(version);
    w.kv("general.architecture", Meta::s("llama"))
        .kv("general.alignment", Meta::U32(32))
        .kv("llama.block_count", Meta::U32(LAYERS as u32))
        .kv("llama.context_length", Meta::U32(128))
        .kv("llama.embedding_length", Meta::U32(HIDDEN as u32))
        .kv("llama.feed_forward_length", Meta::U32(FFN as u32))
        .kv("llama.attention.head_count", Meta::U32(HEADS as u32))
        .kv("llama.attention.head_count_kv", Meta::U32(KV_HEADS as u32))
        .kv("llama.rope.freq_base", Meta::F32(100000.0))
        .kv("llama.attention.layer_norm_rms_epsilon", Meta::F32(1e-5))
        .kv("llama.vocab_size", Meta::U32(vocab as u32))
        .kv("llama.rope.dimension_count", Meta::U32(HEAD_DIM as u32))
        .kv("tokenizer.ggml.model", Meta::s("gpt2"))
        .kv("tokenizer.ggml.pre", Meta::s(pre))
        .kv("tokenizer.ggml.tokens", Meta::ArrStr(tokens))
        .kv("tokenizer.ggml.token_type", Meta::ArrI32(types))
        .kv("tokenizer.ggml.merges", Meta::ArrStr(merges))
        .kv("tokenizer.ggml.bos_token_id", Meta::U32(1))
        .kv("tokenizer.ggml.eos_token_id", Meta::U32(2))
        .kv("tokenizer.ggml.padding_token_id", Meta::U32(2))
        .kv("tokenizer.ggml.add_bos_token", Meta::Bool(false))
        .kv("tokenizer.chat_template", Meta::s("{{ messages }}"));
    let h = HIDDEN as u64;
    let mut hf_qk = Vec::new();
    // token embedding as Q8_0: 11 rows of 8 elements do not fill a block; use f32.
    w.tensor_f32(
        "token_embd.weight",
        &[h, vocab as u64],
        &seq(HIDDEN * vocab, 0.0),
    );
    for l in 0..LAYERS {
        let q = seq(HEADS * HEAD_DIM * HIDDEN, 10.0 + l as f32);
        let k = seq(KV_HEADS * HEAD_DIM * HIDDEN, 20.0 + l as f32);
        let qp = reference_permute(&q, HEADS, HIDDEN);
        let kp = reference_permute(&k, KV_HEADS, HIDDEN);
        hf_qk.push(q);
        hf_qk.push(k);
        w.tensor_f32(&format!("blk.{l}.attn_norm.weight"), &[h], &[1.0; HIDDEN]);
        w.tensor_f32(
            &format!("blk.{l}.attn_q.weight"),
            &[h, (HEADS * HEAD_DIM) as u64],
            &qp,
        );
        w.tensor_f32(
            &format!("blk.{l}.attn_k.weight"),
            &[h, (KV_HEADS * HEAD_DIM) as u64],
            &kp,
        );
        w.tensor_f32(
            &format!("blk.{l}.attn_v.weight"),
            &[h, (KV_HEADS * HEAD_DIM) as u64],
            &seq(KV_HEADS * HEAD_DIM * HIDDEN, 30.0),
        );
        w.tensor_f32(
            &format!("blk.{l}.attn_output.weight"),
            &[(HEADS * HEAD_DIM) as u64, h],
            &seq(HEADS * HEAD_DIM * HIDDEN, 40.0),
        );
        w.tensor_f32(&format!("blk.{l}.ffn_norm.weight"), &[h], &[0.5; HIDDEN]);
        // ffn weights quantized: rows of 32 (gate/up have `in` = 8, so keep f16 there)
        let gate: Vec<u8> = seq(FFN * HIDDEN, 50.0)
            .iter()
            .flat_map(|&x| f16_bits(x))
            .collect();
        w.tensor(
            &format!("blk.{l}.ffn_gate.weight"),
            &[h, FFN as u64],
            F16,
            gate,
        );
        let up: Vec<u8> = seq(FFN * HIDDEN, 60.0)
            .iter()
            .flat_map(|&x| half::bf16::from_f32(x).to_bits().to_le_bytes())
            .collect();
        w.tensor(
            &format!("blk.{l}.ffn_up.weight"),
            &[h, FFN as u64],
            BF16,
            up,
        );
        // down: [FFN=32 in, HIDDEN out] as Q8_0, one block per row, d = 1/64, qs = row + j;
        // or as Q4_0, d = ±(row + 1)/128, nibbles (row + 5j) mod 16
        let mut down = Vec::new();
        for r in 0..HIDDEN {
            if down_q4_0 {
                let sign = if r % 2 == 0 { 1.0 } else { -1.0 };
                down.extend_from_slice(&f16_bits(sign * (r + 1) as f32 / 128.0));
                let nib = |j: usize| ((r + 5 * j) % 16) as u8;
                down.extend((0..16).map(|j| nib(j) | nib(j + 16) << 4));
            } else {
                down.extend_from_slice(&f16_bits(1.0 / 64.0));
                down.extend((0..32).map(|j| (r as i8 + j as i8 - 16) as u8));
            }
        }
        w.tensor(
            &format!("blk.{l}.ffn_down.weight"),
            &[FFN as u64, h],
            if down_q4_0 { Q4_0 } else { Q8_0 },
            down,
        );
    }
    w.tensor_f32("output_norm.weight", &[h], &[2.0; HIDDEN]);
    if !tied {
        w.tensor_f32(
            "output.weight",
            &[h, vocab as u64],
            &seq(HIDDEN * vocab, 99.0),
        );
    }
    (w, hf_qk)
}

/// A Q4_0 source converted with `--quant q4l` keeps its weights exactly (the linear type has
/// the Q4_0 grid); the converter suggests q4l when the default q4 would re-quantize them.
#[test]
fn q4_0_source_is_exact_with_q4l() {
    use ferroq::internals::format::{DType, FqmFile};
    use ferroq_convert::convert::{convert, ConvertOptions, Quant};
    let (w, _) = tiny_llama_down(3, true, "smollm", true);
    let ck = open_bytes(w.build()).unwrap();
    let dir = std::env::temp_dir().join(format!("ferroq-gguf-q4l-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for quant in [Quant::Q4, Quant::Q4l] {
        let out = dir.join(format!("tiny-{}.fqm", quant.name()));
        let notes = std::sync::Mutex::new(Vec::new());
        let opts = ConvertOptions {
            quant,
            ..ConvertOptions::default()
        };
        convert(&ck, &out, &opts, &|ev| {
            if let ferroq_convert::convert::ProgressEvent::Note(n) = ev {
                notes.lock().unwrap().push(n);
            }
        })
        .unwrap();
        let hint = notes
            .lock()
            .unwrap()
            .iter()
            .any(|n| n.contains("--quant q4l"));
        assert_eq!(hint, quant == Quant::Q4, "{quant:?}: q4l hint");
        let f = FqmFile::open(&out).unwrap();
        for l in 0..LAYERS {
            let v = f.tensor(&format!("layers.{l}.ffn_down")).unwrap();
            let mut src = Vec::new();
            let name = format!("model.layers.{l}.mlp.down_proj.weight");
            ck.source.read_f32(&name, &mut src).unwrap();
            let mut row = vec![0.0f32; FFN];
            let mut exact = true;
            for r in 0..HIDDEN {
                match v.info.dtype {
                    DType::Q4Lx8 => ferroq_kernels::scalar::dequantize_row_q4x8(
                        v.q4lx8().unwrap(),
                        r,
                        FFN,
                        &mut row,
                    ),
                    DType::Q4x8 => ferroq_kernels::scalar::dequantize_row_q4x8(
                        v.q4x8().unwrap(),
                        r,
                        FFN,
                        &mut row,
                    ),
                    t => panic!("{t:?}"),
                }
                exact &= row[..] == src[r * FFN..(r + 1) * FFN];
            }
            assert_eq!(
                exact,
                quant == Quant::Q4l,
                "{quant:?} layer {l}: exact round trip"
            );
        }
        std::fs::remove_file(&out).ok();
    }
    std::fs::remove_dir(&dir).ok();
}

fn open_bytes(bytes: Vec<u8>) -> ferroq::Result<ferroq_convert::source::Checkpoint> {
    gguf::checkpoint(GgufFile::from_bytes("tiny.gguf", bytes)?)
}

#[test]
fn tiny_llama_checkpoint() {
    for version in [2, 3] {
        let (w, hf_qk) = tiny_llama(version, true, "smollm");
        let dir = std::env::temp_dir().join(format!("ferroq-gguf-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("tiny-v{version}.gguf"));
        std::fs::write(&path, w.build()).unwrap();
        let ck = gguf::open(&path).expect("open tiny llama");
        std::fs::remove_file(&path).unwrap();

        let c = &ck.config;
        assert_eq!(c["architectures"][0], "LlamaForCausalLM");
        assert_eq!(c["hidden_size"], HIDDEN);
        assert_eq!(c["num_hidden_layers"], LAYERS);
        assert_eq!(c["num_attention_heads"], HEADS);
        assert_eq!(c["num_key_value_heads"], KV_HEADS);
        assert_eq!(c["head_dim"], HEAD_DIM);
        assert_eq!(c["intermediate_size"], FFN);
        assert_eq!(c["rms_norm_eps"].as_f64(), Some(1e-5));
        assert_eq!(c["rope_theta"].as_f64(), Some(100000.0));
        assert_eq!(c["vocab_size"], 11);
        assert_eq!(c["tie_word_embeddings"], true);
        assert_eq!(c["max_position_embeddings"], 128);
        assert_eq!(c["bos_token_id"], 1);
        assert_eq!(c["eos_token_id"], 2);
        assert!(c["rope_scaling"].is_null());
        assert_eq!(ck.generation_config.as_ref().unwrap()["eos_token_id"], 2);
        let tc = ck.tokenizer_config.as_ref().unwrap();
        assert_eq!(tc["bos_token"], "<|im_start|>");
        assert_eq!(tc["eos_token"], "<|im_end|>");
        assert_eq!(ck.chat_template.as_deref(), Some("{{ messages }}"));

        let src = &ck.source;
        assert_eq!(src.tensors().len(), 2 + 9 * LAYERS);
        assert!(src.find("lm_head.weight").is_none());
        let q = src.find("model.layers.1.self_attn.q_proj.weight").unwrap();
        assert_eq!(q.shape, [HEADS * HEAD_DIM, HIDDEN]);
        assert_eq!(q.dtype, "f32");
        let d = src.find("model.layers.0.mlp.down_proj.weight").unwrap();
        assert_eq!(d.shape, [HIDDEN, FFN]);
        assert_eq!(d.dtype, "q8_0");
        assert_eq!(
            src.find("model.embed_tokens.weight").unwrap().shape,
            [11, HIDDEN]
        );

        let mut out = Vec::new();
        for l in 0..LAYERS {
            src.read_f32(
                &format!("model.layers.{l}.self_attn.q_proj.weight"),
                &mut out,
            )
            .unwrap();
            assert_eq!(out, hf_qk[2 * l], "q_proj un-permuted back to HF");
            src.read_f32(
                &format!("model.layers.{l}.self_attn.k_proj.weight"),
                &mut out,
            )
            .unwrap();
            assert_eq!(out, hf_qk[2 * l + 1], "k_proj un-permuted back to HF");
            src.read_f32(
                &format!("model.layers.{l}.self_attn.v_proj.weight"),
                &mut out,
            )
            .unwrap();
            assert_eq!(
                out,
                seq(KV_HEADS * HEAD_DIM * HIDDEN, 30.0),
                "v_proj untouched"
            );
        }
        src.read_f32("model.layers.0.mlp.down_proj.weight", &mut out)
            .unwrap();
        assert_eq!(out.len(), HIDDEN * FFN);
        // row r, column j: (r + j - 16) / 64
        assert_eq!(out[3 * FFN + 5], (3.0 + 5.0 - 16.0) / 64.0);
        src.read_f32("model.layers.0.mlp.up_proj.weight", &mut out)
            .unwrap();
        assert_eq!(out[7], half::bf16::from_f32(seq(8, 60.0)[7]).to_f32());
        assert!(src.read_f32("nope", &mut out).is_err());

        // tokenizer.json
        let tj: serde_json::Value =
            serde_json::from_slice(ck.tokenizer_json.as_ref().unwrap()).unwrap();
        assert_eq!(tj["model"]["type"], "BPE");
        assert_eq!(tj["model"]["vocab"]["abc"], 10);
        assert_eq!(tj["model"]["merges"][2], serde_json::json!(["ab", "c"]));
        assert_eq!(tj["model"]["ignore_merges"], false);
        let added = tj["added_tokens"].as_array().unwrap();
        assert_eq!(added.len(), 4);
        assert_eq!(added[1]["content"], "<|im_start|>");
        assert_eq!(added[1]["special"], true);
        assert_eq!(added[3]["content"], "<tool>");
        assert_eq!(added[3]["special"], false);
        assert_eq!(tj["pre_tokenizer"]["type"], "ByteLevel");
        assert_eq!(tj["pre_tokenizer"]["use_regex"], true);
        assert_eq!(tj["decoder"]["type"], "ByteLevel");
    }
}

#[test]
fn tiny_llama_untied_and_llama3_pretokenizer() {
    let (w, _) = tiny_llama(3, false, "llama-bpe");
    let ck = open_bytes(w.build()).unwrap();
    assert_eq!(ck.config["tie_word_embeddings"], false);
    let lm = ck.source.find("lm_head.weight").unwrap();
    assert_eq!(lm.shape, [11, HIDDEN]);
    let tj: serde_json::Value =
        serde_json::from_slice(ck.tokenizer_json.as_ref().unwrap()).unwrap();
    let pre = &tj["pre_tokenizer"];
    assert_eq!(pre["type"], "Sequence");
    assert_eq!(pre["pretokenizers"][0]["type"], "Split");
    assert_eq!(pre["pretokenizers"][0]["behavior"], "Isolated");
    assert_eq!(
        pre["pretokenizers"][0]["pattern"]["Regex"],
        gguf::LLAMA3_PATTERN
    );
    assert_eq!(pre["pretokenizers"][1]["type"], "ByteLevel");
    assert_eq!(pre["pretokenizers"][1]["use_regex"], false);
    assert_eq!(tj["model"]["ignore_merges"], true);

    // Llama 3.1 style RoPE scaling as `rope_freqs.weight` (head_dim / 2 divisors) is read
    let (mut w, _) = tiny_llama(3, false, "llama4");
    w.tensor_f32("rope_freqs.weight", &[HEAD_DIM as u64 / 2], &[1.0, 8.0]);
    let ck = open_bytes(w.build()).unwrap();
    assert_eq!(ck.rope_freq_factors.as_deref(), Some(&[1.0f32, 8.0][..]));
    let cfg = ferroq_convert::convert::checkpoint_config(&ck).unwrap();
    assert_eq!(cfg.rope_freq_factors, Some(vec![1.0, 8.0]));
    assert!(cfg.rope_scaling.is_none());
    let tj: serde_json::Value =
        serde_json::from_slice(ck.tokenizer_json.as_ref().unwrap()).unwrap();
    assert_eq!(
        tj["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"],
        gguf::LLAMA4_PATTERN
    );

    // unsupported pre-tokenizer: a clear error naming the field
    let (w, _) = tiny_llama(3, true, "some-new-thing");
    let e = open_bytes(w.build())
        .err()
        .expect("unknown pre must fail")
        .to_string();
    assert!(e.contains("tokenizer.ggml.pre"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// Corruption

fn must_fail(bytes: Vec<u8>, what: &str) -> String {
    match open_bytes(bytes) {
        Ok(_) => panic!("{what}: corrupted file was accepted"),
        Err(e) => e.to_string(),
    }
}

fn small_valid() -> (Vec<u8>, support::Layout) {
    let (w, _) = tiny_llama(3, true, "smollm");
    w.build_with_layout()
}

#[test]
fn every_truncation_fails_cleanly() {
    let (bytes, _) = small_valid();
    assert!(open_bytes(bytes.clone()).is_ok());
    for len in 0..bytes.len() {
        let r = open_bytes(bytes[..len].to_vec());
        assert!(
            r.is_err(),
            "truncation to {len} of {} bytes was accepted",
            bytes.len()
        );
    }
}

#[test]
fn byte_flips_never_panic() {
    // Every byte of the header region set to 0xFF, 0x00 and 0x80 in turn: Ok or Err, no panic.
    let (bytes, lay) = small_valid();
    for pos in 0..lay.data_start {
        for v in [0xFFu8, 0x00, 0x80, 0x7F] {
            let mut b = bytes.clone();
            b[pos] = v;
            let _ = open_bytes(b);
        }
    }
}

fn put_u64(b: &mut [u8], pos: usize, v: u64) {
    b[pos..pos + 8].copy_from_slice(&v.to_le_bytes());
}
fn put_u32(b: &mut [u8], pos: usize, v: u32) {
    b[pos..pos + 4].copy_from_slice(&v.to_le_bytes());
}

#[test]
fn bad_header_fields() {
    let (bytes, _) = small_valid();
    let mut b = bytes.clone();
    b[0] = b'X';
    assert!(must_fail(b, "magic").contains("magic"));
    for v in [0u32, 1, 4, u32::MAX] {
        let mut b = bytes.clone();
        put_u32(&mut b, 4, v);
        assert!(must_fail(b, "version").contains("version"));
    }
    for v in [u64::MAX, 1 << 40, 1000, 39] {
        let mut b = bytes.clone();
        put_u64(&mut b, 8, v);
        let e = must_fail(b, "tensor_count");
        assert!(!e.is_empty());
    }
    for v in [u64::MAX, 1 << 40, 1000, 23] {
        let mut b = bytes.clone();
        put_u64(&mut b, 16, v);
        let _ = must_fail(b, "metadata_kv_count");
    }
    // tensor_count = 0: parses, but the checkpoint lacks token_embd
    let mut b = bytes.clone();
    put_u64(&mut b, 8, 0);
    let _ = must_fail(b, "no tensors");
}

#[test]
fn huge_lengths() {
    let (bytes, lay) = small_valid();
    // first key's length
    for v in [u64::MAX, 1 << 40, bytes.len() as u64, (1 << 26) + 1] {
        let mut b = bytes.clone();
        put_u64(&mut b, 24, v);
        let e = must_fail(b, "key length");
        assert!(e.contains("metadata key #0"), "{e}");
    }
    // the tokens array length (array: u32 type, u64 count)
    let pos = lay.value_pos["tokenizer.ggml.tokens"] + 4;
    for v in [u64::MAX, 1 << 40, 1 << 24, 12, 10] {
        let mut b = bytes.clone();
        put_u64(&mut b, pos, v);
        let _ = must_fail(b, "array length");
    }
    // a string value's length
    let pos = lay.value_pos["tokenizer.ggml.model"];
    for v in [u64::MAX, 1 << 30] {
        let mut b = bytes.clone();
        put_u64(&mut b, pos, v);
        let e = must_fail(b, "string length");
        assert!(e.contains("tokenizer.ggml.model"), "{e}");
    }
    // a tensor name's length
    for v in [u64::MAX, 1 << 30] {
        let mut b = bytes.clone();
        put_u64(&mut b, lay.tinfo_pos[3], v);
        let e = must_fail(b, "tensor name length");
        assert!(e.contains("tensor #3"), "{e}");
    }
}

#[test]
fn bad_value_types() {
    let (bytes, lay) = small_valid();
    // type of general.architecture: unknown 13, then "array of arrays"
    let key_type = lay.value_pos["general.architecture"] - 4;
    let mut b = bytes.clone();
    put_u32(&mut b, key_type, 13);
    assert!(must_fail(b, "value type").contains("general.architecture"));
    let arr = lay.value_pos["tokenizer.ggml.tokens"];
    let mut b = bytes.clone();
    put_u32(&mut b, arr, 9);
    assert!(must_fail(b, "nested").contains("nested"));
    let mut b = bytes.clone();
    put_u32(&mut b, arr, 77);
    assert!(must_fail(b, "elem type").contains("tokenizer.ggml.tokens"));
    // bool must be 0/1
    let mut b = bytes.clone();
    b[lay.value_pos["tokenizer.ggml.add_bos_token"]] = 2;
    assert!(must_fail(b, "bool").contains("add_bos_token"));
    // wrong metadata types are named
    let mut b = bytes.clone();
    put_u32(&mut b, lay.value_pos["llama.block_count"] - 4, 6); // u32 -> f32
    assert!(must_fail(b, "block_count type").contains("llama.block_count"));
    // alignment: not a power of two, zero
    for a in [0u32, 3, 48] {
        let mut b = bytes.clone();
        put_u32(&mut b, lay.value_pos["general.alignment"], a);
        assert!(must_fail(b, "alignment").contains("general.alignment"));
    }
    // invalid UTF-8 in a key
    let mut b = bytes.clone();
    b[lay.kv_pos["general.architecture"] + 8] = 0xFF;
    assert!(must_fail(b, "utf8").contains("UTF-8"));
}

#[test]
fn bad_tensor_infos() {
    let (bytes, lay) = small_valid();
    let t = 4; // some tensor
               // offsets: unaligned, beyond the end, overflowing
    for v in [1u64, 1 << 40, u64::MAX - 31, !31u64] {
        let mut b = bytes.clone();
        put_u64(&mut b, lay.offset_pos[t], v);
        assert!(must_fail(b, "offset").contains("tensor `"), "offset {v}");
    }
    let mut b = bytes.clone();
    put_u64(&mut b, lay.offset_pos[t], 0);
    assert!(must_fail(b, "overlap").contains("overlaps"));
    // n_dims 0 and 5
    for v in [0u32, 5, u32::MAX] {
        let mut b = bytes.clone();
        put_u32(&mut b, lay.ndims_pos[t], v);
        assert!(must_fail(b, "n_dims").contains("n_dims"));
    }
    // dims: zero, overflowing product
    let mut b = bytes.clone();
    put_u64(&mut b, lay.ndims_pos[t] + 4, 0);
    assert!(must_fail(b, "zero dim").contains("zero dimension"));
    let mut b = bytes.clone();
    put_u64(&mut b, lay.ndims_pos[t] + 4, u64::MAX / 2);
    let _ = must_fail(b, "overflow dim");
    let mut b = bytes.clone();
    put_u64(&mut b, lay.ndims_pos[t] + 4, 1 << 33);
    put_u64(&mut b, lay.ndims_pos[t] + 12, 1 << 33);
    assert!(must_fail(b, "overflow dims").contains("overflow"));
    // unknown type, and a quantized type whose row is not whole blocks
    let mut b = bytes.clone();
    put_u32(&mut b, lay.type_pos[t], 99);
    assert!(must_fail(b, "type").contains("unknown ggml type"));
    let mut b = bytes.clone();
    put_u32(&mut b, lay.type_pos[t], Q4_0); // q_proj row of 8 is not a 32-block
    assert!(must_fail(b, "block").contains("block size"));
    // known to the parser but not dequantized: Q3_K
    let mut w = GgufWriter::new(3);
    w.kv("general.architecture", Meta::s("test"));
    w.tensor("t", &[256], 11, vec![0; 110]);
    let f = GgufFile::from_bytes("k.gguf", w.build()).unwrap();
    let mut out = Vec::new();
    assert!(f.read_f32("t", &mut out).is_err());
}

#[test]
fn bad_model_metadata() {
    // wrong architecture, mismatching shapes, unknown tensor names
    let (mut w, _) = tiny_llama(3, true, "smollm");
    w.kv[0].1 = Meta::s("qwen2");
    assert!(must_fail(w.build(), "arch").contains("general.architecture"));

    let (mut w, _) = tiny_llama(3, true, "smollm");
    for kv in w.kv.iter_mut() {
        if kv.0 == "llama.attention.head_count_kv" {
            kv.1 = Meta::U32(2);
        }
    }
    let e = must_fail(w.build(), "kv heads");
    assert!(e.contains("attn_k"), "{e}");

    let (mut w, _) = tiny_llama(3, true, "smollm");
    w.tensors[1].name = "blk.0.mystery.weight".into();
    assert!(must_fail(w.build(), "name").contains("blk.0.mystery.weight"));

    let (mut w, _) = tiny_llama(3, true, "smollm");
    w.tensors[1].name = "blk.7.attn_norm.weight".into();
    assert!(must_fail(w.build(), "layer").contains("block_count"));

    let (mut w, _) = tiny_llama(3, true, "smollm");
    for kv in w.kv.iter_mut() {
        if kv.0 == "tokenizer.ggml.eos_token_id" {
            kv.1 = Meta::U32(1000);
        }
    }
    assert!(must_fail(w.build(), "eos").contains("eos_token_id"));

    let (mut w, _) = tiny_llama(3, true, "smollm");
    for kv in w.kv.iter_mut() {
        if kv.0 == "tokenizer.ggml.merges" {
            kv.1 = Meta::ArrStr(vec!["abc".into()]);
        }
    }
    assert!(must_fail(w.build(), "merge").contains("merges"));

    let (mut w, _) = tiny_llama(3, true, "smollm");
    for kv in w.kv.iter_mut() {
        if kv.0 == "tokenizer.ggml.token_type" {
            kv.1 = Meta::ArrI32(vec![1; 3]);
        }
    }
    assert!(must_fail(w.build(), "types").contains("token_type"));
}

// ---------------------------------------------------------------------------------------------
// The real SmolLM2-135M-Instruct Q4_1 GGUF

/// Values computed independently with llama.cpp's `gguf` Python package (`gguf.dequantize`)
/// followed by transformers' `_reverse_permute_weights` (see tests/fixtures/SOURCES.md):
/// HF name, f64 sum of all elements, (flat index, f32 bits) samples.
#[allow(clippy::type_complexity)]
const SMOLLM2_REFERENCE: &[(&str, f64, &[(usize, u32)])] = &[
    (
        "model.layers.0.self_attn.q_proj.weight",
        5.922322082520e+01,
        &[
            (0, 0xbdc54000),
            (5, 0xbdc54000),
            (583, 0x3e847000),
            (18073, 0xbdad3000),
            (18656, 0x3df36000),
            (19239, 0x3f0c0c00),
            (36729, 0xbc570000),
            (37312, 0xbe1c0000),
            (331769, 0x3c168000),
            (331775, 0xbe830000),
        ],
    ),
    (
        "model.layers.0.self_attn.k_proj.weight",
        2.693705749512e+01,
        &[
            (0, 0xbe1f0000),
            (5, 0x3e334000),
            (583, 0x3ea17800),
            (18073, 0xbd0f4000),
            (18656, 0xbe9cc800),
            (19239, 0xbec3f800),
            (36729, 0x3ea4f000),
            (37312, 0x3f85fa00),
            (110201, 0xbe1d8000),
            (110591, 0x3eba3000),
        ],
    ),
    (
        "model.layers.29.self_attn.k_proj.weight",
        8.789241790771e+01,
        &[
            (0, 0x3d7fa000),
            (5, 0xbde50000),
            (583, 0xbce00000),
            (18073, 0xbe0e0800),
            (18656, 0x3b7a0000),
            (19239, 0x3d168000),
            (36729, 0x3e892000),
            (37312, 0xbd80d800),
            (110201, 0xbe432000),
            (110591, 0x3da7d000),
        ],
    ),
    (
        "model.embed_tokens.weight",
        -1.535304449415e+04,
        &[
            (0, 0xbdda3400),
            (5, 0xbd3b0800),
            (583, 0x3d924000),
            (18073, 0xbd338800),
            (18656, 0xbbca8000),
            (19239, 0x3c7c0800),
            (36729, 0x3d419900),
            (37312, 0xbdb3d480),
            (28311161, 0x3e210e00),
            (28311551, 0xbd2ad000),
        ],
    ),
    (
        "model.layers.3.mlp.down_proj.weight",
        8.166989135742e+01,
        &[
            (0, 0x3da80000),
            (5, 0x3e340000),
            (1543, 0xbe7e9800),
            (47833, 0xbcb24000),
            (49376, 0x3c330000),
            (50919, 0x3e167000),
            (97209, 0x3e2e5800),
            (98752, 0xbe16d000),
            (884153, 0x3e007000),
            (884735, 0x3eb71000),
        ],
    ),
    (
        "model.norm.weight",
        1.038332031250e+03,
        &[(0, 0x3fe10000), (5, 0x3fdc0000), (575, 0x3ffe0000)],
    ),
];

#[test]
fn smollm2_real_gguf() {
    let Some(path) = support::smollm2_gguf("smollm2_real_gguf") else {
        return;
    };
    let t0 = std::time::Instant::now();
    let ck = gguf::open(&path).expect("open SmolLM2 GGUF");
    let open_s = t0.elapsed().as_secs_f64();
    let c = &ck.config;
    let expect = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9,
        "num_key_value_heads": 3, "head_dim": 64, "intermediate_size": 1536,
        "hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
        "rope_scaling": null, "vocab_size": 49152, "tie_word_embeddings": true,
        "max_position_embeddings": 8192, "attention_bias": false, "mlp_bias": false,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2
    });
    assert_eq!(c, &expect);
    let gen = ck.generation_config.as_ref().unwrap();
    assert_eq!(gen["eos_token_id"], 2);
    assert_eq!(gen["bos_token_id"], 1);

    // tokenizer_config and chat template equal the Hugging Face release's
    let fixture_tc: serde_json::Value = serde_json::from_slice(
        &std::fs::read(support::fixture("smollm2-tokenizer_config.json")).unwrap(),
    )
    .unwrap();
    let tc = ck.tokenizer_config.as_ref().unwrap();
    for k in ["bos_token", "eos_token", "pad_token", "unk_token"] {
        assert_eq!(tc[k], fixture_tc[k], "tokenizer_config {k}");
    }
    let template =
        std::fs::read_to_string(support::fixture("smollm2-chat_template.jinja")).unwrap();
    assert_eq!(ck.chat_template.as_deref(), Some(template.as_str()));

    // tensors: 30 layers x 9 + embedding + final norm, tied (no lm_head)
    let src = &ck.source;
    assert_eq!(src.tensors().len(), 30 * 9 + 2);
    assert!(src.find("lm_head.weight").is_none());
    let shape = |n: &str| {
        src.find(n)
            .unwrap_or_else(|| panic!("{n} missing"))
            .shape
            .clone()
    };
    let dtype = |n: &str| src.find(n).unwrap().dtype.clone();
    assert_eq!(shape("model.embed_tokens.weight"), [49152, 576]);
    assert_eq!(dtype("model.embed_tokens.weight"), "q8_0");
    assert_eq!(shape("model.norm.weight"), [576]);
    for l in 0..30 {
        let p = format!("model.layers.{l}.");
        for (n, s, dt) in [
            ("self_attn.q_proj.weight", vec![576, 576], "q4_1"),
            ("self_attn.k_proj.weight", vec![192, 576], "q4_1"),
            ("self_attn.v_proj.weight", vec![192, 576], "q4_1"),
            ("self_attn.o_proj.weight", vec![576, 576], "q4_1"),
            ("mlp.gate_proj.weight", vec![1536, 576], "q4_1"),
            ("mlp.up_proj.weight", vec![1536, 576], "q4_1"),
            ("mlp.down_proj.weight", vec![576, 1536], "q4_1"),
            ("input_layernorm.weight", vec![576], "f32"),
            ("post_attention_layernorm.weight", vec![576], "f32"),
        ] {
            assert_eq!(shape(&format!("{p}{n}")), s, "{p}{n}");
            assert_eq!(dtype(&format!("{p}{n}")), dt, "{p}{n}");
        }
    }

    // every tensor dequantizes (timing printed, not asserted)
    let mut out = Vec::new();
    let t0 = std::time::Instant::now();
    for t in src.tensors() {
        src.read_f32(&t.name, &mut out).unwrap();
        assert!(out.iter().all(|x| x.is_finite()), "{}", t.name);
    }
    eprintln!(
        "SmolLM2 GGUF: open (parse + config + tokenizer.json) {open_s:.3}s, \
         dequantize all {} tensors {:.3}s",
        src.tensors().len(),
        t0.elapsed().as_secs_f64()
    );

    // dequantized + un-permuted values equal the independent reference bit for bit
    for &(name, sum, samples) in SMOLLM2_REFERENCE {
        src.read_f32(name, &mut out).unwrap();
        let n: usize = shape(name).iter().product();
        assert_eq!(out.len(), n, "{name}");
        for &(i, bits) in samples {
            assert_eq!(out[i].to_bits(), bits, "{name}[{i}] = {}", out[i]);
        }
        let s: f64 = out.iter().map(|&x| x as f64).sum();
        assert!(
            (s - sum).abs() <= 1e-9 * sum.abs().max(1.0),
            "{name}: sum {s} vs {sum}"
        );
    }

    // the synthesized tokenizer.json equals the Hugging Face release's
    let ours: serde_json::Value =
        serde_json::from_slice(ck.tokenizer_json.as_ref().unwrap()).unwrap();
    let theirs: serde_json::Value =
        serde_json::from_slice(&support::read_gz("smollm2-tokenizer.json.gz")).unwrap();
    assert_eq!(ours["model"]["vocab"], theirs["model"]["vocab"], "vocab");
    assert_eq!(ours["model"]["merges"], theirs["model"]["merges"], "merges");
    for k in [
        "type",
        "ignore_merges",
        "byte_fallback",
        "continuing_subword_prefix",
        "end_of_word_suffix",
        "fuse_unk",
        "unk_token",
        "dropout",
    ] {
        assert_eq!(ours["model"][k], theirs["model"][k], "model.{k}");
    }
    assert_eq!(ours["added_tokens"], theirs["added_tokens"], "added tokens");
    assert_eq!(
        ours["pre_tokenizer"], theirs["pre_tokenizer"],
        "pre_tokenizer"
    );
    assert_eq!(ours["decoder"], theirs["decoder"], "decoder");
    assert_eq!(ours["normalizer"], theirs["normalizer"], "normalizer");
    assert_eq!(
        ours["post_processor"], theirs["post_processor"],
        "post_processor"
    );
    // ... and so is the whole file: same behaviour by construction
    assert_eq!(ours, theirs, "tokenizer.json");
}

// ---------------------------------------------------------------------------------------------
// K-quants (common in llama.cpp's Q4_K_M files): pseudo-random blocks checked against llama.cpp's
// `gguf` Python package 0.19.0 (`gguf.dequantize`), see tests/fixtures/SOURCES.md.

fn lcg_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed;
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 56) as u8
        })
        .collect()
}

#[allow(clippy::type_complexity)]
const KQUANT_REFERENCE: &[(u32, usize, &[usize], f64, &[(usize, u32)])] = &[
    (
        12,
        144,
        &[0, 2],
        2.216875701904e+03,
        &[
            (0, 0x3ec260c0),
            (1, 0x3f139060),
            (31, 0x3f395860),
            (32, 0x40c61934),
            (33, 0x3f8338d0),
            (63, 0x40c61934),
            (64, 0x3e087980),
            (95, 0x405f6918),
            (96, 0x402cfdb8),
            (127, 0x3e8925c0),
            (128, 0x3ebbfac0),
            (200, 0x409b5eec),
            (255, 0x401113c8),
            (256, 0x412f71fc),
            (300, 0x410ccffc),
            (511, 0x402698f0),
        ],
    ),
    (
        14,
        210,
        &[208],
        3.186194152832e+02,
        &[
            (0, 0x41814860),
            (1, 0xc065d600),
            (31, 0x4200fcd0),
            (32, 0x407d7300),
            (33, 0xc03b5500),
            (63, 0x00000000),
            (64, 0x410ea9e0),
            (95, 0x412d8ec0),
            (96, 0x40b05000),
            (127, 0x41184e40),
            (128, 0xc176c240),
            (200, 0xbf726e00),
            (255, 0xbfb05000),
            (256, 0xc1254b00),
            (300, 0xc1ad8ec0),
            (511, 0x41172000),
        ],
    ),
];

#[test]
fn k_quants_match_ggml_reference() {
    for &(ty, tsz, dpos, sum, samples) in KQUANT_REFERENCE {
        let mut b = lcg_bytes(2 * tsz, 7);
        for blk in 0..2 {
            for (i, &p) in dpos.iter().enumerate() {
                let v = [0.0123f32, -0.0031][i] * (blk + 1) as f32;
                b[blk * tsz + p..blk * tsz + p + 2].copy_from_slice(&f16_bits(v));
            }
        }
        let got = both_versions(ty, &[512], b);
        for &(i, bits) in samples {
            assert_eq!(got[i].to_bits(), bits, "type {ty} [{i}] = {}", got[i]);
        }
        let s: f64 = got.iter().map(|&x| x as f64).sum();
        assert!(
            (s - sum).abs() <= 1e-9 * sum.abs(),
            "type {ty}: sum {s} vs {sum}"
        );
    }
}
