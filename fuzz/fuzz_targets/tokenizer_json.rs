//! `tokenizer.json` loading, then encoding and decoding a fixed text.
#![no_main]
use ferroq::internals::tokenizer::{Tokenizer, TokenizerKind};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(t) = Tokenizer::from_bytes(data, TokenizerKind::HfJson) {
        let ids = t.encode("Hello wörld <|begin_of_text|> 123 \u{1F600}", true);
        let _ = t.decode(&ids, false);
    }
});
