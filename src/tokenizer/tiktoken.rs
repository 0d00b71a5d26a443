//! Loading Meta's tiktoken-format `tokenizer.model` (Llama 4): one `base64(token) rank` per
//! line, then Meta's 2,048 special tokens at ids 200000.. (spec §8). The merge table is derived
//! from the vocabulary exactly as HF's `TikTokenConverter` does, so both files encode the same.

use super::added::AddedToken;
use super::bpe::Bpe;
use super::bytelevel;
use super::hash::fx_map;
use super::pretok::{Behavior, PieceRegex, PreTokenizer, SplitStep, O200K_PATTERN};
use super::{Parts, Tokenizer};
use crate::{Error, Result};

const FILE: &str = "tokenizer.model";
/// Size of the Llama 4 base vocabulary.
pub const LLAMA4_BASE: usize = 200_000;
/// Number of Llama 4 special tokens.
pub const LLAMA4_NUM_SPECIAL: usize = 2048;

fn err(msg: impl Into<String>) -> Error {
    Error::format(FILE, msg)
}

fn b64_val(c: u8) -> Option<u32> {
    Some(match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => return None,
    } as u32)
}

/// Standard base64 with optional `=` padding.
pub(crate) fn base64_decode(s: &[u8]) -> Option<Vec<u8>> {
    let s = match s.iter().position(|&c| c == b'=') {
        Some(p) => {
            if s[p..].iter().any(|&c| c != b'=') || !s.len().is_multiple_of(4) {
                return None;
            }
            &s[..p]
        }
        None => s,
    };
    if s.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    for chunk in s.chunks(4) {
        let mut acc = 0u32;
        for &c in chunk {
            acc = (acc << 6) | b64_val(c)?;
        }
        match chunk.len() {
            4 => out.extend_from_slice(&[(acc >> 16) as u8, (acc >> 8) as u8, acc as u8]),
            3 => out.extend_from_slice(&[(acc >> 10) as u8, (acc >> 2) as u8]),
            2 => out.push((acc >> 4) as u8),
            _ => return None,
        }
    }
    Some(out)
}

