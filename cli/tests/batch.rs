//! One-pass batched decoding ([`MultiState::forward`]): several sequences at different
//! positions and lengths in one forward pass give, row for row, the logits each sequence gets
//! alone (a [`State`] fed the same segments). The products compute every output element in the
//! same order whatever the number of rows, and the attention of a segment does not depend on the
//! others, so the logits are bit-identical (asserted exactly). Fixtures: llama3-tiny (dense)
//! and llama4-scout-tiny (MoE, chunked attention with chunks of 8 that the segments cross),
//! converted at f32, q8 and q4, with f32, f16, q8 and q4 KV caches.

mod support;

use ferroq::internals::model::{BatchSeg, KvType, Logits, Model, MultiState, State};
use std::path::PathBuf;

/// Convert a fixture into a file of the calling test's own (`tag`): the tests run in parallel
/// and each removes its files at the end.
fn convert(name: &str, quant: &str, tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ferroq-batchtest-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join(format!("{name}-{quant}-{tag}.fqm"));
    support::convert(&support::fixture("models").join(name), &out, quant)
}

/// The steps of a schedule: per step, `(sequence, tokens, logits?)` segments. The three
/// sequences start at different times, read prompts of 5, 19 and 30 tokens in chunks (the
/// scheduler's chunked prefill, crossing attention chunks of 8), then decode side by side at
/// different positions; sequence 1 is rewound and re-run (prompt caching) in the middle.
const STEPS: &[&[(usize, usize, bool)]] = &[
    &[(0, 5, true), (1, 9, false)],
    &[(0, 1, true), (1, 10, true), (2, 4, false)],
    &[(2, 11, false), (0, 1, true), (1, 1, true)],
    &[(1, 1, true), (2, 15, true), (0, 1, true)],
    &[(0, 1, true), (1, 1, true), (2, 1, true)],
    &[(2, 1, true), (0, 1, true)],
    &[(0, 1, true), (1, 1, true), (2, 1, true)],
    &[(1, 3, true), (0, 1, false), (2, 1, true)],
];

/// Rewind sequence 1 to this position before step 6.
const REWIND: (usize, usize, usize) = (6, 1, 13);

/// The ids of sequence `s`: a fixed pseudo-random stream (the same for the batch and alone).
fn ids_of(s: usize, vocab: usize) -> Vec<u32> {
    let mut x = 0x9e37_79b9u32.wrapping_mul(s as u32 + 1);
    (0..64)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x % vocab as u32
        })
        .collect()
}

fn check(name: &str, quant: &str, kvs: &[KvType]) {
    let path = convert(name, quant, "check");
    let model = Model::open(&path).unwrap();
    let v = model.config.vocab_size;
    let seqs: Vec<Vec<u32>> = (0..3).map(|s| ids_of(s, v)).collect();
    for &kv in kvs {
        let mut ms = MultiState::new(&model, 3, 64, 32, 2, kv).unwrap();
        let mut alone: Vec<State> = (0..3)
            .map(|_| State::with_kv(&model, 64, 32, false, 1, kv))
            .collect();
        let mut fed = [0usize; 3];
        let mut compared = 0;
        for (si, step) in STEPS.iter().enumerate() {
            if si == REWIND.0 {
                let (s, p) = (REWIND.1, REWIND.2);
                let kept = ms.truncate(s, p);
                assert_eq!(kept, alone[s].truncate(p), "{name}: the same position kept");
                fed[s] = kept;
            }
            let mut tokens = Vec::new();
            let mut segs = Vec::new();
            for &(s, n, logits) in step.iter() {
                segs.push(BatchSeg {
                    seq: s,
                    start: tokens.len(),
                    len: n,
                    logits,
                });
                tokens.extend_from_slice(&seqs[s][fed[s]..fed[s] + n]);
            }
            ms.forward(&model, &tokens, &segs).unwrap();
            let mut k = 0;
            for &(s, n, logits) in step.iter() {
                let want = if logits { Logits::Last } else { Logits::None };
                let ids = &seqs[s][fed[s]..fed[s] + n];
                model.forward(&mut alone[s], ids, want).unwrap();
                fed[s] += n;
                assert_eq!(ms.pos(s), alone[s].pos, "{name}: position of sequence {s}");
                if logits {
                    let (b, a) = (ms.logits(k), alone[s].logits());
                    let d = b
                        .iter()
                        .zip(a)
                        .map(|(x, y)| (x - y).abs())
                        .fold(0.0f32, f32::max);
                    assert!(
                        b == a,
                        "{name} {quant} {kv:?}: step {si}, sequence {s} at {}: batched logits \
                         differ from the sequence alone by up to {d}",
                        fed[s]
                    );
                    k += 1;
                    compared += 1;
                }
            }
        }
        assert!(compared > 15);
    }
    std::fs::remove_file(path).ok();
}

#[test]
fn batched_logits_equal_one_at_a_time_dense() {
    check("llama3-tiny", "f32", &[KvType::F32, KvType::F16]);
    check("llama3-tiny", "q8", &[KvType::Q8]);
}

#[test]
fn batched_logits_equal_one_at_a_time_moe_chunked() {
    check("llama4-scout-tiny", "f32", &[KvType::F32, KvType::Q8]);
    check("llama4-scout-tiny", "q4", &[KvType::F16, KvType::Q4]);
}

#[test]
fn bad_segments_are_errors_and_change_nothing() {
    let path = convert("llama3-tiny", "f32", "bad");
    let model = Model::open(&path).unwrap();
    let mut ms = MultiState::new(&model, 2, 16, 8, 1, KvType::F32).unwrap();
    let seg = |seq, start, len| BatchSeg {
        seq,
        start,
        len,
        logits: true,
    };
    let t = [1u32, 2, 3, 4, 5, 6, 7, 8, 9];
    for (tokens, segs) in [
        (&t[..], vec![seg(2, 0, 1)]),               // no such sequence
        (&t[..], vec![seg(0, 0, 1), seg(0, 1, 1)]), // twice
        (&t[..], vec![seg(0, 0, 9)]),               // beyond the batch
        (&t[..2], vec![seg(0, 1, 2)]),              // outside the tokens
        (&t[..], vec![seg(1, 0, 0)]),               // empty
        (&[1000u32][..], vec![seg(0, 0, 1)]),       // id beyond the vocabulary
    ] {
        assert!(ms.forward(&model, tokens, &segs).is_err(), "{segs:?}");
        assert_eq!((ms.pos(0), ms.pos(1)), (0, 0));
    }
    // the context: 16 tokens per sequence
    ms.forward(&model, &t[..8], &[seg(0, 0, 8)]).unwrap();
    ms.forward(&model, &t[..8], &[seg(0, 0, 8)]).unwrap();
    assert!(ms.forward(&model, &t[..1], &[seg(0, 0, 1)]).is_err());
    assert_eq!(ms.pos(0), 16);
    std::fs::remove_file(path).ok();
}
