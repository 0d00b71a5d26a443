//! Added (special) tokens: found inside text before pre-tokenization, as HF's
//! `AddedVocabulary` does (leftmost-longest match, then the `single_word`, `lstrip` and
//! `rstrip` flags). Tokens with `normalized: false` are matched first on the raw text, the
//! others on what is left.

#[derive(Clone, Debug)]
pub(crate) struct AddedToken {
    pub(crate) content: String,
    pub(crate) id: u32,
    pub(crate) single_word: bool,
    pub(crate) lstrip: bool,
    pub(crate) rstrip: bool,
    pub(crate) normalized: bool,
}

const NONE: u32 = u32::MAX;

struct Node {
    children: Vec<(u8, u32)>,
    token: u32,
}

/// A byte trie over token contents, for leftmost-longest matching.
pub(crate) struct Trie {
    root: Box<[u32; 256]>,
    nodes: Vec<Node>,
}

impl Trie {
    pub(crate) fn new<'a>(tokens: impl Iterator<Item = (usize, &'a str)>) -> Trie {
        let mut t = Trie {
            root: Box::new([NONE; 256]),
            nodes: Vec::new(),
        };
        for (idx, s) in tokens {
            let b = s.as_bytes();
            if b.is_empty() {
                continue;
            }
            let mut node = t.root[b[0] as usize];
            if node == NONE {
                node = t.nodes.len() as u32;
                t.nodes.push(Node {
                    children: Vec::new(),
                    token: NONE,
                });
                t.root[b[0] as usize] = node;
            }
            for &c in &b[1..] {
                let next = match t.nodes[node as usize]
                    .children
                    .binary_search_by_key(&c, |x| x.0)
                {
                    Ok(i) => t.nodes[node as usize].children[i].1,
                    Err(i) => {
                        let n = t.nodes.len() as u32;
                        t.nodes.push(Node {
                            children: Vec::new(),
                            token: NONE,
                        });
                        t.nodes[node as usize].children.insert(i, (c, n));
                        n
                    }
                };
                node = next;
            }
            // A later duplicate overrides an earlier one.
            t.nodes[node as usize].token = idx as u32;
        }
        t
    }

    fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Longest token starting at `i`: (end, token index).
    #[inline]
    pub(crate) fn longest_at(&self, text: &[u8], i: usize) -> Option<(usize, usize)> {
        let mut node = self.root[text[i] as usize];
        if node == NONE {
            return None;
        }
        let mut best = None;
        let mut j = i + 1;
        loop {
            let n = &self.nodes[node as usize];
            if n.token != NONE {
                best = Some((j, n.token as usize));
            }
            if j >= text.len() {
                break;
            }
            match n.children.binary_search_by_key(&text[j], |x| x.0) {
                Ok(k) => node = n.children[k].1,
                Err(_) => break,
            }
            j += 1;
        }
        best
    }
}

pub(crate) struct AddedVocab {
    pub(crate) tokens: Vec<AddedToken>,
    raw: Trie,
    normalized: Trie,
}

/// A piece of input: plain text (byte range) or an added token.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Seg {
    Text(usize, usize),
    Token(u32),
}

fn is_word_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

impl AddedVocab {
    pub(crate) fn new(tokens: Vec<AddedToken>) -> AddedVocab {
        let raw = Trie::new(
            tokens
                .iter()
                .enumerate()
                .filter(|(_, t)| !t.normalized)
                .map(|(i, t)| (i, t.content.as_str())),
        );
        let normalized = Trie::new(
            tokens
                .iter()
                .enumerate()
                .filter(|(_, t)| t.normalized)
                .map(|(i, t)| (i, t.content.as_str())),
        );
        AddedVocab {
            tokens,
            raw,
            normalized,
        }
    }

    /// Split `text[range]` on the tokens of `trie`, appending segments to `out`.
    fn split_with(&self, trie: &Trie, text: &str, range: (usize, usize), out: &mut Vec<Seg>) {
        let (base, end) = range;
        let bytes = text.as_bytes();
        let mut start_offset = base;
        let mut i = base;
        while i < end {
            let Some((stop0, idx)) = trie.longest_at(&bytes[..end], i) else {
                i += 1;
                continue;
            };
            let tok = &self.tokens[idx];
            let (mut start, mut stop) = (i, stop0);
            if tok.single_word {
                let before_ok = text[base..start]
                    .chars()
                    .next_back()
                    .is_none_or(|c| !is_word_char(c));
                let after_ok = text[stop..end]
                    .chars()
                    .next()
                    .is_none_or(|c| !is_word_char(c));
                if !before_ok || !after_ok {
                    // Like HF's non-overlapping match iterator: resume after this match.
                    i = stop0;
                    continue;
                }
            }
            if tok.lstrip {
                let new_start = base + text[base..start].trim_end().len();
                start = new_start.max(start_offset);
            }
            if tok.rstrip {
                let rest = &text[stop..end];
                stop += rest.len() - rest.trim_start().len();
            }
            if start_offset < start {
                out.push(Seg::Text(start_offset, start));
            }
            out.push(Seg::Token(tok.id));
            start_offset = stop;
            i = stop;
        }
        if start_offset < end {
            out.push(Seg::Text(start_offset, end));
        }
    }

    /// Cut `text` into plain-text ranges and added tokens.
    pub(crate) fn split(&self, text: &str, out: &mut Vec<Seg>) {
        out.clear();
        if self.raw.is_empty() && self.normalized.is_empty() {
            if !text.is_empty() {
                out.push(Seg::Text(0, text.len()));
            }
            return;
        }
        if self.normalized.is_empty() {
            self.split_with(&self.raw, text, (0, text.len()), out);
            return;
        }
        let mut first = Vec::new();
        self.split_with(&self.raw, text, (0, text.len()), &mut first);
        for seg in first {
            match seg {
                Seg::Text(s, e) => self.split_with(&self.normalized, text, (s, e), out),
                t => out.push(t),
            }
        }
    }
}
