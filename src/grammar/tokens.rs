//! Token-level masks: which token ids may come next in a given recognizer state.
//!
//! [`TokenIndex`] is built once per tokenizer: a trie of the tokens' byte strings laid out in
//! preorder (each node knows where its subtree ends). A mask is one walk of that trie that
//! feeds each node's byte to the recognizer states of its parent and skips a whole subtree as
//! soon as no state survives, so tokens sharing a prefix share the work, and most of the
//! vocabulary is dismissed at its first byte outside strings. Masks are cached per state
//! ([`GrammarMatcher`]): inside a string without length limits, every token meets the same
//! state and only the first one walks.

use std::collections::HashMap;
use std::sync::Arc;

use super::matcher::{Arena, Frame};
use super::Grammar;
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};

/// Byte strings as a trie laid out in preorder.
#[derive(Debug, Default)]
struct Trie {
    /// Per node: its byte, its depth (1 = first byte), the index after its subtree, and where
    /// its tokens start in `toks` (`tok_start[i]..tok_start[i + 1]`).
    byte: Vec<u8>,
    depth: Vec<u16>,
    end: Vec<u32>,
    tok_start: Vec<u32>,
    toks: Vec<u32>,
    max_len: usize,
}

impl Trie {
    fn build(bytes: &[Box<[u8]>], mut ids: Vec<u32>) -> Trie {
        ids.sort_by(|&a, &b| bytes[a as usize].cmp(&bytes[b as usize]).then(a.cmp(&b)));
        let mut t = Trie {
            toks: Vec::with_capacity(ids.len()),
            ..Trie::default()
        };
        // path[d] = node index at depth d + 1 of the current token
        let mut path: Vec<u32> = Vec::new();
        let mut prev: &[u8] = &[];
        for &id in &ids {
            let s = &bytes[id as usize][..];
            let lcp = prev.iter().zip(s).take_while(|(a, b)| a == b).count();
            while path.len() > lcp {
                let n = path.pop().unwrap();
                t.end[n as usize] = t.byte.len() as u32;
            }
            for (d, &c) in s.iter().enumerate().skip(lcp) {
                path.push(t.byte.len() as u32);
                t.byte.push(c);
                t.depth.push(d as u16 + 1);
                t.end.push(0);
                t.tok_start.push(t.toks.len() as u32);
            }
            t.toks.push(id);
            t.max_len = t.max_len.max(s.len());
            prev = s;
        }
        for n in path {
            t.end[n as usize] = t.byte.len() as u32;
        }
        t.tok_start.push(t.toks.len() as u32);
        t
    }
}

/// Plain-string tokens are grouped by length up to this many characters.
const PLAIN_GROUPS: usize = 32;

/// The tokens of a vocabulary as a trie, for computing masks. Build it once per tokenizer
/// ([`crate::engine::Engine::token_index`] keeps one) and share it.
///
/// Tokens that are "plain string text" (printable ASCII other than `"` and `\`, or whole
/// UTF-8 characters) keep the state of an open string apart from its character count, so in
/// a string they are allowed in bulk (by length) and only the other tokens are walked.
#[derive(Debug)]
pub struct TokenIndex {
    vocab: usize,
    all: Trie,
    /// The tokens that are not plain string text.
    rest: Trie,
    /// `plain_le[n]`: mask of the plain tokens of at most `n` characters.
    plain_le: Vec<Vec<u64>>,
    /// Plain tokens longer than `PLAIN_GROUPS` characters: (characters, id).
    long_plain: Vec<(u32, u32)>,
    /// Ids that end generation (allowed only where the value is complete).
    stop: Vec<u32>,
    /// Byte strings by id (empty for ids never generated under a grammar).
    bytes: Vec<Box<[u8]>>,
}

/// Longest token the trie takes (longer ones are left out: no real vocabulary has them).
const MAX_TOKEN_BYTES: usize = 1024;

/// Characters of `b` if it is plain string text (see [`TokenIndex`]).
fn plain_chars(b: &[u8]) -> Option<u32> {
    let s = std::str::from_utf8(b).ok()?;
    if b.iter().any(|&c| c < 0x20 || c == b'"' || c == b'\\') {
        return None;
    }
    Some(s.chars().count() as u32)
}

