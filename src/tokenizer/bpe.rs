//! Byte-pair merging over raw bytes.
//!
//! The algorithm is the one of Hugging Face `tokenizers` (`Word::merge_all`): start from one
//! symbol per byte, then repeatedly merge the adjacent pair with the lowest merge rank, the
//! leftmost one on ties. Short words use a linear scan over a rank array; long words use a
//! binary heap over a linked list, so long inputs stay O(n log n).

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use super::hash::FxMap;

/// Words up to this many bytes use the simple scan; longer ones the heap.
const SCAN_MAX: usize = 48;

pub(crate) struct Bpe {
    /// Raw token bytes → id (model vocabulary only, not added tokens).
    pub(crate) vocab: FxMap<Box<[u8]>, u32>,
    /// Id of each single-byte token.
    pub(crate) byte_ids: [Option<u32>; 256],
    /// (left id, right id) packed as `left << 32 | right` → (rank, merged id).
    pub(crate) merges: FxMap<u64, (u32, u32)>,
    /// If the whole word is a token, emit it without merging.
    pub(crate) ignore_merges: bool,
    /// Id emitted for bytes that have no token (None: dropped, as HF does without `unk_token`).
    pub(crate) unk_id: Option<u32>,
}

/// Reusable buffers so that encoding a word does not allocate.
#[derive(Default)]
pub(crate) struct Scratch {
    pub(crate) ids: Vec<u32>,
    ranks: Vec<u32>,
    syms: Vec<Sym>,
    heap: BinaryHeap<Reverse<(u32, u32, u32)>>,
}

#[derive(Clone, Copy)]
struct Sym {
    id: u32,
    prev: u32,
    next: u32,
    alive: bool,
}

const NONE: u32 = u32::MAX;

#[inline]
fn key(a: u32, b: u32) -> u64 {
    ((a as u64) << 32) | b as u64
}

impl Bpe {
    #[inline]
    fn merge_of(&self, a: u32, b: u32) -> Option<(u32, u32)> {
        self.merges.get(&key(a, b)).copied()
    }

    /// Encode one pre-tokenized piece, appending its ids to `out`.
    pub(crate) fn encode_piece(&self, piece: &[u8], out: &mut Vec<u32>, s: &mut Scratch) {
        if piece.is_empty() {
            return;
        }
        if piece.len() == 1 {
            if let Some(id) = self.byte_ids[piece[0] as usize].or(self.unk_id) {
                out.push(id);
            }
            return;
        }
        if self.ignore_merges {
            if let Some(&id) = self.vocab.get(piece) {
                out.push(id);
                return;
            }
        }
        s.ids.clear();
        for &b in piece {
            if let Some(id) = self.byte_ids[b as usize].or(self.unk_id) {
                s.ids.push(id);
            }
        }
        if s.ids.len() <= SCAN_MAX {
            self.merge_scan(s);
            out.extend_from_slice(&s.ids);
        } else {
            self.merge_heap(s, out);
        }
    }

    /// Merge the symbols already in `s.ids` (SentencePiece-style models start from
    /// characters, not bytes), appending the result to `out`.
    pub(crate) fn merge_ids(&self, s: &mut Scratch, out: &mut Vec<u32>) {
        if s.ids.len() <= SCAN_MAX {
            self.merge_scan(s);
            out.extend_from_slice(&s.ids);
        } else {
            self.merge_heap(s, out);
        }
    }

    fn merge_scan(&self, s: &mut Scratch) {
        let ids = &mut s.ids;
        let ranks = &mut s.ranks;
        ranks.clear();
        if ids.len() < 2 {
            return;
        }
        // ranks[i] = rank of the pair (ids[i], ids[i+1]); the merged id is looked up again on use.
        for w in ids.windows(2) {
            ranks.push(self.merge_of(w[0], w[1]).map_or(u32::MAX, |m| m.0));
        }
        loop {
            let mut best = u32::MAX;
            let mut at = 0;
            for (i, &r) in ranks.iter().enumerate() {
                if r < best {
                    best = r;
                    at = i;
                }
            }
            if best == u32::MAX {
                break;
            }
            let new_id = match self.merge_of(ids[at], ids[at + 1]) {
                Some(m) => m.1,
                None => break, // unreachable: the rank came from this table
            };
            ids[at] = new_id;
            ids.remove(at + 1);
            ranks.remove(at);
            if at + 1 < ids.len() {
                ranks[at] = self
                    .merge_of(ids[at], ids[at + 1])
                    .map_or(u32::MAX, |m| m.0);
            }
            if at > 0 {
                ranks[at - 1] = self
                    .merge_of(ids[at - 1], ids[at])
                    .map_or(u32::MAX, |m| m.0);
            }
        }
    }

    fn merge_heap(&self, s: &mut Scratch, out: &mut Vec<u32>) {
        let n = s.ids.len();
        if n == 0 {
            return;
        }
        s.syms.clear();
        s.heap.clear();
        for (i, &id) in s.ids.iter().enumerate() {
            s.syms.push(Sym {
                id,
                prev: if i == 0 { NONE } else { i as u32 - 1 },
                next: if i + 1 == n { NONE } else { i as u32 + 1 },
                alive: true,
            });
        }
        for i in 0..n.saturating_sub(1) {
            if let Some((rank, new_id)) = self.merge_of(s.ids[i], s.ids[i + 1]) {
                s.heap.push(Reverse((rank, i as u32, new_id)));
            }
        }
        while let Some(Reverse((rank, pos, new_id))) = s.heap.pop() {
            let p = pos as usize;
            if !s.syms[p].alive || s.syms[p].next == NONE {
                continue;
            }
            let q = s.syms[p].next as usize;
            match self.merge_of(s.syms[p].id, s.syms[q].id) {
                Some((r, id)) if r == rank && id == new_id => {}
                _ => continue, // stale entry
            }
            s.syms[p].id = new_id;
            s.syms[q].alive = false;
            let nn = s.syms[q].next;
            s.syms[p].next = nn;
            if nn != NONE {
                s.syms[nn as usize].prev = pos;
                if let Some((r, id)) = self.merge_of(new_id, s.syms[nn as usize].id) {
                    s.heap.push(Reverse((r, pos, id)));
                }
            }
            let pp = s.syms[p].prev;
            if pp != NONE {
                if let Some((r, id)) = self.merge_of(s.syms[pp as usize].id, new_id) {
                    s.heap.push(Reverse((r, pp, id)));
                }
            }
        }
        let mut i = 0u32;
        while i != NONE {
            let sym = s.syms[i as usize];
            out.push(sym.id);
            i = sym.next;
        }
    }

    /// Test hook: force one of the two merge strategies.
    #[cfg(test)]
    pub(crate) fn encode_forced(&self, piece: &[u8], heap: bool) -> Vec<u32> {
        let mut s = Scratch::default();
        let mut out = Vec::new();
        for &b in piece {
            if let Some(id) = self.byte_ids[b as usize].or(self.unk_id) {
                s.ids.push(id);
            }
        }
        if heap {
            self.merge_heap(&mut s, &mut out);
        } else {
            self.merge_scan(&mut s);
            out.extend_from_slice(&s.ids);
        }
        out
    }
}
