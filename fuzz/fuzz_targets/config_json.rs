//! `config.json` → `ModelConfig` (the converter's normalization), then the tensor table.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) else { return };
    if let Ok(cfg) = ferroq_convert::hf::model_config_from_hf(&v) {
        let _ = ferroq::internals::model::tensor_table(&cfg);
    }
});
