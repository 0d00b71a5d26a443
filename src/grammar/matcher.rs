//! A byte-level pushdown recognizer for the compiled graph.
//!
//! A state is a small set of stacks (more than one only while the alternatives of a union are
//! still undecided). Stacks live in an arena as linked frames that are never modified, so a
//! state is a few indices and stepping a byte only appends frames: the token-mask walk
//! (`tokens.rs`) branches and backtracks by truncating the arena.

use super::schema::{Graph, Node, UNBOUNDED};

/// The empty stack: a complete top-level value.
pub(crate) const EMPTY: u32 = u32::MAX;
/// Most stacks a state keeps (union alternatives still open); more are dropped, which only
/// narrows what may be generated.
const MAX_STACKS: usize = 32;

/// The state of one open value. `st` and the counters mean different things per node kind
/// (see `step`); unused fields stay 0 so that equal states compare (and hash) equal.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub(crate) struct Frame {
    pub node: u32,
    pub st: u8,
    /// Whitespace bytes in the current run.
    pub ws: u8,
    /// Strings: UTF-8 / `\u` sub-state.
    pub x: u8,
    /// Strings: characters; arrays: items; literals and keys: bytes matched.
    pub a: u32,
    /// Literals: first candidate; objects: property being matched or filled.
    pub b: u32,
    /// Objects: first property that may come next.
    pub c: u32,
}

/// The separator of stacks in a flattened state (never a real node).
pub(crate) const SEP: Frame = Frame {
    node: u32::MAX,
    st: 0,
    ws: 0,
    x: 0,
    a: 0,
    b: 0,
    c: 0,
};

#[derive(Clone, Copy, Debug)]
pub(crate) struct Link {
    pub f: Frame,
    pub parent: u32,
    /// Frames in the stack (this one included).
    pub depth: u32,
}

/// Limits of the recognizer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Limits {
    /// Whitespace bytes allowed in a row (between tokens of objects and arrays).
    pub max_ws: u8,
    /// Deepest nesting of objects and arrays.
    pub max_depth: u32,
}

// number states
const N_START: u8 = 0;
const N_MINUS: u8 = 1;
const N_ZERO: u8 = 2;
const N_INT: u8 = 3;
const N_DOT: u8 = 4;
const N_FRAC: u8 = 5;
const N_E: u8 = 6;
const N_ESIGN: u8 = 7;
const N_EXP: u8 = 8;
const MAX_INT_DIGITS: u32 = 20;
const MAX_FRAC_DIGITS: u32 = 20;
const MAX_EXP_DIGITS: u32 = 3;

fn number_final(st: u8) -> bool {
    matches!(st, N_ZERO | N_INT | N_FRAC | N_EXP)
}

fn is_ws(c: u8) -> bool {
    matches!(c, b' ' | b'\n' | b'\t' | b'\r')
}

/// The recognizer's working memory: the arena of frames. Reused between calls.
#[derive(Default, Clone, Debug)]
pub(crate) struct Arena {
    pub links: Vec<Link>,
}

impl Arena {
    pub fn clear(&mut self) {
        self.links.clear();
    }

    pub fn len(&self) -> usize {
        self.links.len()
    }

    pub fn truncate(&mut self, n: usize) {
        self.links.truncate(n);
    }

    fn depth(&self, h: u32) -> u32 {
        if h == EMPTY {
            0
        } else {
            self.links[h as usize].depth
        }
    }

    fn push(&mut self, parent: u32, f: Frame) -> u32 {
        let depth = self.depth(parent) + 1;
        self.links.push(Link { f, parent, depth });
        (self.links.len() - 1) as u32
    }

    /// The state before any byte: the root value not started (one stack per alternative).
    pub fn start_state(&mut self, g: &Graph, heads: &mut Vec<u32>) {
        let mut one = |node: u32, heads: &mut Vec<u32>| {
            heads.push(self.push(
                EMPTY,
                Frame {
                    node,
                    ..Frame::default()
                },
            ))
        };
        match &g.nodes[g.root as usize] {
            Node::Union(alts) => {
                for &a in alts {
                    one(a, heads);
                }
            }
            _ => one(g.root, heads),
        }
    }

