//! Session state files (`Session::save` / `save_prefix` / `load` / `restore`) on the tiny
//! parity fixtures (random weights, a trimmed SmolLM2 tokenizer): a restored session continues
//! with bit-identical logits and the same greedy ids (f32, f16, q8 and q4 KV; llama3-tiny, and
//! llama4-scout-tiny whose chunked-attention layers (chunk 8) keep a ring that must be saved
//! as it is); bad files (other model, corrupted, truncated, other version, other KV type, too
//! small a context) are refused with an error naming the file and the field, and leave the
//! session unchanged; a failed save leaves an earlier file intact.

mod support;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use ferroq::internals::engine::{Engine, GenOptions, Session, SessionOptions};
use ferroq::internals::model::KvType;

fn dir() -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("state-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A parity fixture with the SmolLM2 tokenizer cut to its vocabulary, converted to q8 once
/// per test binary.
fn model(name: &str, vocab: u64) -> PathBuf {
    static LOCK: Mutex<()> = Mutex::new(());
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let out = dir().join(format!("{name}.fqm"));
    if out.exists() {
        return out;
    }
    let hf = support::hf_with_tokenizer(&dir().join(name), name, vocab);
    support::convert(&hf, &out, "q8")
}

fn opts(ctx: usize, kv: KvType) -> SessionOptions {
    SessionOptions {
        ctx,
        batch: 5,
        threads: 1,
        kv: Some(kv),
    }
}

/// One token per forward call: any two sessions that cached the same ids computed them the
/// same way, so their logits are bit-identical whatever calls got them there.
fn opts1(ctx: usize, kv: KvType) -> SessionOptions {
    SessionOptions {
        batch: 1,
        ..opts(ctx, kv)
    }
}

fn greedy(n: usize) -> GenOptions {
    let mut g = GenOptions {
        max_tokens: n,
        ..GenOptions::default()
    };
    g.sampler.temperature = 0.0;
    g
}

/// `n` ids spread over the vocabulary (deterministic, no special meaning).
fn ids(n: usize, vocab: u32, seed: u32) -> Vec<u32> {
    (0..n as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761).wrapping_add(seed * 97) >> 7) % vocab)
        .collect()
}

fn bits(l: &[f32]) -> Vec<u32> {
    l.iter().map(|x| x.to_bits()).collect()
}

/// Save after `prompt`, continue to `more` in the saving session and in restored ones.
fn continues_identically(engine: &Arc<Engine>, kv: KvType, prompt: &[u32], more: &[u32]) {
    let file = dir().join(format!("cont-{kv:?}.fqs"));
    let mut a = Session::new(engine.clone(), &opts(64, kv)).unwrap();
    a.generate(prompt, &greedy(1), &mut |_, _| true).unwrap();
    assert_eq!(a.cached(), prompt);
    assert_eq!(a.save(&file).unwrap(), prompt.len());
    let reference = a.generate(more, &greedy(6), &mut |_, _| true).unwrap();
    let ref_logits = bits(a.logits());
    assert!(!ref_logits.is_empty());
    // restored into the same context and into a larger one
    for ctx in [64, 100] {
        let mut b = Session::restore(engine.clone(), &opts(ctx, kv), &file).unwrap();
        assert_eq!(b.cached(), prompt);
        let again = b.generate(more, &greedy(6), &mut |_, _| true).unwrap();
        assert_eq!(again.ids, reference.ids, "{kv:?} ctx {ctx}");
        assert_eq!(again.timings.reused_tokens, prompt.len(), "{kv:?}");
        assert_eq!(again.timings.prompt_tokens, more.len() - prompt.len());
        assert_eq!(
            bits(b.logits()),
            ref_logits,
            "{kv:?} ctx {ctx}: logits differ"
        );
    }
    // the same prompt again: its last token runs again on the restored cache, as it does in
    // the session that saved it
    let mut live = Session::new(engine.clone(), &opts(64, kv)).unwrap();
    live.generate(prompt, &greedy(1), &mut |_, _| true).unwrap();
    let want = live.generate(prompt, &greedy(3), &mut |_, _| true).unwrap();
    let mut b = Session::restore(engine.clone(), &opts(64, kv), &file).unwrap();
    let got = b.generate(prompt, &greedy(3), &mut |_, _| true).unwrap();
    assert_eq!(got.ids, want.ids, "{kv:?}");
    assert_eq!(got.timings.reused_tokens, prompt.len() - 1);
    assert_eq!(bits(b.logits()), bits(live.logits()), "{kv:?}");
}