/// Meta's Llama 4 special tokens, in id order from 200000 (llama_models/llama4/tokenizer.py).
pub fn llama4_special_tokens() -> Vec<String> {
    let mut v: Vec<String> = [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|fim_prefix|>",
        "<|fim_middle|>",
        "<|fim_suffix|>",
        // TEXT_POST_TRAIN
        "<|header_start|>",
        "<|header_end|>",
        "<|eom|>",
        "<|eot|>",
        "<|step|>",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for i in 0..6 {
        v.push(format!("<|text_post_train_reserved_special_token_{i}|>"));
    }
    for s in [
        "<|python_start|>",
        "<|python_end|>",
        "<|finetune_right_pad|>",
    ] {
        v.push(s.to_string());
    }
    for i in 8..8 + 61 {
        v.push(format!("<|text_post_train_reserved_special_token_{i}|>"));
    }
    // VISION
    for s in [
        "<|image_start|>",
        "<|image_end|>",
        "<|vision_reserved_special_token_0|>",
        "<|vision_reserved_special_token_1|>",
        "<|tile_x_separator|>",
        "<|tile_y_separator|>",
        "<|vision_reserved_special_token_2|>",
        "<|vision_reserved_special_token_3|>",
        "<|vision_reserved_special_token_4|>",
        "<|vision_reserved_special_token_5|>",
        "<|image|>",
        "<|vision_reserved_special_token_6|>",
        "<|patch|>",
    ] {
        v.push(s.to_string());
    }
    for i in 7..7 + 1041 {
        v.push(format!("<|vision_reserved_special_token_{i}|>"));
    }
    // REASONING
    for i in 0..8 {
        v.push(format!("<|reasoning_reserved_special_token_{i}|>"));
    }
    v.push("<|reasoning_thinking_start|>".to_string());
    v.push("<|reasoning_thinking_end|>".to_string());
    let n = v.len();
    for i in 0..LLAMA4_NUM_SPECIAL - n {
        v.push(format!("<|reserved_special_token_{i}|>"));
    }
    v
}

pub(crate) fn load(bytes: &[u8]) -> Result<Tokenizer> {
    let mut by_rank: Vec<Option<Vec<u8>>> = Vec::new();
    let mut vocab = fx_map(LLAMA4_BASE);
    for (lineno, line) in bytes.split(|&b| b == b'\n').enumerate() {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            continue;
        }
        let mut it = line.split(|&b| b == b' ');
        let (Some(tok), Some(rank), None) = (it.next(), it.next(), it.next()) else {
            return Err(err(format!("line {}: expected `base64 rank`", lineno + 1)));
        };
        let tok = base64_decode(tok)
            .ok_or_else(|| err(format!("line {}: invalid base64", lineno + 1)))?;
        let rank: usize = std::str::from_utf8(rank)
            .ok()
            .and_then(|r| r.parse().ok())
            .filter(|&r| r < (1 << 24))
            .ok_or_else(|| err(format!("line {}: invalid rank", lineno + 1)))?;
        if tok.is_empty() {
            return Err(err(format!("line {}: empty token", lineno + 1)));
        }
        if by_rank.len() <= rank {
            by_rank.resize(rank + 1, None);
        }
        if by_rank[rank].is_some() || vocab.contains_key(&tok[..]) {
            return Err(err(format!(
                "line {}: duplicate token or rank {rank}",
                lineno + 1
            )));
        }
        vocab.insert(tok.clone().into_boxed_slice(), rank as u32);
        by_rank[rank] = Some(tok);
    }
    if by_rank.len() != LLAMA4_BASE || by_rank.iter().any(Option::is_none) {
        return Err(err(format!(
            "expected the Llama 4 vocabulary (ranks 0..{LLAMA4_BASE} without gaps), found {} ranks",
            by_rank.len()
        )));
    }
    // Merges as TikTokenConverter builds them: every split of a token into two tokens, ordered
    // by the merged token's rank, then by the ranks of the two halves.
    let mut triples: Vec<(u32, u32, u32)> = Vec::new();
    for (rank, tok) in by_rank.iter().enumerate() {
        let Some(tok) = tok else { continue };
        for k in 1..tok.len() {
            if let Some(&l) = vocab.get(&tok[..k]) {
                if let Some(&r) = vocab.get(&tok[k..]) {
                    triples.push((rank as u32, l, r));
                }
            }
        }
    }
    triples.sort_unstable();
    let mut merges = fx_map(triples.len());
    for (i, &(new, l, r)) in triples.iter().enumerate() {
        merges.insert(((l as u64) << 32) | r as u64, (i as u32, new));
    }
    let mut byte_ids = [None; 256];
    for (b, slot) in byte_ids.iter_mut().enumerate() {
        *slot = vocab.get(&[b as u8][..]).copied();
    }
    let specials = llama4_special_tokens();
    let n = LLAMA4_BASE + specials.len();
    let mut parts = Parts::new(n);
    for (rank, tok) in by_rank.into_iter().enumerate() {
        if let Some(tok) = tok {
            let s = bytelevel::encode_bytes(&tok);
            parts.set(rank as u32, &s, tok, false);
        }
    }
    let mut added = Vec::with_capacity(specials.len());
    for (i, s) in specials.into_iter().enumerate() {
        let id = (LLAMA4_BASE + i) as u32;
        parts.set(id, &s, s.as_bytes().to_vec(), true);
        added.push(AddedToken {
            content: s,
            id,
            single_word: false,
            lstrip: false,
            rstrip: false,
            normalized: false,
        });
    }
    let bpe = Bpe {
        vocab,
        byte_ids,
        merges,
        ignore_merges: true,
        unk_id: None,
    };
    let pretok = PreTokenizer {
        steps: vec![SplitStep {
            re: PieceRegex::new(O200K_PATTERN)?,
            behavior: Behavior::Isolated,
            invert: false,
        }],
        add_prefix_space: false,
    };
    Ok(parts.finish(
        super::Core::ByteLevel {
            bpe: Box::new(bpe),
            pretok,
        },
        added,
        Some(LLAMA4_BASE as u32),
        0,
    ))
}