    /// Load a flattened state (stacks bottom to top, each ended by [`SEP`]); the heads go
    /// to `heads`.
    pub fn load(&mut self, state: &[Frame], heads: &mut Vec<u32>) {
        let mut h = EMPTY;
        for f in state {
            if *f == SEP {
                heads.push(h);
                h = EMPTY;
            } else {
                h = self.push(h, *f);
            }
        }
    }

    /// Flatten the stacks of `heads` into `out` (the inverse of [`Arena::load`]).
    pub fn store(&self, heads: &[u32], out: &mut Vec<Frame>) {
        out.clear();
        for &h in heads {
            let start = out.len();
            let mut x = h;
            while x != EMPTY {
                let l = &self.links[x as usize];
                out.push(l.f);
                x = l.parent;
            }
            out[start..].reverse();
            out.push(SEP);
        }
    }

    fn same(&self, mut a: u32, mut b: u32) -> bool {
        loop {
            if a == b {
                return true;
            }
            if a == EMPTY || b == EMPTY {
                return false;
            }
            let (la, lb) = (&self.links[a as usize], &self.links[b as usize]);
            if la.f != lb.f || la.depth != lb.depth {
                return false;
            }
            a = la.parent;
            b = lb.parent;
        }
    }

    /// Drop repeated stacks of `heads[from..]` (and cap their number).
    pub fn dedup(&self, heads: &mut Vec<u32>, from: usize) {
        if heads.len() - from < 2 {
            return;
        }
        let mut w = from;
        for r in from..heads.len() {
            let h = heads[r];
            if !(from..w).any(|j| self.same(heads[j], h)) && w - from < MAX_STACKS {
                heads[w] = h;
                w += 1;
            }
        }
        heads.truncate(w);
    }

    /// Whether the value of stack `h` may end here (end of generation allowed).
    pub fn can_end(&self, g: &Graph, h: u32) -> bool {
        if h == EMPTY {
            return true;
        }
        let l = &self.links[h as usize];
        if l.parent != EMPTY {
            return false;
        }
        match &g.nodes[l.f.node as usize] {
            Node::Number { .. } => number_final(l.f.st),
            Node::Literals(lits) => l.f.a > 0 && lits[l.f.b as usize].len() == l.f.a as usize,
            _ => false,
        }
    }

    /// If the top of stack `h` is the body of a string (not inside an escape or a UTF-8
    /// sequence), how many more characters it takes (`u32::MAX`: no limit). Plain text
    /// (see `tokens.rs`) only counts characters there.
    pub fn string_room(&self, g: &Graph, h: u32) -> Option<u32> {
        if h == EMPTY {
            return None;
        }
        let f = &self.links[h as usize].f;
        match &g.nodes[f.node as usize] {
            Node::String { max, .. } if f.st == 1 && f.x == 0 => Some(if *max == UNBOUNDED {
                u32::MAX
            } else {
                max.saturating_sub(f.a)
            }),
            _ => None,
        }
    }

    /// Whether stack `h` is complete and takes no more bytes.
    pub fn is_done(&self, h: u32) -> bool {
        h == EMPTY
    }

