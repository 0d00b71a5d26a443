//! Bounded memory for chat templates.
//!
//! A chat template comes with the model file, so it is untrusted code. minijinja's fuel bounds
//! the number of steps a render takes, and the output cap bounds what it writes, but neither
//! bounds the values it builds on the way: `{% set a = a ~ a %}` written thirty times, or in a
//! loop over a namespace, doubles a string each step and asks for gigabytes in a few dozen
//! steps. So every operation that can make a value larger than its inputs is charged, before it
//! runs, against a per-render [`Budget`]: no single value may exceed the output cap, and all
//! values made together may not exceed a few hundred MiB.
//!
//! How each kind of growth is caught:
//! - the operators `~`, `+` and `*`: the compiled instructions `StringConcat`, `Add` and `Mul`
//!   are replaced by calls of the checking functions [`CONCAT`], [`ADD`] and [`MUL`] (one
//!   instruction for one, so every jump target stays valid), which charge the result's size
//!   and then perform the original operation;
//! - the filters that can build larger values (`replace`, `join`, `indent`, `format`, `upper`,
//!   `pprint`, `chain`, ...): wrappers that charge a bound computed from their arguments, then
//!   call minijinja's own filter; our `tojson` stops at the value cap as it writes;
//! - the Python string methods (`.replace`, `.join`, `.upper`, `.split`, ...): charged in
//!   [`super::py_method`];
//! - `{{ ... }}`: the formatter charges what it writes (also into `{% set %}` blocks, macro
//!   bodies and `{% filter %}` blocks, which capture output into strings);
//! - raw template text: it costs no value, but a loop can write it many times, so the fuel of a
//!   render is lowered for templates with long raw pieces ([`fuel_for`]): fuel × the longest
//!   piece ≤ [`RAW_BYTES`].
//!
//! The sizes are upper bounds of what minijinja allocates, to within a small factor (string
//! escapes in a list's `repr`), never an amplification. Real chat templates stay far below
//! the limits: their values are pieces of the conversation plus markup.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use minijinja::machinery::{ast, Instruction, Instructions};
use minijinja::value::{Rest, Value, ValueKind};
use minijinja::{Environment, Error, ErrorKind, State};

/// The checking function that replaces `~` (`StringConcat`).
pub const CONCAT: &str = "__ferroq_concat";
/// The checking function that replaces `+` (`Add`).
pub const ADD: &str = "__ferroq_add";
/// The checking function that replaces `*` (`Mul`).
pub const MUL: &str = "__ferroq_mul";
/// Names a template may not use: they would shadow the checking functions.
pub const RESERVED_PREFIX: &str = "__ferroq";

/// Most bytes of raw template text one render may write: fuel × the longest raw piece.
pub const RAW_BYTES: usize = 512 << 20;
/// Most items a sequence repeated with `*` may have (as minijinja's `range`).
pub const MAX_REPEAT_ITEMS: usize = 100_000;
/// Bytes charged per item of a sequence a filter builds (a `Value` and its share of a `Vec`).
const ITEM_BYTES: usize = 32;
/// Nesting depth [`size_of`] follows; deeper values are refused.
const MAX_DEPTH: usize = 128;

/// What one render may build.
#[derive(Debug)]
pub struct Budget {
    /// Most bytes one value may have.
    pub value_cap: usize,
    /// Bytes left for all values of this render together.
    left: AtomicUsize,
    /// Set when a charge was refused (the error minijinja reports then is ours).
    tripped: AtomicBool,
}

impl Budget {
    pub fn new(value_cap: usize, total: usize) -> Arc<Budget> {
        Arc::new(Budget {
            value_cap,
            left: AtomicUsize::new(total),
            tripped: AtomicBool::new(false),
        })
    }

    /// Whether a charge was refused during the render.
    pub fn tripped(&self) -> bool {
        self.tripped.load(Ordering::Relaxed)
    }

