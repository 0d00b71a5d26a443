//! tiktoken `tokenizer.model` loading (Llama 4 original release), then encode/decode.
#![no_main]
use ferroq::internals::tokenizer::{Tokenizer, TokenizerKind};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(t) = Tokenizer::from_bytes(data, TokenizerKind::Tiktoken) {
        let ids = t.encode("Hello wörld <|begin_of_text|> 123", true);
        let _ = t.decode(&ids, false);
    }
});