    /// Feed byte `c` to stack `h`; the resulting stacks are appended to `out`.
    // one arm per state of each node kind, each checking its bytes, reads as the automaton
    #[allow(clippy::collapsible_match)]
    pub fn step(&mut self, g: &Graph, lim: &Limits, h: u32, c: u8, out: &mut Vec<u32>) {
        if h == EMPTY {
            return;
        }
        let Link { f, parent, depth } = self.links[h as usize];
        let with = |st: u8| Frame { st, ws: 0, ..f };
        let ws_ok = is_ws(c) && f.ws < lim.max_ws;
        let more_ws = Frame {
            ws: f.ws.saturating_add(1),
            ..f
        };
        match &g.nodes[f.node as usize] {
            Node::Union(_) => unreachable!("unions are never on a stack"),
            Node::String { min, max } => {
                let (min, max) = (*min, *max);
                let bump = |a: u32| {
                    if max == UNBOUNDED {
                        (a + 1).min(min)
                    } else {
                        a + 1
                    }
                };
                match f.st {
                    0 => {
                        if c == b'"' {
                            out.push(self.push(parent, with(1)));
                        }
                    }
                    1 => {
                        if f.x != 0 {
                            let (lo, hi, next) = match f.x {
                                1 => (0x80, 0xBF, 0),
                                2 => (0x80, 0xBF, 1),
                                3 => (0x80, 0xBF, 2),
                                4 => (0xA0, 0xBF, 1),
                                5 => (0x80, 0x9F, 1),
                                6 => (0x90, 0xBF, 2),
                                _ => (0x80, 0x8F, 2),
                            };
                            if (lo..=hi).contains(&c) {
                                out.push(self.push(parent, Frame { x: next, ..f }));
                            }
                            return;
                        }
                        let full = f.a >= max;
                        match c {
                            b'"' => {
                                if f.a >= min {
                                    self.done(g, parent, out);
                                }
                            }
                            b'\\' if !full => {
                                out.push(self.push(parent, Frame { st: 2, ..f }));
                            }
                            0..=0x1F => {}
                            0x20..=0x7F if !full => {
                                out.push(self.push(parent, Frame { a: bump(f.a), ..f }));
                            }
                            0xC2..=0xF4 if !full => {
                                let x = match c {
                                    0xC2..=0xDF => 1,
                                    0xE0 => 4,
                                    0xED => 5,
                                    0xE1..=0xEF => 2,
                                    0xF0 => 6,
                                    0xF4 => 7,
                                    _ => 3,
                                };
                                out.push(self.push(
                                    parent,
                                    Frame {
                                        a: bump(f.a),
                                        x,
                                        ..f
                                    },
                                ));
                            }
                            _ => {}
                        }
                    }
                    2 => {
                        // after a backslash
                        let a = bump(f.a);
                        match c {
                            b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => {
                                out.push(self.push(parent, Frame { st: 1, a, ..f }));
                            }
                            b'u' => out.push(self.push(
                                parent,
                                Frame {
                                    st: 3,
                                    a,
                                    x: 0,
                                    ..f
                                },
                            )),
                            _ => {}
                        }
                    }
                    _ => {
                        // \uXXXX: x = digits read (low 2 bits) | 4 when the first was 'd'
                        if !c.is_ascii_hexdigit() {
                            return;
                        }
                        let n = f.x & 3;
                        let lower = c.to_ascii_lowercase();
                        if n == 1 && f.x & 4 != 0 && matches!(lower, b'8'..=b'9' | b'a'..=b'f') {
                            // \uD800-\uDFFF: surrogates (one alone is not a character)
                            return;
                        }
                        if n == 3 {
                            out.push(self.push(parent, Frame { st: 1, x: 0, ..f }));
                        } else {
                            let d = if n == 0 && lower == b'd' { 4 } else { f.x & 4 };
                            out.push(self.push(
                                parent,
                                Frame {
                                    x: (n + 1) | d,
                                    ..f
                                },
                            ));
                        }
                    }
                }
            }
            Node::Number { integer } => {
                let digit = c.is_ascii_digit();
                let next = match (f.st, c) {
                    (N_START, b'-') => Some((N_MINUS, 0)),
                    (N_START | N_MINUS, b'0') => Some((N_ZERO, 1)),
                    (N_START | N_MINUS, b'1'..=b'9') => Some((N_INT, 1)),
                    (N_INT, _) if digit && f.a < MAX_INT_DIGITS => Some((N_INT, f.a + 1)),
                    (N_ZERO | N_INT, b'.') if !integer => Some((N_DOT, 0)),
                    (N_ZERO | N_INT | N_FRAC, b'e' | b'E') if !integer => Some((N_E, 0)),
                    (N_DOT, _) if digit => Some((N_FRAC, 1)),
                    (N_FRAC, _) if digit && f.a < MAX_FRAC_DIGITS => Some((N_FRAC, f.a + 1)),
                    (N_E, b'+' | b'-') => Some((N_ESIGN, 0)),
                    (N_E | N_ESIGN, _) if digit => Some((N_EXP, 1)),
                    (N_EXP, _) if digit && f.a < MAX_EXP_DIGITS => Some((N_EXP, f.a + 1)),
                    _ => None,
                };
                if let Some((st, a)) = next {
                    out.push(self.push(parent, Frame { st, a, ..f }));
                } else if number_final(f.st) {
                    self.delegate(g, lim, parent, c, out);
                }
            }
            Node::Literals(lits) => {
                let (len, lo) = (f.a as usize, f.b as usize);
                let prefix = &lits[lo][..len];
                let mut j = lo;
                while j < lits.len() && lits[j].starts_with(prefix) {
                    if lits[j].len() > len && lits[j][len] == c {
                        break;
                    }
                    j += 1;
                }
                if j < lits.len() && lits[j].starts_with(prefix) {
                    let whole = &lits[j][..len + 1];
                    let extends = lits[j].len() > len + 1
                        || lits.get(j + 1).is_some_and(|n| n.starts_with(whole));
                    if extends {
                        out.push(self.push(
                            parent,
                            Frame {
                                a: len as u32 + 1,
                                b: j as u32,
                                ..f
                            },
                        ));
                    } else {
                        self.done(g, parent, out);
                    }
                } else if len > 0 && lits[lo].len() == len {
                    self.delegate(g, lim, parent, c, out);
                }
            }
            Node::Array { items, min, max } => match f.st {
                0 => {
                    if c == b'[' && depth <= lim.max_depth {
                        out.push(self.push(parent, with(1)));
                    }
                }
                1 | 3 => {
                    if ws_ok {
                        out.push(self.push(parent, more_ws));
                    } else if c == b']' && f.st == 1 && *min == 0 {
                        self.done(g, parent, out);
                    } else if f.a < *max {
                        let p = self.push(parent, with(4));
                        self.start(g, lim, *items, p, c, out);
                    }
                }
                2 => {
                    if ws_ok {
                        out.push(self.push(parent, more_ws));
                    } else if c == b',' && f.a < *max {
                        out.push(self.push(parent, with(3)));
                    } else if c == b']' && f.a >= *min {
                        self.done(g, parent, out);
                    }
                }
                _ => {}
            },
            Node::Object { props, req_from } => {
                let n = props.len() as u32;
                let next = f.c;
                // the last property that may come next (`next..=last`)
                let last = req_from[next as usize].min(n.saturating_sub(1));
                let can_close = req_from[next as usize] == n;
                match f.st {
                    0 => {
                        if c == b'{' && depth <= lim.max_depth {
                            out.push(self.push(parent, with(1)));
                        }
                    }
                    1 | 6 | 7 => {
                        if ws_ok {
                            out.push(self.push(parent, more_ws));
                        } else if c == b'}' && f.st != 7 && can_close {
                            self.done(g, parent, out);
                        } else if c == b',' && f.st == 6 && next < n {
                            out.push(self.push(parent, with(7)));
                        } else if c == b'"' && f.st != 6 && next < n {
                            out.push(self.push(
                                parent,
                                Frame {
                                    st: 2,
                                    ws: 0,
                                    a: 1,
                                    b: next,
                                    ..f
                                },
                            ));
                        }
                    }
                    2 => {
                        let (len, cand) = (f.a as usize, f.b as usize);
                        let prefix = &props[cand].key[..len];
                        let found = (cand..=last as usize).find(|&j| {
                            let k = &props[j].key;
                            k.len() > len && k[..len] == *prefix && k[len] == c
                        });
                        if let Some(j) = found {
                            let nf = if props[j].key.len() == len + 1 {
                                Frame {
                                    st: 3,
                                    a: 0,
                                    b: j as u32,
                                    c: j as u32 + 1,
                                    ..f
                                }
                            } else {
                                Frame {
                                    a: len as u32 + 1,
                                    b: j as u32,
                                    ..f
                                }
                            };
                            out.push(self.push(parent, nf));
                        }
                    }
                    3 => {
                        if c == b':' {
                            out.push(self.push(parent, with(4)));
                        }
                    }
                    4 => {
                        if ws_ok {
                            out.push(self.push(parent, more_ws));
                        } else {
                            let p = self.push(parent, with(5));
                            self.start(g, lim, props[f.b as usize].node, p, c, out);
                        }
                    }
                    _ => {}
                }
            }
            Node::Map { values } => match f.st {
                0 => {
                    if c == b'{' && depth <= lim.max_depth {
                        out.push(self.push(parent, with(1)));
                    }
                }
                1 | 6 | 7 => {
                    if ws_ok {
                        out.push(self.push(parent, more_ws));
                    } else if c == b'}' && f.st != 7 {
                        self.done(g, parent, out);
                    } else if c == b',' && f.st == 6 {
                        out.push(self.push(parent, with(7)));
                    } else if c == b'"' && f.st != 6 {
                        let p = self.push(parent, with(2));
                        self.start(g, lim, g.string, p, c, out);
                    }
                }
                3 => {
                    if c == b':' {
                        out.push(self.push(parent, with(4)));
                    }
                }
                4 => {
                    if ws_ok {
                        out.push(self.push(parent, more_ws));
                    } else {
                        let p = self.push(parent, with(5));
                        self.start(g, lim, *values, p, c, out);
                    }
                }
                _ => {}
            },
        }
    }