impl TokenIndex {
    /// Index the tokens of `tok`. Special tokens and `stop_ids` are left out of the trie
    /// (a grammar never produces them); `stop_ids` are allowed where the value may end.
    pub fn new(tok: &Tokenizer, stop_ids: &[u32]) -> TokenIndex {
        let vocab = tok.vocab_size();
        let mut bytes: Vec<Box<[u8]>> = vec![Box::default(); vocab];
        for id in 0..vocab as u32 {
            if tok.is_special(id) || stop_ids.contains(&id) {
                continue;
            }
            if let Some(b) = tok.id_to_bytes(id) {
                if b.len() <= MAX_TOKEN_BYTES {
                    bytes[id as usize] = b.into();
                }
            }
        }
        Self::build(vocab, bytes, stop_ids)
    }

    /// An index over explicit byte strings (id = position), for tests and custom vocabularies.
    pub fn from_bytes(tokens: &[&[u8]], stop_ids: &[u32]) -> TokenIndex {
        let bytes = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| {
                if t.len() <= MAX_TOKEN_BYTES && !stop_ids.contains(&(i as u32)) {
                    (*t).into()
                } else {
                    Box::default()
                }
            })
            .collect();
        Self::build(tokens.len(), bytes, stop_ids)
    }

    fn build(vocab: usize, bytes: Vec<Box<[u8]>>, stop: &[u32]) -> TokenIndex {
        let words = vocab.div_ceil(64);
        let mut plain_le = vec![vec![0u64; words]; PLAIN_GROUPS + 1];
        let (mut all, mut rest, mut long_plain) = (Vec::new(), Vec::new(), Vec::new());
        for (id, b) in bytes.iter().enumerate() {
            if b.is_empty() {
                continue;
            }
            all.push(id as u32);
            match plain_chars(b) {
                Some(n) if (n as usize) <= PLAIN_GROUPS => {
                    for m in &mut plain_le[n as usize..] {
                        m[id / 64] |= 1 << (id % 64);
                    }
                }
                Some(n) => long_plain.push((n, id as u32)),
                None => rest.push(id as u32),
            }
        }
        TokenIndex {
            vocab,
            all: Trie::build(&bytes, all),
            rest: Trie::build(&bytes, rest),
            plain_le,
            long_plain,
            stop: stop
                .iter()
                .copied()
                .filter(|&s| (s as usize) < vocab)
                .collect(),
            bytes,
        }
    }

    /// Number of ids (the mask's length in bits).
    pub fn vocab(&self) -> usize {
        self.vocab
    }

    /// Nodes in the trie.
    pub fn nodes(&self) -> usize {
        self.all.byte.len()
    }

    /// The bytes a grammar sees for `id` (empty: never allowed by the grammar itself).
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        self.bytes.get(id as usize).map_or(&[], |b| &b[..])
    }

    pub fn stop_ids(&self) -> &[u32] {
        &self.stop
    }

    /// 64-bit words of a mask.
    pub fn mask_words(&self) -> usize {
        self.vocab.div_ceil(64)
    }
}

/// Working memory of one trie walk, kept between calls (no allocation once warm).
#[derive(Default, Debug, Clone)]
struct Walk {
    arena: Arena,
    heads: Vec<u32>,
    /// Per depth: the range of `heads` holding the states after that many bytes, and the
    /// arena length then.
    levels: Vec<(u32, u32, u32)>,
}

/// Masks cached per state (at most this many bytes of masks).
const CACHE_BYTES: usize = 16 << 20;

/// Constrained generation for one output: the recognizer state of the text so far, and the
/// token masks that keep it valid. Create one per generation (cheap); the [`Grammar`] and
/// the [`TokenIndex`] are shared.
#[derive(Debug)]
pub struct GrammarMatcher {
    grammar: Arc<Grammar>,
    index: Arc<TokenIndex>,
    /// The committed state, flattened (`Arena::store`).
    state: Vec<Frame>,
    walk: Walk,
    scratch: Vec<Frame>,
    /// State → slot in `masks` (each `words + 1` u64: the mask, then flags).
    cache: HashMap<Vec<Frame>, u32>,
    masks: Vec<u64>,
    slot_keys: Vec<Vec<Frame>>,
    next_slot: usize,
    max_slots: usize,
    cur: Option<u32>,
    /// Statistics: masks computed by a walk, and served from the cache.
    pub walks: u64,
    pub hits: u64,
}

const FLAG_ANY: u64 = 1;
const FLAG_END: u64 = 2;
const FLAG_DONE: u64 = 4;

