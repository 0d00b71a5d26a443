//! `ferroq tokenize`: text → ids (or ids → text with `--decode`) with a model's tokenizer.

use std::io::{BufRead, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use ferroq::internals::tokenizer::{Tokenizer, TokenizerKind};
use ferroq::{Error, Result};

#[derive(clap::Args)]
pub struct Args {
    /// tokenizer.json (Hugging Face), tokenizer.model (SentencePiece: Llama 2, Mistral, ...;
    /// or Meta Llama 4's tiktoken format), or a .fqm model (its stored tokenizer).
    #[arg(short = 't', long = "tokenizer", value_name = "FILE")]
    pub tokenizer: PathBuf,
    /// Read one JSON string per stdin line and print one JSON array of ids per line
    /// (with --decode: one JSON array of ids per line in, one JSON string per line out).
    /// Without it, all of stdin is one text (or one JSON array of ids).
    #[arg(long)]
    pub jsonl: bool,
    /// Put the BOS token first.
    #[arg(long)]
    pub bos: bool,
    /// Decode ids to text instead.
    #[arg(long)]
    pub decode: bool,
    /// With --decode: leave out special tokens.
    #[arg(long)]
    pub skip_special: bool,
}

/// Load the tokenizer of a tokenizer file or of a `.fqm` model (its stored tokenizer).
pub fn load_tokenizer(path: &Path) -> Result<Tokenizer> {
    if path.extension().and_then(|e| e.to_str()) == Some("fqm") {
        let file = ferroq::internals::format::FqmFile::open(path)?;
        return ferroq::internals::engine::tokenizer_from_fqm(&file);
    }
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    tokenizer_from_bytes(path, &bytes, TokenizerKind::detect(Some(path), &bytes))
}

/// Build a tokenizer from raw file bytes of a known kind, naming `path` in errors.
pub fn tokenizer_from_bytes(path: &Path, bytes: &[u8], kind: TokenizerKind) -> Result<Tokenizer> {
    Tokenizer::from_bytes(bytes, kind).map_err(|e| match e {
        Error::Format { msg, .. } => Error::format(path, msg),
        other => Error::format(path, other.to_string()),
    })
}

fn out_err(e: std::io::Error) -> Error {
    Error::io("<stdout>", e)
}

fn parse_ids(tok: &Tokenizer, text: &str, what: &str) -> Result<Vec<u32>> {
    let ids: Vec<u32> = serde_json::from_str(text)
        .map_err(|e| Error::Input(format!("{what}: expected a JSON array of token ids: {e}")))?;
    if let Some(&bad) = ids.iter().find(|&&i| tok.id_to_bytes(i).is_none()) {
        return Err(Error::Input(format!(
            "{what}: token id {bad} is not in the vocabulary (size {})",
            tok.vocab_size()
        )));
    }
    Ok(ids)
}

pub fn run(args: Args) -> Result<()> {
    let tok = load_tokenizer(&args.tokenizer)?;
    let stdin = std::io::stdin();
    let mut input = stdin.lock();
    let stdout = std::io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    if !args.jsonl {
        let mut raw = Vec::new();
        input
            .read_to_end(&mut raw)
            .map_err(|e| Error::io("<stdin>", e))?;
        let text = String::from_utf8(raw)
            .map_err(|e| Error::Input(format!("stdin is not valid UTF-8: {e}")))?;
        if args.decode {
            let ids = parse_ids(&tok, text.trim(), "stdin")?;
            out.write_all(tok.decode(&ids, args.skip_special).as_bytes())
                .map_err(out_err)?;
        } else {
            let ids = tok.encode(&text, args.bos);
            let s = serde_json::to_string(&ids).map_err(|e| Error::Other(e.to_string()))?;
            writeln!(out, "{s}").map_err(out_err)?;
        }
        return out.flush().map_err(out_err);
    }
    let mut line = Vec::new();
    let mut n = 0usize;
    let mut ids = Vec::new();
    loop {
        line.clear();
        let got = input
            .read_until(b'\n', &mut line)
            .map_err(|e| Error::io("<stdin>", e))?;
        if got == 0 {
            break;
        }
        n += 1;
        let what = format!("stdin line {n}");
        let text = std::str::from_utf8(&line)
            .map_err(|e| Error::Input(format!("{what}: invalid UTF-8: {e}")))?;
        let text = text.strip_suffix('\n').unwrap_or(text);
        let text = text.strip_suffix('\r').unwrap_or(text);
        let json_out = if args.decode {
            let ids = parse_ids(&tok, text, &what)?;
            serde_json::to_string(&tok.decode(&ids, args.skip_special))
        } else {
            let s: String = serde_json::from_str(text)
                .map_err(|e| Error::Input(format!("{what}: expected a JSON string: {e}")))?;
            ids.clear();
            tok.encode_into(&s, args.bos, &mut ids);
            serde_json::to_string(&ids)
        }
        .map_err(|e| Error::Other(e.to_string()))?;
        writeln!(out, "{json_out}").map_err(out_err)?;
    }
    out.flush().map_err(out_err)
}