#[test]
fn save_restore_continues_with_bit_identical_logits() {
    // llama3-tiny: every layer keeps every position
    let e3 = Arc::new(Engine::open(model("llama3-tiny", 384)).unwrap());
    let prompt = ids(13, 384, 1);
    let mut more = prompt.clone();
    more.extend(ids(7, 384, 2));
    for kv in [KvType::F32, KvType::F16, KvType::Q8, KvType::Q4] {
        continues_identically(&e3, kv, &prompt, &more);
    }
    // a prefix of the cache (the prompt without the answer)
    let file = dir().join("prefix.fqs");
    let mut a = Session::new(e3.clone(), &opts1(64, KvType::F32)).unwrap();
    a.generate(&more, &greedy(4), &mut |_, _| true).unwrap();
    assert_eq!(a.save_prefix(&file, prompt.len()).unwrap(), prompt.len());
    let mut b = Session::restore(e3.clone(), &opts1(64, KvType::F32), &file).unwrap();
    assert_eq!(b.cached(), &prompt[..]);
    let mut c = Session::new(e3.clone(), &opts1(64, KvType::F32)).unwrap();
    let x = b.generate(&more, &greedy(4), &mut |_, _| true).unwrap();
    let y = c.generate(&more, &greedy(4), &mut |_, _| true).unwrap();
    assert_eq!(x.ids, y.ids);
    assert_eq!(bits(b.logits()), bits(c.logits()));

    // llama4-scout-tiny: chunked attention (chunk 8) in 3 of its 4 layers; the prompt of 13
    // ends inside the second chunk and the continuation crosses into the third
    let e4 = Arc::new(Engine::open(model("llama4-scout-tiny", 512)).unwrap());
    let prompt = ids(13, 512, 3);
    let mut more = prompt.clone();
    more.extend(ids(7, 512, 4));
    for kv in [KvType::F32, KvType::Q8, KvType::Q4] {
        continues_identically(&e4, kv, &prompt, &more);
    }
    // a prompt ending on a chunk boundary (16 tokens)
    let prompt16 = ids(16, 512, 5);
    let mut more16 = prompt16.clone();
    more16.extend(ids(4, 512, 6));
    continues_identically(&e4, KvType::F32, &prompt16, &more16);
    // a prefix in an earlier chunk than the last token is gone from the ring: refused, and
    // the earlier file stays; a prefix in the last token's chunk is fine
    let mut a = Session::new(e4.clone(), &opts1(64, KvType::F32)).unwrap();
    a.generate(&more, &greedy(8), &mut |_, _| true).unwrap();
    assert_eq!(a.cached().len(), 27); // the last token (26) is in the chunk 24..32
    a.save(&file).unwrap();
    let before = std::fs::read(&file).unwrap();
    for n in [13, 24] {
        let e = a.save_prefix(&file, n).unwrap_err().to_string();
        assert!(e.contains("chunk"), "{e}");
        assert_eq!(std::fs::read(&file).unwrap(), before);
    }
    assert_eq!(a.save_prefix(&file, 26).unwrap(), 26);
    let mut b = Session::restore(e4.clone(), &opts1(64, KvType::F32), &file).unwrap();
    let mut c = Session::new(e4.clone(), &opts1(64, KvType::F32)).unwrap();
    let tail = a.cached()[..26].to_vec();
    let x = b.generate(&tail, &greedy(3), &mut |_, _| true).unwrap();
    let y = c.generate(&tail, &greedy(3), &mut |_, _| true).unwrap();
    assert_eq!(x.ids, y.ids);
    assert_eq!(x.timings.reused_tokens, 25);
    assert_eq!(bits(b.logits()), bits(c.logits()));
}

/// Replace the checksum at the end of a state file's bytes.
fn fix_checksum(b: &mut [u8]) {
    let n = b.len() - 8;
    let h = ferroq::internals::state_file::checksum(&b[..n]);
    b[n..].copy_from_slice(&h.to_le_bytes());
}

