//! The CLI's argument-to-engine path: session options, sampling settings, stop strings and a
//! prompt decoded from the input, run on a tiny model (FERROQ_FUZZ_MODEL, a `.fqm` with a
//! tokenizer; `tools/fuzz.sh` makes one from the test fixtures).
#![no_main]
use ferroq::internals::engine::{Engine, GenOptions, Session, SessionOptions};
use ferroq::internals::model::KvType;
use ferroq::internals::sampling::SamplerConfig;
use libfuzzer_sys::fuzz_target;
use std::sync::{Arc, OnceLock};

fn engine() -> &'static Arc<Engine> {
    static E: OnceLock<Arc<Engine>> = OnceLock::new();
    E.get_or_init(|| {
        let p = std::env::var("FERROQ_FUZZ_MODEL").expect("set FERROQ_FUZZ_MODEL to a tiny .fqm");
        Arc::new(Engine::open(p).expect("open FERROQ_FUZZ_MODEL"))
    })
}

struct Bytes<'a>(&'a [u8]);
impl Bytes<'_> {
    fn u64(&mut self) -> u64 {
        let n = self.0.len().min(8);
        let mut b = [0u8; 8];
        b[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        u64::from_le_bytes(b)
    }
    fn size(&mut self) -> usize {
        // small values mostly, sometimes huge
        let v = self.u64();
        if v & 1 == 0 { (v >> 1) as usize % 300 } else { (v >> 1) as usize }
    }
    fn f32(&mut self) -> f32 {
        f32::from_bits(self.u64() as u32)
    }
}

fuzz_target!(|data: &[u8]| {
    let mut b = Bytes(data);
    let opts = SessionOptions {
        ctx: b.size(),
        batch: b.size(),
        threads: b.size() % 600,
        kv: [None, Some(KvType::F32), Some(KvType::F16), Some(KvType::Q8), Some(KvType::Q4)][b.size() % 5],
    };
    let chat = b.u64() & 1 == 1;
    let g = GenOptions {
        max_tokens: b.size() % 64,
        sampler: SamplerConfig {
            temperature: b.f32(),
            top_k: b.size(),
            top_p: b.f32(),
            min_p: b.f32(),
            repetition_penalty: b.f32(),
            presence_penalty: b.f32(),
            frequency_penalty: b.f32(),
            penalty_last_n: b.size(),
            seed: b.u64(),
        },
        stop_strings: vec![String::from_utf8_lossy(&b.0[..b.0.len().min(4)]).into_owned()],
    };
    let prompt = String::from_utf8_lossy(b.0).into_owned();
    let Ok(mut s) = Session::new(Arc::clone(engine()), &opts) else { return };
    let mut on = |_: Option<u32>, _: &str| true;
    if chat {
        let _ = s.chat(&prompt, &g, &mut on);
    } else {
        let ids = engine().encode_prompt(&prompt);
        let _ = s.generate(&ids, &g, &mut on);
    }
});
