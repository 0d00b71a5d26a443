//! Chat templates: compile and render a short conversation (fuel and output caps apply).
#![no_main]
use ferroq::internals::chat::{ChatTemplate, Message};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(src) = std::str::from_utf8(data) else { return };
    let Ok(t) = ChatTemplate::new(src, Some("<s>".into()), Some("</s>".into())) else { return };
    let msgs = [
        Message::new("system", "be brief"),
        Message::new("user", "hi"),
        Message::new("assistant", "hello"),
    ];
    let _ = t.render(&msgs, true);
});
