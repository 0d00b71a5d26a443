//! `.fqm` reader, model open, checksum verification and a short forward pass.
#![no_main]
mod common;
use ferroq::internals::model::{KvType, Logits, Model, State};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let p = common::scratch("fqm", data);
    let Ok(model) = Model::open(&p) else { return };
    let _ = model.file.verify(&|_, _| {});
    let v = model.config.vocab_size as u32;
    if let Ok(mut st) = State::try_with_kv(&model, 8, 4, true, 1, KvType::F32) {
        let _ = model.forward(&mut st, &[0, 1 % v, 2 % v], Logits::All);
        let _ = model.forward(&mut st, &[0], Logits::Last);
    }
    let _ = ferroq::internals::engine::Engine::from_model(model);
});
