//! Pre-tokenization: cut text into pieces with the tokenizer's regexes before BPE.
//!
//! The patterns used by GPT-2-style byte-level BPE (GPT-2, Llama 3, Llama 4 / o200k) end with
//! `\s+(?!\S)|\s+`. The look-ahead needs a backtracking engine (`fancy-regex`), which is slow.
//! For these known patterns we compile the same regex with the tail replaced by `\s+` (no
//! look-ahead, so `fancy-regex` hands it to its fast DFA engine) and apply the look-ahead by
//! hand: a whitespace run of two or more characters produced by that last branch and followed
//! by a non-space gives back its last character. Any other pattern uses `fancy-regex` as is.
//! The unit tests check the fast path against the exact regex on the test corpora.

use crate::{Error, Result};

/// GPT-2's pattern (the `ByteLevel` pre-tokenizer with `use_regex: true`).
pub const GPT2_PATTERN: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
/// Llama 3 (cl100k-style) pattern.
pub const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Llama 4 / o200k pattern (spec §8).
pub const O200K_PATTERN: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";

const WS_TAIL: &str = r"|\s+(?!\S)|\s+";

#[derive(Clone, Copy, PartialEq, Debug)]
enum WsFix {
    /// The regex is used as is.
    Exact,
    /// Every all-whitespace match comes from the final `\s+` branch.
    AllWhitespace,
    /// All-whitespace matches without `\r`/`\n` come from the final branch (an earlier
    /// `\s*[\r\n]+` branch takes the others).
    NoNewline,
}

pub(crate) struct PieceRegex {
    re: fancy_regex::Regex,
    fix: WsFix,
}

fn regex_err(pattern: &str, e: fancy_regex::Error) -> Error {
    Error::config(
        "pre_tokenizer.pattern",
        format!("bad regex {pattern:?}: {e}"),
    )
}

impl PieceRegex {
    pub(crate) fn new(pattern: &str) -> Result<Self> {
        let fix = if pattern == GPT2_PATTERN {
            WsFix::AllWhitespace
        } else if pattern == LLAMA3_PATTERN || pattern == O200K_PATTERN {
            WsFix::NoNewline
        } else {
            WsFix::Exact
        };
        if fix != WsFix::Exact {
            let fast = format!(r"{}|\s+", &pattern[..pattern.len() - WS_TAIL.len()]);
            let re = fancy_regex::Regex::new(&fast).map_err(|e| regex_err(pattern, e))?;
            return Ok(PieceRegex { re, fix });
        }
        Self::exact(pattern)
    }

    /// The pattern compiled as is (look-ahead handled by `fancy-regex`).
    pub(crate) fn exact(pattern: &str) -> Result<Self> {
        let re = fancy_regex::Regex::new(pattern).map_err(|e| regex_err(pattern, e))?;
        Ok(PieceRegex {
            re,
            fix: WsFix::Exact,
        })
    }

    /// Call `f(start, end)` for each non-overlapping match, left to right.
    #[inline]
    pub(crate) fn for_each_match(&self, text: &str, mut f: impl FnMut(usize, usize)) {
        let mut pos = 0;
        while pos < text.len() {
            let m = match self.re.find_from_pos(text, pos) {
                Ok(Some(m)) => m,
                // No match, or the backtracking limit was hit: the rest is one gap.
                _ => break,
            };
            let (s, mut e) = (m.start(), m.end());
            if e == s {
                // Empty match: step over one character (as find_iter does).
                pos = e + text[e..].chars().next().map_or(1, |c| c.len_utf8());
                continue;
            }
            if self.fix != WsFix::Exact && e < text.len() {
                let piece = &text[s..e];
                let mut chars = piece.chars();
                let last = chars.next_back();
                if let Some(last) = last {
                    let multi = chars.next().is_some();
                    if multi
                        && piece.chars().all(char::is_whitespace)
                        && (self.fix == WsFix::AllWhitespace
                            || !piece.bytes().any(|b| b == b'\r' || b == b'\n'))
                    {
                        e -= last.len_utf8();
                    }
                }
            }
            f(s, e);
            pos = e;
        }
    }
}

/// HF `SplitDelimiterBehavior`.
#[derive(Clone, Copy, PartialEq, Debug)]
pub(crate) enum Behavior {
    Removed,
    Isolated,
    MergedWithPrevious,
    MergedWithNext,
    Contiguous,
}

impl Behavior {
    pub(crate) fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "Removed" => Behavior::Removed,
            "Isolated" => Behavior::Isolated,
            "MergedWithPrevious" => Behavior::MergedWithPrevious,
            "MergedWithNext" => Behavior::MergedWithNext,
            "Contiguous" => Behavior::Contiguous,
            _ => {
                return Err(Error::config(
                    "pre_tokenizer.behavior",
                    format!("unknown split behavior {s:?}"),
                ))
            }
        })
    }
}

pub(crate) struct SplitStep {
    pub(crate) re: PieceRegex,
    pub(crate) behavior: Behavior,
    pub(crate) invert: bool,
}

/// Reusable buffers for [`PreTokenizer::split`].
#[derive(Default)]
pub(crate) struct SplitScratch {
    marks: Vec<(usize, usize, bool)>,
    a: Vec<(usize, usize)>,
    b: Vec<(usize, usize)>,
}

