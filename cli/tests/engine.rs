//! The Rust embedding API (`ferroq::internals::engine`) on the real SmolLM2-135M-Instruct model (q8):
//! sharing one engine between threads, KV-cache reuse across chat turns (checked against a
//! fresh session), seeded sampling, stop strings, and input errors.

mod support;

use std::path::PathBuf;
use std::sync::Arc;

use ferroq::internals::engine::{Engine, GenOptions, Session, SessionOptions, StopReason};
use ferroq::internals::sampling::SamplerConfig;

fn model(test: &str) -> Option<PathBuf> {
    support::smollm2_fqm(
        test,
        std::path::Path::new(env!("CARGO_BIN_EXE_ferroq")),
        std::path::Path::new(env!("CARGO_TARGET_TMPDIR")),
        "q8",
    )
}

fn opts(ctx: usize) -> SessionOptions {
    SessionOptions {
        ctx,
        batch: 16,
        threads: 1,
        kv: None,
    }
}

fn greedy(n: usize) -> GenOptions {
    GenOptions {
        max_tokens: n,
        ..GenOptions::default()
    }
}

fn nop() -> impl FnMut(Option<u32>, &str) -> bool {
    |_, _| true
}

#[test]
fn engine_is_shared_by_sessions_on_two_threads() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Engine>();
    let Some(path) = model("engine_is_shared_by_sessions_on_two_threads") else {
        return;
    };
    let engine = Arc::new(Engine::open(&path).unwrap());
    assert!(engine.template().is_some());
    assert!(!engine.stop_ids().is_empty());
    let prompt = engine.encode_prompt("The three primary colors are");
    let reference = {
        let mut s = Session::new(engine.clone(), &opts(128)).unwrap();
        s.generate(&prompt, &greedy(12), &mut nop()).unwrap()
    };
    assert_eq!(reference.ids.len(), 12);
    let handles: Vec<_> = (0..2)
        .map(|_| {
            let (engine, prompt) = (engine.clone(), prompt.clone());
            std::thread::spawn(move || {
                let mut s = Session::new(engine, &opts(128)).unwrap();
                s.generate(&prompt, &greedy(12), &mut nop()).unwrap()
            })
        })
        .collect();
    for h in handles {
        let g = h.join().unwrap();
        assert_eq!(g.ids, reference.ids);
        assert_eq!(g.text, reference.text);
    }
}

#[test]
fn chat_reuses_the_cache_and_matches_a_fresh_session() {
    let Some(path) = model("chat_reuses_the_cache_and_matches_a_fresh_session") else {
        return;
    };
    let engine = Arc::new(Engine::open(&path).unwrap());
    let mut s = Session::new(engine.clone(), &opts(512)).unwrap();
    let mut streamed = String::new();
    let g1 = s
        .chat("What is 2 + 2?", &greedy(24), &mut |_, p| {
            streamed.push_str(p);
            true
        })
        .unwrap();
    assert_eq!(streamed, g1.text, "streamed pieces add up to the text");
    assert_eq!(g1.timings.reused_tokens, 0);
    let g2 = s.chat("And 3 + 3?", &greedy(24), &mut nop()).unwrap();
    let all = engine.encode_chat(s.messages(), false).unwrap();
    let turn2_prompt = {
        let m = &s.messages()[..s.messages().len() - 1];
        engine.encode_chat(m, true).unwrap()
    };
    eprintln!(
        "turn 1: {} prompt tokens; turn 2: {} reused + {} new of {}; conversation {} tokens",
        g1.timings.prompt_tokens,
        g2.timings.reused_tokens,
        g2.timings.prompt_tokens,
        turn2_prompt.len(),
        all.len()
    );
    assert_eq!(
        g2.timings.reused_tokens + g2.timings.prompt_tokens,
        turn2_prompt.len()
    );
    // only the new turn (and at most a few re-tokenized tokens of the answer) is processed
    assert!(
        g2.timings.reused_tokens >= g1.timings.prompt_tokens,
        "turn 2 reused {} tokens, turn 1's prompt alone was {}",
        g2.timings.reused_tokens,
        g1.timings.prompt_tokens
    );
    assert!(g2.timings.prompt_tokens < 20, "{:?}", g2.timings);
    // the cached continuation equals a fresh session's answer to the same conversation
    let mut fresh = Session::new(engine.clone(), &opts(512)).unwrap();
    let g2_fresh = fresh
        .generate(&turn2_prompt, &greedy(24), &mut nop())
        .unwrap();
    assert_eq!(g2.ids, g2_fresh.ids);
    // a conversation that does not extend the cached one is re-processed from the first
    // differing token
    s.reset();
    let g3 = s.chat("And 3 + 3?", &greedy(4), &mut nop()).unwrap();
    let mut other = Session::new(engine, &opts(512)).unwrap();
    let g3_fresh = other.chat("And 3 + 3?", &greedy(4), &mut nop()).unwrap();
    assert_eq!(g3.ids, g3_fresh.ids);
}

