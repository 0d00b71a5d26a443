//! GPT-2's byte-level alphabet: every byte is shown as one printable character
//! (`bytes_to_unicode` in the original code). Vocabulary strings in `tokenizer.json` use it.

/// The character that stands for each byte.
pub(crate) const fn byte_to_char_table() -> [char; 256] {
    let mut t = ['\0'; 256];
    let mut n = 0u32;
    let mut b = 0usize;
    while b < 256 {
        let printable = (b >= 0x21 && b <= 0x7e) || (b >= 0xa1 && b <= 0xac) || (b >= 0xae);
        t[b] = if printable {
            match char::from_u32(b as u32) {
                Some(c) => c,
                None => '\0',
            }
        } else {
            let c = match char::from_u32(256 + n) {
                Some(c) => c,
                None => '\0',
            };
            n += 1;
            c
        };
        b += 1;
    }
    t
}

pub(crate) static BYTE_TO_CHAR: [char; 256] = byte_to_char_table();

const fn char_to_byte_table() -> [i16; 324] {
    let mut t = [-1i16; 324];
    let mut b = 0usize;
    while b < 256 {
        t[BYTE_TO_CHAR[b] as usize] = b as i16;
        b += 1;
    }
    t
}

static CHAR_TO_BYTE: [i16; 324] = char_to_byte_table();

/// Inverse of [`BYTE_TO_CHAR`]: the byte a character stands for (the alphabet lies below U+0144).
#[inline]
pub(crate) fn char_to_byte(c: char) -> Option<u8> {
    match CHAR_TO_BYTE.get(c as usize) {
        Some(&v) if v >= 0 => Some(v as u8),
        _ => None,
    }
}

/// Byte-level string → raw bytes; `None` if a character is outside the alphabet.
pub(crate) fn decode_str(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len());
    for c in s.chars() {
        out.push(char_to_byte(c)?);
    }
    Some(out)
}

/// Raw bytes → byte-level string.
pub(crate) fn encode_bytes(b: &[u8]) -> String {
    b.iter().map(|&x| BYTE_TO_CHAR[x as usize]).collect()
}