    /// Take `bytes` from the budget, or refuse (and remember that this was the cause).
    pub fn charge(&self, bytes: usize, what: &str) -> Result<(), Error> {
        let refuse = |msg: String| {
            self.tripped.store(true, Ordering::Relaxed);
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        };
        if bytes > self.value_cap {
            return refuse(format!(
                "{what} would build a value of {bytes} bytes, over the limit of {} per value",
                self.value_cap
            ));
        }
        let mut cur = self.left.load(Ordering::Relaxed);
        loop {
            if bytes > cur {
                return refuse(format!(
                    "{what} would take the values built by this render past their limit"
                ));
            }
            match self.left.compare_exchange_weak(
                cur,
                cur - bytes,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Ok(()),
                Err(now) => cur = now,
            }
        }
    }
}

/// An upper bound of a value's size when written out or copied.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Size {
    /// Bytes of its text (`Display`, with quotes and separators for sequences and maps).
    pub bytes: usize,
    /// Items in it, nested ones included.
    pub items: usize,
    /// Nesting depth (0: not a container).
    pub depth: usize,
}

/// [`Size`] of `v`, stopping early (with a result over `limit`) once it exceeds `limit`, so the
/// cost is at most about `limit` steps even for a lazy sequence of 10^18 items.
pub fn size_of(v: &Value, limit: usize) -> Size {
    let mut s = Size::default();
    walk(v, limit, 0, &mut s);
    s
}

fn walk(v: &Value, limit: usize, depth: usize, s: &mut Size) {
    if s.bytes > limit {
        return;
    }
    if depth > MAX_DEPTH {
        s.bytes = s.bytes.saturating_add(limit).saturating_add(1);
        return;
    }
    s.depth = s.depth.max(depth);
    match v.kind() {
        ValueKind::String => {
            let n = v.as_str().map_or(0, str::len);
            // inside a container it is written as a quoted repr (escapes at most double it)
            let n = if depth > 0 { 2 * n + 2 } else { n };
            s.bytes = s.bytes.saturating_add(n);
        }
        ValueKind::Bytes => {
            let n = v.as_bytes().map_or(0, <[u8]>::len);
            s.bytes = s.bytes.saturating_add(4 * n + 3);
        }
        ValueKind::Seq | ValueKind::Iterable | ValueKind::Map => {
            let is_map = v.kind() == ValueKind::Map;
            s.bytes = s.bytes.saturating_add(2);
            let Ok(iter) = v.try_iter() else {
                s.bytes = s.bytes.saturating_add(64);
                return;
            };
            for item in iter {
                s.items += 1;
                s.bytes = s.bytes.saturating_add(2);
                walk(&item, limit, depth + 1, s);
                if is_map {
                    s.bytes = s.bytes.saturating_add(2);
                    if let Ok(val) = v.get_item(&item) {
                        walk(&val, limit, depth + 1, s);
                    }
                }
                if s.bytes > limit {
                    return;
                }
            }
        }
        // numbers, booleans, none, undefined; objects without items (macros, functions, a
        // loop's state) print a short description
        _ => s.bytes = s.bytes.saturating_add(64),
    }
}

/// Items of a sequence (or map), counted up to `limit + 1`.
fn count(v: &Value, limit: usize) -> usize {
    match v.kind() {
        ValueKind::Seq | ValueKind::Iterable | ValueKind::Map => v
            .try_iter()
            .map_or(0, |it| it.take(limit.saturating_add(1)).count()),
        ValueKind::String => v.as_str().map_or(0, |s| s.chars().count()),
        _ => 0,
    }
}