pub(crate) struct PreTokenizer {
    pub(crate) steps: Vec<SplitStep>,
    /// ByteLevel `add_prefix_space`: a space is put before text that does not start with one.
    pub(crate) add_prefix_space: bool,
}

impl SplitStep {
    /// Split `text[range]`, appending the pieces (absolute offsets) to `out`.
    fn split_into(
        &self,
        text: &str,
        range: (usize, usize),
        marks: &mut Vec<(usize, usize, bool)>,
        out: &mut Vec<(usize, usize)>,
    ) {
        let (base, end) = range;
        let sub = &text[base..end];
        marks.clear();
        let mut last = 0;
        self.re.for_each_match(sub, |s, e| {
            if s > last {
                marks.push((base + last, base + s, false));
            }
            marks.push((base + s, base + e, true));
            last = e;
        });
        if last < sub.len() {
            marks.push((base + last, end, false));
        }
        if self.invert {
            for m in marks.iter_mut() {
                m.2 = !m.2;
            }
        }
        let start_len = out.len();
        match self.behavior {
            Behavior::Isolated => out.extend(marks.iter().map(|m| (m.0, m.1))),
            Behavior::Removed => out.extend(marks.iter().filter(|m| !m.2).map(|m| (m.0, m.1))),
            Behavior::MergedWithPrevious => {
                let mut prev_match = false;
                for &(s, e, is_match) in marks.iter() {
                    if is_match && !prev_match && out.len() > start_len {
                        if let Some(l) = out.last_mut() {
                            l.1 = e;
                        }
                    } else {
                        out.push((s, e));
                    }
                    prev_match = is_match;
                }
            }
            Behavior::MergedWithNext => {
                let mut prev_match = false;
                for &(s, e, is_match) in marks.iter().rev() {
                    if is_match && !prev_match && out.len() > start_len {
                        if let Some(l) = out.last_mut() {
                            l.0 = s;
                        }
                    } else {
                        out.push((s, e));
                    }
                    prev_match = is_match;
                }
                out[start_len..].reverse();
            }
            Behavior::Contiguous => {
                let mut prev_match = false;
                for &(s, e, is_match) in marks.iter() {
                    if is_match == prev_match && out.len() > start_len {
                        if let Some(l) = out.last_mut() {
                            l.1 = e;
                        }
                    } else {
                        out.push((s, e));
                    }
                    prev_match = is_match;
                }
            }
        }
    }
}

impl PreTokenizer {
    /// Call `f(start, end)` for each piece of `text`, in order (empty pieces are skipped).
    pub(crate) fn for_each_piece(
        &self,
        text: &str,
        scratch: &mut SplitScratch,
        mut f: impl FnMut(usize, usize),
    ) {
        if text.is_empty() {
            return;
        }
        match self.steps.as_slice() {
            [] => f(0, text.len()),
            [one] if one.behavior == Behavior::Isolated && !one.invert => {
                // Fast path: stream matches and gaps straight to the callback.
                let mut last = 0;
                one.re.for_each_match(text, |s, e| {
                    if s > last {
                        f(last, s);
                    }
                    f(s, e);
                    last = e;
                });
                if last < text.len() {
                    f(last, text.len());
                }
            }
            steps => {
                let SplitScratch { marks, a, b } = scratch;
                a.clear();
                a.push((0, text.len()));
                for step in steps {
                    b.clear();
                    for &r in a.iter() {
                        step.split_into(text, r, marks, b);
                    }
                    std::mem::swap(a, b);
                }
                for &(s, e) in a.iter() {
                    if e > s {
                        f(s, e);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pieces(re: &PieceRegex, text: &str) -> Vec<(usize, usize)> {
        let mut v = Vec::new();
        re.for_each_match(text, |s, e| v.push((s, e)));
        v
    }

    fn corpus_texts() -> Vec<String> {
        use std::io::Read;
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tokenizers");
        let mut out = Vec::new();
        let mut s = String::new();
        let f = std::fs::File::open(format!("{dir}/corpus.txt.gz")).unwrap();
        flate2::read::GzDecoder::new(f)
            .read_to_string(&mut s)
            .unwrap();
        out.push(s);
        for m in ["llama4", "llama3", "smollm2"] {
            let mut g = String::new();
            let f = std::fs::File::open(format!("{dir}/{m}/golden.jsonl.gz")).unwrap();
            flate2::read::GzDecoder::new(f)
                .read_to_string(&mut g)
                .unwrap();
            for line in g.lines() {
                let v: serde_json::Value = serde_json::from_str(line).unwrap();
                out.push(v["text"].as_str().unwrap().to_string());
            }
        }
        out.push("a  b   c\t\t d \u{3000}\u{3000}x \u{a0}\u{a0}y  \n  z   ".to_string());
        out.push(" \r\n  \r\n\t x\r\n\r\n  ".to_string());
        out
    }

    #[test]
    fn fast_path_equals_exact_regex() {
        let texts = corpus_texts();
        for pat in [GPT2_PATTERN, LLAMA3_PATTERN, O200K_PATTERN] {
            let fast = PieceRegex::new(pat).unwrap();
            assert_ne!(fast.fix, WsFix::Exact);
            let exact = PieceRegex::exact(pat).unwrap();
            for t in &texts {
                assert_eq!(
                    pieces(&fast, t),
                    pieces(&exact, t),
                    "pattern {pat} text {t:?}"
                );
            }
        }
    }
}
