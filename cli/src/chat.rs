//! `ferroq chat`: an interactive multi-turn chat. Reads one user message per stdin line (so it
//! can be scripted: `printf 'Hi\nAnd then?\n' | ferroq chat -m M.fqm`), streams each answer to
//! stdout, and keeps the KV cache between turns: only the new turn's tokens are processed.
//! `/reset` starts a new conversation, `/exit` (or end of input) quits. After each turn a
//! one-line summary goes to stderr.

use std::io::{BufRead, IsTerminal, Write};

use ferroq::internals::engine::{GenOptions, Session, SessionOptions, StopReason};
use ferroq::{Error, Result};

use super::run::{print_kv, ModelArgs, SamplingArgs};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// System message.
    #[arg(long)]
    pub system: Option<String>,
    /// Most tokens per answer.
    #[arg(short = 'n', long = "n-predict", default_value_t = 1024)]
    pub n_predict: usize,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

fn out_err(e: std::io::Error) -> Error {
    Error::io("<stdout>", e)
}

pub fn run(a: Args) -> Result<()> {
    let (sampler, seed) = a.sampling.config()?;
    let engine = a.model.open_engine()?;
    if engine.template().is_none() {
        return Err(ferroq::internals::chat::no_template_error());
    }
    let mut session = Session::new(
        engine.clone(),
        &SessionOptions {
            ctx: a.model.ctx,
            batch: a.model.batch,
            threads: a.model.threads,
            kv: a.model.kv,
        },
    )?;
    print_kv(&session);
    if let Some(s) = &a.system {
        session.set_system(s)?;
    }
    let gen = GenOptions {
        max_tokens: a.n_predict,
        sampler,
        stop_strings: a.sampling.stop.clone(),
    };
    let interactive = std::io::stdin().is_terminal();
    if interactive {
        eprintln!(
            "ferroq chat: {} (context {} tokens, load {:.0} ms). One message per line; \
             /reset starts over, /exit or Ctrl-D quits.",
            a.model.model.display(),
            session.ctx(),
            engine.load_ms()
        );
    }
    let stdin = std::io::stdin();
    let mut input = stdin.lock();
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut line = Vec::new();
    let mut turn = 0usize;
    // messages refused as input errors (too long for the context, invalid UTF-8, ...): the chat
    // goes on without them, and the exit status says some were refused
    let mut refused = 0usize;
    let (mut total_prompt, mut total_prompt_ms, mut total_gen, mut total_gen_ms) = (0, 0.0, 0, 0.0);
    loop {
        if interactive {
            eprint!("> ");
        }
        line.clear();
        let n = input
            .read_until(b'\n', &mut line)
            .map_err(|e| Error::io("<stdin>", e))?;
        if n == 0 {
            break;
        }
        let text = match std::str::from_utf8(&line) {
            Ok(t) => t,
            Err(e) => {
                refused += 1;
                eprintln!(
                    "ferroq: error: message {} is not valid UTF-8 ({e}); skipped, the \
                     conversation is unchanged",
                    turn + refused
                );
                continue;
            }
        };
        let text = text.trim_end_matches(['\n', '\r']);
        match text.trim() {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                session.reset();
                if let Some(s) = &a.system {
                    session.set_system(s)?;
                }
                eprintln!("ferroq: new conversation");
                continue;
            }
            _ => {}
        }
        let mut io_err = None;
        let g = session.chat(text, &gen, &mut |_, piece| {
            if piece.is_empty() {
                return true;
            }
            match out.write_all(piece.as_bytes()).and_then(|_| out.flush()) {
                Ok(()) => true,
                Err(e) => {
                    io_err = Some(e);
                    false
                }
            }
        });
        if let Some(e) = io_err {
            return Err(out_err(e));
        }
        let g = match g {
            Ok(g) => g,
            Err(Error::Input(msg)) => {
                // nothing was added to the conversation or the cache (Session::chat)
                refused += 1;
                eprintln!("ferroq: error: {msg}; message skipped, the conversation is unchanged");
                continue;
            }
            Err(e) => return Err(e),
        };
        turn += 1;
        writeln!(out).map_err(out_err)?;
        out.flush().map_err(out_err)?;
        let t = &g.timings;
        eprintln!(
            "[turn {turn}: {} cached tokens reused, {} new prompt tokens in {:.0} ms \
             ({:.1} tokens/s), {} tokens generated in {:.0} ms ({:.1} tokens/s), stopped: {}]",
            t.reused_tokens,
            t.prompt_tokens,
            t.prompt_ms,
            t.prompt_tokens_per_s(),
            t.gen_tokens,
            t.gen_ms,
            t.gen_tokens_per_s(),
            g.stop.as_str()
        );
        total_prompt += t.prompt_tokens;
        total_prompt_ms += t.prompt_ms;
        total_gen += t.gen_tokens;
        total_gen_ms += t.gen_ms;
        if g.stop == StopReason::ContextFull {
            eprintln!(
                "ferroq: the context ({} tokens) is full; /reset to start a new conversation",
                session.ctx()
            );
        }
    }
    let per_s = |n: usize, ms: f64| if ms > 0.0 { n as f64 * 1e3 / ms } else { 0.0 };
    eprintln!(
        "ferroq: load time = {:.2} ms; prompt: {total_prompt} tokens, {:.2} tokens per second; \
         generation: {total_gen} tokens, {:.2} tokens per second",
        engine.load_ms(),
        per_s(total_prompt, total_prompt_ms),
        per_s(total_gen, total_gen_ms)
    );
    if a.sampling.seed.is_none() && gen.sampler.temperature > 0.0 {
        eprintln!("ferroq: seed = {seed}");
    }
    if refused > 0 {
        return Err(Error::Input(format!(
            "{refused} message(s) were refused (see the errors above)"
        )));
    }
    Ok(())
}