/// Replace the growing operators of compiled `code` by calls of the checking functions, and
/// refuse a template that uses the reserved names. Returns the longest raw text piece.
pub fn patch(code: &mut Instructions<'_>) -> Result<usize, String> {
    let mut longest_raw = 0;
    for i in 0..code.len() as u32 {
        let Some(instr) = code.get_mut(i) else { break };
        match instr {
            Instruction::StringConcat => *instr = Instruction::CallFunction(CONCAT, Some(2)),
            Instruction::Add => *instr = Instruction::CallFunction(ADD, Some(2)),
            Instruction::Mul => *instr = Instruction::CallFunction(MUL, Some(2)),
            Instruction::EmitRaw(s) => longest_raw = longest_raw.max(s.len()),
            Instruction::Lookup(name)
            | Instruction::StoreLocal(name)
            | Instruction::CallFunction(name, _)
                if name.starts_with(RESERVED_PREFIX) =>
            {
                return Err(format!(
                    "the template uses the name `{name}`, which ferroq reserves \
                     (names starting with `{RESERVED_PREFIX}`)"
                ));
            }
            _ => {}
        }
    }
    Ok(longest_raw)
}

/// The fuel of a render whose longest raw text piece is `longest_raw` bytes: at most `fuel`,
/// and low enough that raw text alone cannot write more than [`RAW_BYTES`].
pub fn fuel_for(fuel: u64, longest_raw: usize) -> u64 {
    fuel.min((RAW_BYTES / longest_raw.max(1)) as u64).max(1)
}

/// An environment without the checks, for the original operators (`a + b` evaluated there is
/// minijinja's own `+`).
pub fn ops_env() -> Environment<'static> {
    Environment::new()
}

fn binop(ops: &Environment<'static>, expr: &str, a: Value, b: Value) -> Result<Value, Error> {
    ops.compile_expression(expr)?
        .eval(minijinja::context! { a => a, b => b })
}

/// Register the checking functions, filter wrappers and formatter on `env`.
pub fn install(env: &mut Environment<'_>, budget: &Arc<Budget>, ops: &Arc<Environment<'static>>) {
    let cap = budget.value_cap;
    {
        let b = budget.clone();
        env.add_function(CONCAT, move |a: Value, c: Value| -> Result<Value, Error> {
            let n = size_of(&a, cap)
                .bytes
                .saturating_add(size_of(&c, cap).bytes);
            b.charge(n, "`~`")?;
            Ok(Value::from(format!("{a}{c}")))
        });
    }
    {
        let (b, ops) = (budget.clone(), ops.clone());
        env.add_function(ADD, move |a: Value, c: Value| -> Result<Value, Error> {
            let n = match (a.kind(), c.kind()) {
                (ValueKind::String, ValueKind::String) => size_of(&a, cap)
                    .bytes
                    .saturating_add(size_of(&c, cap).bytes),
                (ValueKind::Seq | ValueKind::Iterable, ValueKind::Seq | ValueKind::Iterable) => {
                    let items = count(&a, cap).saturating_add(count(&c, cap));
                    items.saturating_mul(ITEM_BYTES)
                }
                _ => 0,
            };
            b.charge(n, "`+`")?;
            binop(&ops, "a + b", a, c)
        });
    }
    {
        let (b, ops) = (budget.clone(), ops.clone());
        env.add_function(MUL, move |a: Value, c: Value| -> Result<Value, Error> {
            let times = |v: &Value| v.as_usize().unwrap_or(0);
            let n = match (a.kind(), c.kind()) {
                (ValueKind::String, _) => size_of(&a, cap).bytes.saturating_mul(times(&c)),
                (_, ValueKind::String) => size_of(&c, cap).bytes.saturating_mul(times(&a)),
                (ValueKind::Seq | ValueKind::Iterable, _)
                | (_, ValueKind::Seq | ValueKind::Iterable) => {
                    let (seq, k) = if matches!(a.kind(), ValueKind::Seq | ValueKind::Iterable) {
                        (&a, times(&c))
                    } else {
                        (&c, times(&a))
                    };
                    let items = count(seq, MAX_REPEAT_ITEMS).saturating_mul(k);
                    if items > MAX_REPEAT_ITEMS {
                        b.tripped.store(true, Ordering::Relaxed);
                        return Err(Error::new(
                            ErrorKind::InvalidOperation,
                            format!(
                                "`*` would repeat a sequence to {items} items (at most \
                                 {MAX_REPEAT_ITEMS})"
                            ),
                        ));
                    }
                    items.saturating_mul(ITEM_BYTES)
                }
                _ => 0,
            };
            b.charge(n, "`*`")?;
            binop(&ops, "a * b", a, c)
        });
    }
    wrap_filters(env, budget);
    let b = budget.clone();
    env.set_formatter(move |out, state, value| {
        b.charge(size_of(value, cap).bytes, "`{{ ... }}`")?;
        minijinja::escape_formatter(out, state, value)
    });
}

