//! GGUF reader and its conversion to a checkpoint (config, tokenizer.json, tensors).
#![no_main]
use ferroq_convert::source::TensorSource;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(f) = ferroq_convert::gguf::GgufFile::from_bytes("fuzz.gguf", data.to_vec()) else {
        return;
    };
    let Ok(ck) = ferroq_convert::gguf::checkpoint(f) else { return };
    let _ = ferroq_convert::hf::model_config_from_hf(&ck.config);
    if let Some(t) = &ck.tokenizer_json {
        let _ = ferroq::internals::tokenizer::Tokenizer::from_bytes(t, ferroq::internals::tokenizer::TokenizerKind::HfJson);
    }
    let mut out = Vec::new();
    for t in ck.source.tensors().to_vec() {
        if t.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).is_none_or(|n| n > 1 << 24) {
            continue;
        }
        let _ = ck.source.read_f32(&t.name, &mut out);
    }
});