impl GrammarMatcher {
    pub fn new(grammar: Arc<Grammar>, index: Arc<TokenIndex>) -> GrammarMatcher {
        let mut walk = Walk::default();
        let mut heads = Vec::new();
        walk.arena.clear();
        walk.arena.start_state(&grammar.graph, &mut heads);
        let mut state = Vec::new();
        walk.arena.store(&heads, &mut state);
        let words = index.mask_words() + 1;
        let max_slots = (CACHE_BYTES / 8 / words).clamp(4, 4096);
        GrammarMatcher {
            grammar,
            index,
            state,
            walk,
            scratch: Vec::new(),
            cache: HashMap::with_capacity(max_slots),
            masks: Vec::new(),
            slot_keys: Vec::new(),
            next_slot: 0,
            max_slots,
            cur: None,
            walks: 0,
            hits: 0,
        }
    }

    pub fn grammar(&self) -> &Arc<Grammar> {
        &self.grammar
    }

    pub fn index(&self) -> &Arc<TokenIndex> {
        &self.index
    }

    /// Forget the cached masks (they stay valid: for measuring the walk alone).
    pub fn clear_cache(&mut self) {
        self.cache.clear();
        self.slot_keys.clear();
        self.masks.clear();
        self.next_slot = 0;
        self.cur = None;
    }

    /// Back to the start (nothing generated).
    pub fn reset(&mut self) {
        let w = &mut self.walk;
        w.arena.clear();
        w.heads.clear();
        w.arena.start_state(&self.grammar.graph, &mut w.heads);
        w.arena.store(&w.heads, &mut self.state);
        self.cur = None;
    }

    /// Run `bytes` from the committed state; the surviving stacks are `walk.heads[from..]`.
    fn run(&mut self, bytes: &[u8]) -> Option<usize> {
        let g = &self.grammar;
        let w = &mut self.walk;
        w.arena.clear();
        w.heads.clear();
        w.arena.load(&self.state, &mut w.heads);
        let mut from = 0;
        for &c in bytes {
            let to = w.heads.len();
            for i in from..to {
                let h = w.heads[i];
                w.arena.step(&g.graph, &g.limits, h, c, &mut w.heads);
            }
            w.arena.dedup(&mut w.heads, to);
            if w.heads.len() == to {
                return None;
            }
            from = to;
        }
        Some(from)
    }

    /// Whether `bytes` would continue the text so far (the state does not change).
    pub fn allows_bytes(&mut self, bytes: &[u8]) -> bool {
        self.run(bytes).is_some()
    }

    /// Feed text bytes; `false` (and the state unchanged) when they break the grammar.
    pub fn accept_bytes(&mut self, bytes: &[u8]) -> bool {
        let Some(from) = self.run(bytes) else {
            return false;
        };
        let w = &self.walk;
        w.arena.store(&w.heads[from..], &mut self.scratch);
        std::mem::swap(&mut self.state, &mut self.scratch);
        self.cur = None;
        true
    }

    /// Advance by a sampled token. Stop ids are accepted where the value may end.
    pub fn accept_token(&mut self, id: u32) -> Result<()> {
        if self.index.stop.contains(&id) {
            if self.can_end() {
                return Ok(());
            }
        } else {
            let idx = Arc::clone(&self.index);
            let b = idx.token_bytes(id);
            if !b.is_empty() && self.accept_bytes(b) {
                return Ok(());
            }
        }
        Err(Error::Input(format!(
            "token {id} does not continue the structured output"
        )))
    }

    /// Whether the text so far is a complete value (generation may stop here).
    pub fn can_end(&mut self) -> bool {
        let s = self.slot();
        self.flags(s) & FLAG_END != 0
    }

    /// Whether the value is complete and takes no more text.
    pub fn is_done(&mut self) -> bool {
        let s = self.slot();
        self.flags(s) & FLAG_DONE != 0
    }

    /// Whether any token (stop ids included) may come next; `false` only at a dead end
    /// (nesting deeper than the limit) or when done and the model has no stop id.
    pub fn any_allowed(&mut self) -> bool {
        let s = self.slot();
        self.flags(s) & FLAG_ANY != 0
    }

    /// The ids that may come next, one bit each (bit `id % 64` of word `id / 64`): tokens
    /// whose bytes continue the value, and the stop ids where it may end.
    pub fn mask(&mut self) -> &[u64] {
        let s = self.slot() as usize;
        let words = self.index.mask_words();
        let w1 = words + 1;
        &self.masks[s * w1..s * w1 + words]
    }

    fn flags(&self, slot: u32) -> u64 {
        let w1 = self.index.mask_words() + 1;
        self.masks[slot as usize * w1 + w1 - 1]
    }