/// A bound of the bytes a filter's result takes, from its arguments (`args[0]` is the value).
type Bound = fn(&[Value], usize) -> usize;

fn text_len(v: Option<&Value>, cap: usize) -> usize {
    v.map_or(0, |v| match v.as_str() {
        Some(s) => s.len(),
        None => size_of(v, cap).bytes,
    })
}

fn bound_case(a: &[Value], cap: usize) -> usize {
    // Unicode case mapping makes at most three characters of one
    text_len(a.first(), cap).saturating_mul(3)
}

fn bound_replace(a: &[Value], cap: usize) -> usize {
    let s = a.first().map(|v| v.to_string()).unwrap_or_default();
    let old = a.get(1).and_then(Value::as_str).unwrap_or("");
    let new = text_len(a.get(2), cap);
    let hits = if old.is_empty() {
        s.chars().count() + 1
    } else {
        s.matches(old).count()
    };
    s.len().saturating_add(hits.saturating_mul(new))
}

fn bound_join(a: &[Value], cap: usize) -> usize {
    let Some(v) = a.first() else { return 0 };
    let sep = text_len(a.get(1), cap);
    size_of(v, cap)
        .bytes
        .saturating_add(count(v, cap).saturating_mul(sep))
}

fn bound_indent(a: &[Value], cap: usize) -> usize {
    let s = a.first().and_then(Value::as_str).unwrap_or("");
    let width = a.get(1).map_or(4, |w| {
        w.as_usize().unwrap_or_else(|| text_len(Some(w), cap))
    });
    let lines = s.bytes().filter(|&c| c == b'\n').count() + 1;
    s.len().saturating_add(lines.saturating_mul(width))
}

fn bound_format(a: &[Value], cap: usize) -> usize {
    let fmt = a.first().and_then(Value::as_str).unwrap_or("");
    // widths and precisions in the format can pad: add every number written in it
    let mut widths = 0usize;
    let mut run = 0usize;
    for c in fmt.bytes().chain(std::iter::once(b' ')) {
        if c.is_ascii_digit() {
            run = run.saturating_mul(10).saturating_add((c - b'0') as usize);
        } else {
            widths = widths.saturating_add(run);
            run = 0;
        }
    }
    let args: usize = a[1.min(a.len())..]
        .iter()
        .map(|v| size_of(v, cap).bytes)
        .fold(0, usize::saturating_add);
    fmt.len().saturating_add(widths).saturating_add(args)
}

fn bound_pprint(a: &[Value], cap: usize) -> usize {
    let s = a.first().map_or(Size::default(), |v| size_of(v, cap));
    // one line per item, indented by its depth
    s.bytes
        .saturating_add(s.items.saturating_mul(2 * s.depth + 2))
}

fn bound_copy(a: &[Value], cap: usize) -> usize {
    a.first().map_or(0, |v| size_of(v, cap).bytes)
}

fn bound_escape(a: &[Value], cap: usize) -> usize {
    // `"` becomes `&#34;`, `&` `&amp;`: at most six bytes for one
    text_len(a.first(), cap).saturating_mul(6)
}

fn bound_pieces(a: &[Value], cap: usize) -> usize {
    // `split`/`lines`: at most one (small) string per byte, plus one
    text_len(a.first(), cap)
        .saturating_add(1)
        .saturating_mul(ITEM_BYTES)
}

