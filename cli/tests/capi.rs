//! The C ABI (`ferroq::internals::capi`, `include/ferroq.h`): null pointers and bad input give errors
//! (never a panic), tokenize/detokenize round-trip, generation streams through the callback.
//! Then `tests/c/smoke.c` is compiled with `cc` against the static library and run.

mod support;

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::ptr::{null, null_mut};

use ferroq::internals::capi::*;

fn model(test: &str) -> Option<PathBuf> {
    support::smollm2_fqm(
        test,
        Path::new(env!("CARGO_BIN_EXE_ferroq")),
        Path::new(env!("CARGO_TARGET_TMPDIR")),
        "q8",
    )
}

fn last_error() -> String {
    let p = ferroq_last_error();
    assert!(!p.is_null(), "an error message is set");
    // SAFETY: ferroq returns a NUL-terminated string valid until the next call.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

#[test]
fn null_pointers_and_missing_files_are_errors() {
    // SAFETY: every pointer is NULL or valid; that is what is being tested.
    unsafe {
        assert!(ferroq_engine_open(null()).is_null());
        assert!(last_error().contains("NULL"));
        let p = CString::new("/nonexistent/model.fqm").unwrap();
        assert!(ferroq_engine_open(p.as_ptr()).is_null());
        assert!(last_error().contains("/nonexistent/model.fqm"));
        assert!(ferroq_session_new(null(), null()).is_null());
        assert_eq!(
            ferroq_generate(null_mut(), null(), null(), None, null_mut(), null_mut()),
            -1
        );
        assert_eq!(ferroq_tokenize(null(), null(), 0, null_mut(), 0), -1);
        assert_eq!(ferroq_detokenize(null(), null(), 0, 0, null_mut(), 0), -1);
        assert_eq!(ferroq_session_reset(null_mut()), -1);
        ferroq_engine_free(null_mut());
        ferroq_session_free(null_mut());
        ferroq_string_free(null_mut());
        // a successful call clears the error
        let _ = ferroq_gen_params_default();
        assert!(ferroq_engine_load_ms(null()) < 0.0);
    }
}

unsafe extern "C" fn collect(
    user: *mut c_void,
    id: i64,
    piece: *const c_char,
    len: usize,
) -> c_int {
    // SAFETY: `user` is the `(Vec<i64>, Vec<u8>)` passed below; piece/len come from ferroq.
    let (ids, text) = unsafe { &mut *(user as *mut (Vec<i64>, Vec<u8>)) };
    ids.push(id);
    // SAFETY: ferroq passes `len` readable bytes.
    text.extend_from_slice(unsafe { std::slice::from_raw_parts(piece as *const u8, len) });
    0
}

#[test]
fn tokenize_and_generate_through_the_c_abi() {
    let Some(path) = model("tokenize_and_generate_through_the_c_abi") else {
        return;
    };
    let cpath = CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: valid pointers throughout; handles are freed once.
    unsafe {
        let e = ferroq_engine_open(cpath.as_ptr());
        assert!(!e.is_null(), "{}", last_error());
        assert!(ferroq_engine_load_ms(e) >= 0.0);
        let text = CString::new("Hello, world! ünïcödé").unwrap();
        let n = ferroq_tokenize(e, text.as_ptr(), 0, null_mut(), 0);
        assert!(n > 0);
        let mut ids = vec![0u32; n as usize];
        assert_eq!(
            ferroq_tokenize(e, text.as_ptr(), 0, ids.as_mut_ptr(), ids.len()),
            n
        );
        let len = ferroq_detokenize(e, ids.as_ptr(), ids.len(), 0, null_mut(), 0);
        assert_eq!(len as usize, text.as_bytes().len());
        let mut buf = vec![0 as c_char; len as usize + 1];
        ferroq_detokenize(e, ids.as_ptr(), ids.len(), 0, buf.as_mut_ptr(), buf.len());
        assert_eq!(CStr::from_ptr(buf.as_ptr()), text.as_c_str());
        // a too-small buffer is truncated and NUL-terminated
        let mut small = [1 as c_char; 4];
        assert_eq!(
            ferroq_detokenize(e, ids.as_ptr(), ids.len(), 0, small.as_mut_ptr(), 4),
            len
        );
        assert_eq!(CStr::from_ptr(small.as_ptr()).to_bytes(), b"Hel");
        let bad = [u32::MAX];
        assert_eq!(ferroq_detokenize(e, bad.as_ptr(), 1, 0, null_mut(), 0), -1);
        assert!(last_error().contains("vocabulary"));

        let mut sp = ferroq_session_params_default();
        sp.ctx = 256;
        // an absurd thread count is an error, not a crash
        sp.threads = 1_000_000;
        assert!(ferroq_session_new(e, &sp).is_null());
        assert!(last_error().contains("threads"), "{}", last_error());
        sp.threads = 1;
        let s = ferroq_session_new(e, &sp);
        assert!(!s.is_null(), "{}", last_error());
        // the KV cache type through the C struct: 4 = q4 generates; an unknown number is an
        // error naming the field
        let mut sp4 = ferroq_session_params_default();
        sp4.ctx = 128;
        sp4.threads = 1;
        sp4.kv = 9;
        assert!(ferroq_session_new(e, &sp4).is_null());
        assert!(last_error().contains("kv"), "{}", last_error());
        sp4.kv = 4;
        let s4 = ferroq_session_new(e, &sp4);
        assert!(!s4.is_null(), "{}", last_error());
        let mut gp4 = ferroq_gen_params_default();
        gp4.max_tokens = 4;
        let p4 = CString::new("The capital of France is").unwrap();
        let mut out: *mut c_char = null_mut();
        let n4 = ferroq_generate(s4, p4.as_ptr(), &gp4, None, null_mut(), &mut out);
        assert!(n4 > 0, "{}", last_error());
        ferroq_string_free(out);
        ferroq_session_free(s4);

        ferroq_engine_free(e); // the session keeps the engine alive

        let mut gp = ferroq_gen_params_default();
        gp.max_tokens = 12;
        gp.chat = 1;
        let prompt = CString::new("What is the capital of France?").unwrap();
        let mut got: (Vec<i64>, Vec<u8>) = (Vec::new(), Vec::new());
        let mut out: *mut c_char = null_mut();
        let n = ferroq_generate(
            s,
            prompt.as_ptr(),
            &gp,
            Some(collect),
            &mut got as *mut _ as *mut c_void,
            &mut out,
        );
        assert!(n > 0, "{}", last_error());
        assert!(!out.is_null());
        let whole = CStr::from_ptr(out).to_str().unwrap().to_string();
        ferroq_string_free(out);
        assert_eq!(String::from_utf8(got.1).unwrap(), whole);
        assert!(got.0.iter().filter(|&&i| i >= 0).count() as i64 == n);

        // stop strings through the C struct: stop at the first space
        let sp_str = CString::new(" ").unwrap();
        let stops = [sp_str.as_ptr()];
        gp.stop = stops.as_ptr();
        gp.n_stop = 1;
        gp.chat = 0;
        let mut out: *mut c_char = null_mut();
        let p2 = CString::new("The capital of France is").unwrap();
        assert!(ferroq_generate(s, p2.as_ptr(), &gp, None, null_mut(), &mut out) > 0);
        let cut = CStr::from_ptr(out).to_str().unwrap().to_string();
        ferroq_string_free(out);
        assert!(!cut.contains(' '), "{cut:?}");

        // errors keep the session usable
        let empty = CString::new("").unwrap();
        assert_eq!(
            ferroq_generate(s, empty.as_ptr(), &gp, None, null_mut(), null_mut()),
            -1
        );
        assert!(last_error().contains("empty"));
        gp.n_stop = 3;
        gp.stop = null();
        assert_eq!(
            ferroq_generate(s, p2.as_ptr(), &gp, None, null_mut(), null_mut()),
            -1
        );
        assert!(last_error().contains("params.stop"));
        gp.n_stop = 0;
        gp.top_p = f32::NAN;
        assert_eq!(
            ferroq_generate(s, p2.as_ptr(), &gp, None, null_mut(), null_mut()),
            -1
        );
        assert!(last_error().contains("top_p"), "{}", last_error());
        let bad_utf8 = [0xffu8 as c_char, 0];
        assert_eq!(
            ferroq_generate(s, bad_utf8.as_ptr(), null(), None, null_mut(), null_mut()),
            -1
        );
        assert!(last_error().contains("UTF-8"));
        assert_eq!(ferroq_session_reset(s), 0);
        ferroq_session_free(s);
    }
}

#[test]
fn c_program_links_against_the_static_library() {
    let Some(path) = model("c_program_links_against_the_static_library") else {
        return;
    };
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap();
    let lib = [
        deps.join("libferroq.a"),
        deps.parent().unwrap().join("libferroq.a"),
    ]
    .into_iter()
    .find(|p| p.is_file());
    let Some(lib) = lib else {
        eprintln!(
            "!!! SKIPPING the C program: libferroq.a not found next to {}",
            exe.display()
        );
        return;
    };
    if Command::new("cc").arg("--version").output().is_err() {
        eprintln!("!!! SKIPPING the C program: no `cc` on PATH");
        return;
    }
    let root = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("ferroq-c-smoke");
    let cc = Command::new("cc")
        .arg("-std=c99")
        .arg("-Wall")
        .arg("-Werror")
        .arg("-I")
        .arg(root.join("include"))
        .arg(root.join("tests/c/smoke.c"))
        .arg(&lib)
        .args(["-lpthread", "-ldl", "-lm"])
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        cc.status.success(),
        "cc failed:\n{}",
        String::from_utf8_lossy(&cc.stderr)
    );
    let state = out.with_extension("state");
    let run = Command::new(&out).arg(&path).arg(&state).output().unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "C program failed ({}):\n{stdout}\n{}",
        run.status,
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(stdout.contains("C API OK"), "{stdout}");
}