#[test]
fn bad_state_files_are_refused_and_failed_saves_keep_the_old_file() {
    let e3 = Arc::new(Engine::open(model("llama3-tiny", 384)).unwrap());
    let e4 = Arc::new(Engine::open(model("llama4-scout-tiny", 512)).unwrap());
    let d = dir().join("bad");
    std::fs::create_dir_all(&d).unwrap();
    let file = d.join("good.fqs");
    let prompt = ids(10, 384, 7);
    let mut a = Session::new(e3.clone(), &opts(32, KvType::Q8)).unwrap();
    a.generate(&prompt, &greedy(1), &mut |_, _| true).unwrap();
    a.save(&file).unwrap();
    let good = std::fs::read(&file).unwrap();
    assert_eq!(&good[..8], b"FQSTATE\0");

    // the session that refuses the files keeps its own context
    let mut s = Session::new(e3.clone(), &opts(32, KvType::Q8)).unwrap();
    let mine = ids(6, 384, 8);
    s.generate(&mine, &greedy(1), &mut |_, _| true).unwrap();
    let logits = bits(s.logits());
    let mut check = |bytes: &[u8], what: &[&str]| {
        let bad = d.join("bad.fqs");
        std::fs::write(&bad, bytes).unwrap();
        let e = s.load(&bad).unwrap_err().to_string();
        for w in what {
            assert!(e.contains(w), "want {w:?} in: {e}");
        }
        assert!(e.contains("bad.fqs"), "the file is named: {e}");
        assert_eq!(s.cached(), &mine[..]);
        assert_eq!(bits(s.logits()), logits);
    };
    let mut flipped = good.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x10;
    check(&flipped, &["`checksum`", "corrupted"]);
    check(&good[..good.len() - 100], &["truncated"]);
    check(&good[..good.len() - 1], &["truncated"]);
    check(&[good.clone(), vec![0; 3]].concat(), &["trailing"]);
    check(&good[..20], &["too short"]);
    check(&[0u8; 0], &["too short"]);
    check(
        b"not a state file at all, no no no no no no no no no no no no no no no no no",
        &["`magic`"],
    );
    let mut v2 = good.clone();
    v2[8] = 2;
    fix_checksum(&mut v2);
    check(&v2, &["`version`", "2"]);
    let mut other = good.clone();
    other[20] ^= 1; // a fingerprint byte
    fix_checksum(&mut other);
    check(&other, &["`model_fingerprint`", "different model"]);
    let mut id = good.clone();
    id[56..60].copy_from_slice(&9999u32.to_le_bytes());
    fix_checksum(&mut id);
    check(&id, &["`ids`", "9999"]);
    // a huge token count is refused from the header, before anything is allocated
    let mut huge = good.clone();
    huge[36..40].copy_from_slice(&u32::MAX.to_le_bytes());
    fix_checksum(&mut huge);
    check(&huge, &["`tokens`", "context"]);
    let mut kvb = good.clone();
    kvb[48..56].copy_from_slice(&(u64::MAX).to_le_bytes());
    fix_checksum(&mut kvb);
    check(&kvb, &["`kv_bytes`"]);
    // another model (llama4-scout-tiny) and another KV type or too small a context
    let f4 = d.join("l4.fqs");
    let mut l4 = Session::new(e4.clone(), &opts(32, KvType::Q8)).unwrap();
    l4.generate(&ids(10, 512, 9), &greedy(1), &mut |_, _| true)
        .unwrap();
    l4.save(&f4).unwrap();
    check(&std::fs::read(&f4).unwrap(), &["`model_fingerprint`"]);
    let mut f16 = Session::new(e3.clone(), &opts(32, KvType::F16)).unwrap();
    let e = f16.load(&file).unwrap_err().to_string();
    assert!(
        e.contains("`kv_type`") && e.contains("q8") && e.contains("f16"),
        "{e}"
    );
    let mut small = Session::new(e3.clone(), &opts(10, KvType::Q8)).unwrap();
    let e = small.load(&file).unwrap_err().to_string();
    assert!(e.contains("`tokens`") && e.contains("context"), "{e}");
    let e = s.load(d.join("missing.fqs")).unwrap_err().to_string();
    assert!(e.contains("missing.fqs"), "{e}");
    let e = s.load(&d).unwrap_err().to_string();
    assert!(e.contains("bad"), "{e}");
    // the session still generates as before the refusals
    let mut fresh = Session::new(e3.clone(), &opts(32, KvType::Q8)).unwrap();
    let x = s.generate(&mine, &greedy(3), &mut |_, _| true).unwrap();
    let y = fresh.generate(&mine, &greedy(3), &mut |_, _| true).unwrap();
    assert_eq!(x.ids, y.ids);

    // failed saves: into a missing directory, onto a directory; the good file is intact and
    // no temporary file stays behind
    assert!(a.save(d.join("no-such-dir").join("x.fqs")).is_err());
    assert!(a.save(&d).is_err());
    assert_eq!(std::fs::read(&file).unwrap(), good);
    let stray: Vec<_> = std::fs::read_dir(&d)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("tmp"))
        .collect();
    assert!(stray.is_empty(), "{stray:?}");
    // a good file loads after all that
    assert_eq!(s.load(&file).unwrap(), prompt.len());
    assert_eq!(s.cached(), &prompt[..]);
}