fn bound_items(a: &[Value], cap: usize) -> usize {
    // filters that build sequences of the items they are given (no item is copied)
    a.iter()
        .map(|v| count(v, cap))
        .fold(0, usize::saturating_add)
        .saturating_mul(ITEM_BYTES)
}

fn builtin_filters() -> Vec<(&'static str, Value, Bound)> {
    use minijinja::filters as f;
    vec![
        ("upper", Value::from_function(f::upper), bound_case),
        ("lower", Value::from_function(f::lower), bound_case),
        ("title", Value::from_function(f::title), bound_case),
        (
            "capitalize",
            Value::from_function(f::capitalize),
            bound_case,
        ),
        ("replace", Value::from_function(f::replace), bound_replace),
        ("join", Value::from_function(f::join), bound_join),
        ("indent", Value::from_function(f::indent), bound_indent),
        ("format", Value::from_function(f::format), bound_format),
        ("pprint", Value::from_function(f::pprint), bound_pprint),
        ("string", Value::from_function(f::string), bound_copy),
        ("sum", Value::from_function(f::sum), bound_copy),
        ("escape", Value::from_function(f::escape), bound_escape),
        ("e", Value::from_function(f::escape), bound_escape),
        ("split", Value::from_function(f::split), bound_pieces),
        ("lines", Value::from_function(f::lines), bound_pieces),
        ("list", Value::from_function(f::list), bound_pieces),
        ("chain", Value::from_function(f::chain), bound_items),
        ("zip", Value::from_function(f::zip), bound_items),
        ("batch", Value::from_function(f::batch), bound_items),
        ("slice", Value::from_function(f::slice), bound_items),
        ("items", Value::from_function(f::items), bound_items),
        ("dictsort", Value::from_function(f::dictsort), bound_items),
        ("sort", Value::from_function(f::sort), bound_items),
        ("unique", Value::from_function(f::unique), bound_items),
        ("reverse", Value::from_function(f::reverse), bound_items),
        ("groupby", Value::from_function(f::groupby), bound_items),
    ]
}

fn wrap_filters(env: &mut Environment<'_>, budget: &Arc<Budget>) {
    let cap = budget.value_cap;
    for (name, builtin, bound) in builtin_filters() {
        let b = budget.clone();
        env.add_filter(
            name,
            move |state: &State, args: Rest<Value>| -> Result<Value, Error> {
                b.charge(bound(&args, cap), &format!("the filter `{name}`"))?;
                builtin.call(state, &args)
            },
        );
    }
}

/// Largest constant expression a template may contain. minijinja evaluates expressions of
/// constants while compiling (`'x' * 10**8 ~ 'x' * 10**8 ~ ...` would be folded into one string
/// of gigabytes before any render), so they are bounded first, on the parsed template.
pub const MAX_CONST_BYTES: u128 = 1 << 20;

/// Refuse a template with a constant expression larger than [`MAX_CONST_BYTES`].
pub fn check_constants(tree: &ast::Stmt<'_>) -> Result<(), String> {
    stmt(tree)
}

/// Bytes of a constant expression (and its value if it is an integer); `None`: not constant.
fn const_size(e: &ast::Expr<'_>) -> Option<(u128, Option<i128>)> {
    use ast::{BinOpKind as K, Expr};
    Some(match e {
        Expr::Const(c) => match c.value.kind() {
            ValueKind::Number => (24, i128::try_from(c.value.clone()).ok()),
            _ => (size_of(&c.value, usize::MAX).bytes as u128, None),
        },
        Expr::List(l) => (size_of(&l.as_const()?, usize::MAX).bytes as u128, None),
        Expr::Map(m) => (size_of(&m.as_const()?, usize::MAX).bytes as u128, None),
        Expr::UnaryOp(u) => {
            let (n, i) = const_size(&u.expr)?;
            (n, i.and_then(i128::checked_neg))
        }
        Expr::Compare(_) => (8, None),
        Expr::BinOp(b) => {
            let (l, li) = const_size(&b.left)?;
            let (r, ri) = const_size(&b.right)?;
            match (b.op, li, ri) {
                (K::Add, Some(x), Some(y)) => (24, x.checked_add(y)),
                (K::Mul, Some(x), Some(y)) => (24, x.checked_mul(y)),
                (K::Pow, Some(x), Some(y)) => {
                    (24, u32::try_from(y).ok().and_then(|y| x.checked_pow(y)))
                }
                (K::Concat | K::Add, _, _) => (l.saturating_add(r), None),
                (K::Mul, Some(k), None) => (r.saturating_mul(k.max(0) as u128), None),
                (K::Mul, None, Some(k)) => (l.saturating_mul(k.max(0) as u128), None),
                (K::ScAnd | K::ScOr, _, _) => (l.max(r), None),
                _ => (24, None),
            }
        }
        _ => return None,
    })
}