/// llama3-tiny with the SmolLM2 tokenizer cut to its 384 ids (random weights), converted once.
fn tiny_model() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("capi-{}", std::process::id()));
    let out = dir.join("tiny.fqm");
    if out.exists() {
        return out;
    }
    let hf = support::hf_with_tokenizer(&dir.join("hf"), "llama3-tiny", 384);
    support::convert(&hf, &out, "q8")
}

#[test]
fn session_state_save_and_load_through_the_c_abi() {
    let path = tiny_model();
    let dir = path.parent().unwrap().to_path_buf();
    let file = dir.join("system.fqs");
    let cfile = CString::new(file.to_str().unwrap()).unwrap();
    let cpath = CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: valid or NULL pointers throughout (NULL is what is tested); handles freed once.
    unsafe {
        // NULL handles and paths
        assert_eq!(ferroq_session_save(null(), cfile.as_ptr()), -1);
        assert!(last_error().contains("NULL"));
        assert_eq!(ferroq_session_save_prefix(null(), cfile.as_ptr(), 3), -1);
        assert_eq!(ferroq_session_load(null_mut(), cfile.as_ptr()), -1);
        assert!(last_error().contains("session is NULL"));
        assert_eq!(ferroq_session_n_cached(null()), -1);

        let e = ferroq_engine_open(cpath.as_ptr());
        assert!(!e.is_null(), "{}", last_error());
        let mut sp = ferroq_session_params_default();
        sp.ctx = 64;
        sp.threads = 1;
        let a = ferroq_session_new(e, &sp);
        let b = ferroq_session_new(e, &sp);
        assert!(!a.is_null() && !b.is_null(), "{}", last_error());
        assert_eq!(ferroq_session_save(a, null()), -1);
        assert!(last_error().contains("path is NULL"));
        assert_eq!(ferroq_session_load(b, null()), -1);

        let mut gp = ferroq_gen_params_default();
        gp.max_tokens = 6;
        gp.temperature = 0.0;
        let system = CString::new("You are a terse assistant. Answer in one word.").unwrap();
        let question =
            CString::new("You are a terse assistant. Answer in one word. What is red?").unwrap();
        gp.max_tokens = 1;
        assert!(ferroq_generate(a, system.as_ptr(), &gp, None, null_mut(), null_mut()) >= 0);
        let n = ferroq_session_n_cached(a);
        assert!(n > 0);
        assert_eq!(
            ferroq_session_save(a, cfile.as_ptr()),
            n,
            "{}",
            last_error()
        );
        assert_eq!(ferroq_session_save_prefix(a, cfile.as_ptr(), 2), 2);
        assert_eq!(ferroq_session_save(a, cfile.as_ptr()), n);
        gp.max_tokens = 6;
        let mut want: *mut c_char = null_mut();
        assert!(ferroq_generate(a, question.as_ptr(), &gp, None, null_mut(), &mut want) >= 0);
        // the restored session answers the same
        assert_eq!(
            ferroq_session_load(b, cfile.as_ptr()),
            n,
            "{}",
            last_error()
        );
        assert_eq!(ferroq_session_n_cached(b), n);
        let mut got: *mut c_char = null_mut();
        assert!(ferroq_generate(b, question.as_ptr(), &gp, None, null_mut(), &mut got) >= 0);
        assert_eq!(CStr::from_ptr(got), CStr::from_ptr(want));
        ferroq_string_free(got);
        ferroq_string_free(want);

        // bad paths and files: -1, the message names the file, the session keeps its cache
        let before = ferroq_session_n_cached(b);
        let missing = CString::new(dir.join("missing.fqs").to_str().unwrap()).unwrap();
        assert_eq!(ferroq_session_load(b, missing.as_ptr()), -1);
        assert!(last_error().contains("missing.fqs"), "{}", last_error());
        let junk = dir.join("junk.fqs");
        std::fs::write(&junk, vec![7u8; 200]).unwrap();
        let cjunk = CString::new(junk.to_str().unwrap()).unwrap();
        assert_eq!(ferroq_session_load(b, cjunk.as_ptr()), -1);
        assert!(last_error().contains("junk.fqs") && last_error().contains("`magic`"));
        let mut cut = std::fs::read(&file).unwrap();
        cut.truncate(cut.len() - 9);
        std::fs::write(&junk, &cut).unwrap();
        assert_eq!(ferroq_session_load(b, cjunk.as_ptr()), -1);
        assert!(last_error().contains("truncated"), "{}", last_error());
        assert_eq!(ferroq_session_n_cached(b), before);
        let nodir = CString::new(dir.join("no-such-dir/x.fqs").to_str().unwrap()).unwrap();
        assert_eq!(ferroq_session_save(b, nodir.as_ptr()), -1);
        assert!(last_error().contains("no-such-dir"), "{}", last_error());
        let cdir = CString::new(dir.to_str().unwrap()).unwrap();
        assert_eq!(ferroq_session_save(b, cdir.as_ptr()), -1);
        assert_eq!(ferroq_session_load(b, cdir.as_ptr()), -1);
        let bad_utf8 = CString::new(b"/tmp/\xff.fqs".to_vec()).unwrap();
        assert_eq!(ferroq_session_load(b, bad_utf8.as_ptr()), -1);
        assert!(last_error().contains("UTF-8"), "{}", last_error());

        ferroq_session_free(a);
        ferroq_session_free(b);
        ferroq_engine_free(e);
    }
}