    /// The cache slot of the current state's mask, computed if needed.
    fn slot(&mut self) -> u32 {
        if let Some(s) = self.cur {
            return s;
        }
        if let Some(&s) = self.cache.get(&self.state) {
            self.hits += 1;
            self.cur = Some(s);
            return s;
        }
        let w1 = self.index.mask_words() + 1;
        let slot = if self.slot_keys.len() < self.max_slots {
            self.masks.resize(self.masks.len() + w1, 0);
            self.slot_keys.push(self.state.clone());
            self.slot_keys.len() - 1
        } else {
            // replace the oldest entry, reusing its key's buffer
            let s = self.next_slot;
            self.next_slot = (s + 1) % self.max_slots;
            let mut key = std::mem::take(&mut self.slot_keys[s]);
            self.cache.remove(&key);
            key.clear();
            key.extend_from_slice(&self.state);
            self.slot_keys[s] = key;
            s
        };
        let mask = &mut self.masks[slot * w1..(slot + 1) * w1];
        self.walks += 1;
        fill_mask(
            &self.grammar,
            &self.index,
            &self.state,
            &mut self.walk,
            mask,
        );
        self.cache.insert(self.slot_keys[slot].clone(), slot as u32);
        self.cur = Some(slot as u32);
        slot as u32
    }
}

/// Compute the mask of `state` into `out` (`words` mask words, then the flags word).
fn fill_mask(g: &Grammar, ix: &TokenIndex, state: &[Frame], w: &mut Walk, out: &mut [u64]) {
    out.fill(0);
    let words = out.len() - 1;
    let gr = &g.graph;
    w.arena.clear();
    w.heads.clear();
    w.arena.load(state, &mut w.heads);
    let mut flags = 0;
    if w.heads.iter().any(|&h| w.arena.can_end(gr, h)) {
        flags |= FLAG_END;
        for &s in &ix.stop {
            out[s as usize / 64] |= 1 << (s % 64);
            flags |= FLAG_ANY;
        }
    }
    if w.heads.iter().all(|&h| w.arena.is_done(h)) {
        flags |= FLAG_DONE;
        out[words] = flags;
        return;
    }
    // inside one open string: plain text tokens in bulk, the others walked
    let trie = match (w.heads.len(), w.heads.first()) {
        (1, Some(&h)) => match w.arena.string_room(gr, h) {
            Some(room) => {
                let groups = &ix.plain_le[(room.min(PLAIN_GROUPS as u32)) as usize];
                let mut any = 0;
                for (o, &m) in out[..words].iter_mut().zip(groups) {
                    *o |= m;
                    any |= m;
                }
                for &(n, id) in &ix.long_plain {
                    if n <= room {
                        out[id as usize / 64] |= 1 << (id % 64);
                        any |= 1;
                    }
                }
                if any != 0 {
                    flags |= FLAG_ANY;
                }
                &ix.rest
            }
            None => &ix.all,
        },
        _ => &ix.all,
    };
    flags |= walk_trie(g, trie, w, out);
    out[words] = flags;
}

/// Walk `t` from the states in `w.heads`, setting the bits of the tokens that survive.
/// Returns `FLAG_ANY` if any did.
fn walk_trie(g: &Grammar, t: &Trie, w: &mut Walk, out: &mut [u64]) -> u64 {
    let (gr, lim) = (&g.graph, &g.limits);
    let mut flags = 0;
    let base = w.heads.len() as u32;
    w.levels.clear();
    w.levels.resize(t.max_len + 1, (0, 0, 0));
    w.levels[0] = (0, base, w.arena.len() as u32);
    let n = t.byte.len();
    let mut i = 0;
    while i < n {
        let d = t.depth[i] as usize;
        let (ps, pe, al) = w.levels[d - 1];
        w.heads.truncate(pe as usize);
        w.arena.truncate(al as usize);
        let c = t.byte[i];
        for k in ps..pe {
            let h = w.heads[k as usize];
            w.arena.step(gr, lim, h, c, &mut w.heads);
        }
        if w.heads.len() == pe as usize {
            i = t.end[i] as usize;
            continue;
        }
        w.arena.dedup(&mut w.heads, pe as usize);
        w.levels[d] = (pe, w.heads.len() as u32, w.arena.len() as u32);
        let (t0, t1) = (t.tok_start[i] as usize, t.tok_start[i + 1] as usize);
        if t1 > t0 {
            flags |= FLAG_ANY;
            for &id in &t.toks[t0..t1] {
                out[id as usize / 64] |= 1 << (id % 64);
            }
        }
        i += 1;
    }
    flags
}