fn stmts(list: &[ast::Stmt<'_>]) -> Result<(), String> {
    list.iter().try_for_each(stmt)
}

fn opt(e: &Option<ast::Expr<'_>>) -> Result<(), String> {
    e.as_ref().map_or(Ok(()), expr)
}

fn call_args(args: &[ast::CallArg<'_>]) -> Result<(), String> {
    args.iter().try_for_each(|a| match a {
        ast::CallArg::Pos(e)
        | ast::CallArg::Kwarg(_, e)
        | ast::CallArg::PosSplat(e)
        | ast::CallArg::KwargSplat(e) => expr(e),
    })
}

fn stmt(s: &ast::Stmt<'_>) -> Result<(), String> {
    use ast::Stmt as S;
    match s {
        S::Template(t) => stmts(&t.children),
        S::EmitExpr(e) => expr(&e.expr),
        S::EmitRaw(_) | S::Continue(_) | S::Break(_) => Ok(()),
        S::ForLoop(f) => {
            expr(&f.target)?;
            expr(&f.iter)?;
            opt(&f.filter_expr)?;
            stmts(&f.body)?;
            stmts(&f.else_body)
        }
        S::IfCond(c) => {
            expr(&c.expr)?;
            stmts(&c.true_body)?;
            stmts(&c.false_body)
        }
        S::WithBlock(w) => {
            for (a, b) in &w.assignments {
                expr(a)?;
                expr(b)?;
            }
            stmts(&w.body)
        }
        S::Set(x) => {
            expr(&x.target)?;
            expr(&x.expr)
        }
        S::SetBlock(x) => {
            expr(&x.target)?;
            opt(&x.filter)?;
            stmts(&x.body)
        }
        S::AutoEscape(a) => {
            expr(&a.enabled)?;
            stmts(&a.body)
        }
        S::FilterBlock(f) => {
            expr(&f.filter)?;
            stmts(&f.body)
        }
        S::Block(b) => stmts(&b.body),
        S::Import(i) => {
            expr(&i.expr)?;
            expr(&i.name)
        }
        S::FromImport(i) => expr(&i.expr),
        S::Extends(x) => expr(&x.name),
        S::Include(x) => expr(&x.name),
        S::Macro(m) => {
            m.defaults.iter().try_for_each(expr)?;
            stmts(&m.body)
        }
        S::CallBlock(c) => {
            expr(&c.call.expr)?;
            call_args(&c.call.args)?;
            c.macro_decl.defaults.iter().try_for_each(expr)?;
            stmts(&c.macro_decl.body)
        }
        S::Do(d) => {
            expr(&d.call.expr)?;
            call_args(&d.call.args)
        }
    }
}

fn expr(e: &ast::Expr<'_>) -> Result<(), String> {
    use ast::Expr as E;
    if let E::BinOp(_) = e {
        if let Some((n, _)) = const_size(e) {
            if n > MAX_CONST_BYTES {
                return Err(format!(
                    "a constant expression of the template would be {n} bytes (at most \
                     {MAX_CONST_BYTES})"
                ));
            }
            // a constant is folded as a whole: nothing below it runs
            return Ok(());
        }
    }
    match e {
        E::Var(_) | E::Const(_) => Ok(()),
        E::Slice(x) => {
            expr(&x.expr)?;
            opt(&x.start)?;
            opt(&x.stop)?;
            opt(&x.step)
        }
        E::UnaryOp(x) => expr(&x.expr),
        E::BinOp(x) => {
            expr(&x.left)?;
            expr(&x.right)
        }
        E::Compare(x) => {
            expr(&x.expr)?;
            x.ops.iter().try_for_each(|o| expr(&o.expr))
        }
        E::IfExpr(x) => {
            expr(&x.test_expr)?;
            expr(&x.true_expr)?;
            opt(&x.false_expr)
        }
        E::Filter(x) => {
            opt(&x.expr)?;
            call_args(&x.args)
        }
        E::Test(x) => {
            expr(&x.expr)?;
            call_args(&x.args)
        }
        E::GetAttr(x) => expr(&x.expr),
        E::GetItem(x) => {
            expr(&x.expr)?;
            expr(&x.subscript_expr)
        }
        E::Call(x) => {
            expr(&x.expr)?;
            call_args(&x.args)
        }
        E::List(x) => x.items.iter().try_for_each(expr),
        E::Map(x) => {
            x.keys.iter().try_for_each(expr)?;
            x.values.iter().try_for_each(expr)
        }
    }
}

/// Charge what a Python string or dict method called by the template may build.
pub fn charge_method(b: &Budget, value: &Value, method: &str, args: &[Value]) -> Result<(), Error> {
    let cap = b.value_cap;
    let mut all = Vec::with_capacity(args.len() + 1);
    all.push(value.clone());
    all.extend_from_slice(args);
    let n = match (value.kind(), method) {
        (ValueKind::String, "replace") => bound_replace(&all, cap),
        // `sep.join(items)`: the items are the argument, the separator the value
        (ValueKind::String, "join") => bound_join(
            &[args.first().cloned().unwrap_or_default(), value.clone()],
            cap,
        ),
        (ValueKind::String, "upper" | "lower" | "title" | "capitalize") => bound_case(&all, cap),
        (ValueKind::String, "split" | "rsplit") => bound_pieces(&all, cap),
        (ValueKind::Map, "items" | "keys" | "values") => bound_items(&all, cap),
        _ => 0,
    };
    b.charge(n, &format!("the method `.{method}()`"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_bounded_and_stop_early() {
        let v = Value::from(vec![Value::from("ab"), Value::from(vec![Value::from(1)])]);
        let s = size_of(&v, usize::MAX);
        assert_eq!((s.items, s.depth), (3, 2));
        assert!(s.bytes >= "['ab', [1]]".len());
        // a lazy sequence of 10^15 items: the walk stops soon after the limit
        let huge = Value::make_iterable(|| (0..1_000_000_000_000_000u64).map(Value::from));
        let t = std::time::Instant::now();
        assert!(size_of(&huge, 1 << 16).bytes > 1 << 16);
        assert!(t.elapsed().as_secs() < 5);
    }

    #[test]
    fn budget_refuses_a_value_over_the_cap_and_totals_over_the_budget() {
        let b = Budget::new(100, 250);
        assert!(b.charge(101, "x").is_err() && b.tripped());
        let b = Budget::new(100, 250);
        assert!(b.charge(100, "x").is_ok() && b.charge(100, "x").is_ok());
        assert!(b.charge(100, "x").is_err());
        assert!(b.charge(50, "x").is_ok());
    }

    #[test]
    fn fuel_shrinks_with_long_raw_text() {
        assert_eq!(fuel_for(5_000_000, 10), 5_000_000);
        assert_eq!(fuel_for(5_000_000, RAW_BYTES), 1);
        assert!(fuel_for(5_000_000, 4096) as usize * 4096 <= RAW_BYTES);
    }
}