    /// Start a value of `node` under `parent` with its first byte `c`.
    pub fn start(
        &mut self,
        g: &Graph,
        lim: &Limits,
        node: u32,
        parent: u32,
        c: u8,
        out: &mut Vec<u32>,
    ) {
        if let Node::Union(alts) = &g.nodes[node as usize] {
            for &a in alts {
                self.start(g, lim, a, parent, c, out);
            }
            return;
        }
        let h = self.push(
            parent,
            Frame {
                node,
                ..Frame::default()
            },
        );
        self.step(g, lim, h, c, out);
    }

    /// The child on top of `parent` is complete: `parent` moves on. Pushes the new head.
    fn done(&mut self, g: &Graph, parent: u32, out: &mut Vec<u32>) {
        if let Some(h) = self.after_child(g, parent) {
            out.push(h);
        }
    }

    /// A number or literal ended at `c`, which belongs to the parent.
    fn delegate(&mut self, g: &Graph, lim: &Limits, parent: u32, c: u8, out: &mut Vec<u32>) {
        if let Some(p) = self.after_child(g, parent) {
            self.step(g, lim, p, c, out);
        }
    }

    fn after_child(&mut self, g: &Graph, parent: u32) -> Option<u32> {
        if parent == EMPTY {
            return Some(EMPTY);
        }
        let Link { f, parent: pp, .. } = self.links[parent as usize];
        let nf = match f.st {
            // array item done
            4 => {
                let a = match &g.nodes[f.node as usize] {
                    // without an upper bound, counting past the minimum changes nothing
                    Node::Array { min, max, .. } if *max == UNBOUNDED => (f.a + 1).min(*min),
                    _ => f.a + 1,
                };
                Frame {
                    st: 2,
                    ws: 0,
                    a,
                    ..f
                }
            }
            // object / map value done
            5 => Frame { st: 6, ws: 0, ..f },
            // map key done
            2 => Frame { st: 3, ws: 0, ..f },
            _ => return None,
        };
        Some(self.push(pp, nf))
    }
}
