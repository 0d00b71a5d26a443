//! safetensors reader (converter input): open, then read every tensor.
#![no_main]
mod common;
use ferroq_convert::safetensors::SafetensorsSource;
use ferroq_convert::source::TensorSource;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let p = common::scratch("safetensors", data);
    let Ok(s) = SafetensorsSource::open_file(&p) else { return };
    let mut out = Vec::new();
    for t in s.tensors().to_vec() {
        // skip tensors too large to materialise (the reader checks sizes; the harness
        // need not allocate gigabytes per input)
        if t.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).is_none_or(|n| n > 1 << 24) {
            continue;
        }
        let _ = s.read_f32(&t.name, &mut out);
        let _ = s.read_f32_outer(&t.name, 0, &mut out);
    }
});