#[test]
fn seeded_sampling_is_reproducible_and_stop_strings_cut_the_text() {
    let Some(path) = model("seeded_sampling_is_reproducible_and_stop_strings_cut_the_text") else {
        return;
    };
    let engine = Arc::new(Engine::open(&path).unwrap());
    let prompt = engine.encode_prompt("Once upon a time");
    let sampled = |seed: u64| {
        let mut s = Session::new(engine.clone(), &opts(128)).unwrap();
        let o = GenOptions {
            max_tokens: 16,
            sampler: SamplerConfig {
                temperature: 1.0,
                top_k: 40,
                top_p: 0.95,
                seed,
                ..SamplerConfig::default()
            },
            stop_strings: vec![],
        };
        s.generate(&prompt, &o, &mut nop()).unwrap().ids
    };
    let a = sampled(7);
    assert_eq!(a, sampled(7), "same seed, same ids");
    let others: Vec<_> = (8..12).map(sampled).collect();
    assert!(others.iter().any(|o| *o != a), "other seeds give other ids");

    let mut s = Session::new(engine.clone(), &opts(128)).unwrap();
    let full = s.generate(&prompt, &greedy(24), &mut nop()).unwrap();
    assert_eq!(full.stop, StopReason::MaxTokens);
    assert_eq!(engine.decode(&full.ids, true), full.text);
    // stop at the second word of the greedy text
    let words: Vec<&str> = full.text.split_whitespace().collect();
    assert!(words.len() >= 3, "{:?}", full.text);
    let stop = words[1].to_string();
    let cut = full.text.find(&stop).unwrap();
    let mut streamed = String::new();
    let o = GenOptions {
        stop_strings: vec![stop.clone()],
        ..greedy(24)
    };
    let g = s
        .generate(&prompt, &o, &mut |_, p| {
            streamed.push_str(p);
            true
        })
        .unwrap();
    assert_eq!(g.stop, StopReason::StopString);
    assert_eq!(g.text, full.text[..cut], "stop string {stop:?}");
    assert_eq!(streamed, g.text);
    // the callback can cancel
    let mut n = 0;
    let g = s
        .generate(&prompt, &greedy(24), &mut |_, _| {
            n += 1;
            n < 3
        })
        .unwrap();
    assert_eq!(g.stop, StopReason::Cancelled);
    assert_eq!(g.ids, full.ids[..3]);
}

#[test]
fn bad_prompts_are_errors() {
    let Some(path) = model("bad_prompts_are_errors") else {
        return;
    };
    let engine = Arc::new(Engine::open(&path).unwrap());
    let mut s = Session::new(engine.clone(), &opts(16)).unwrap();
    let e = s.generate(&[], &greedy(4), &mut nop()).unwrap_err();
    assert!(e.to_string().contains("empty"), "{e}");
    let long = engine.encode_prompt(&"word ".repeat(40));
    let e = s.generate(&long, &greedy(4), &mut nop()).unwrap_err();
    assert!(e.to_string().contains("context"), "{e}");
    let e = s
        .generate(&[1, 999_999], &greedy(4), &mut nop())
        .unwrap_err();
    assert!(e.to_string().contains("out of range"), "{e}");
    // the session still works afterwards; the context fills up cleanly
    let g = s
        .generate(&engine.encode_prompt("Hello"), &greedy(100), &mut nop())
        .unwrap();
    assert_eq!(g.stop, StopReason::ContextFull);
    assert_eq!(s.cached().len(), 16);
    let bad = GenOptions {
        sampler: SamplerConfig {
            top_p: 0.0,
            ..SamplerConfig::default()
        },
        ..greedy(4)
    };
    assert!(s.generate(&[1, 2], &bad, &mut nop()).is_err());
    assert!(Engine::open("/nonexistent/model.fqm").is_err());
    // a context beyond the model's max_position_embeddings is refused, naming the field and
    // the limit; with ctx_override, settings beyond the machine are named errors, not aborts:
    // a KV cache of 10^11 tokens (petabytes), a size that overflows, absurd thread counts
    let max = engine.model().config.max_position_embeddings;
    let e = Session::new(engine.clone(), &opts(max + 1)).unwrap_err();
    assert!(
        e.to_string().contains("max_position_embeddings")
            && e.to_string().contains(&max.to_string()),
        "{e}"
    );
    let unlimited = Arc::new(
        Engine::open_with(
            &path,
            &ferroq::internals::engine::EngineOptions {
                ctx_override: true,
                ..Default::default()
            },
        )
        .unwrap(),
    );
    for ctx in [100_000_000_000, usize::MAX] {
        let e = Session::new(unlimited.clone(), &opts(ctx)).unwrap_err();
        assert!(
            e.to_string().contains("ctx") && e.to_string().contains("GiB"),
            "{e}"
        );
    }
    let e = Session::new(
        engine.clone(),
        &SessionOptions {
            threads: 100_000,
            ..opts(16)
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("threads"), "{e}");
}
