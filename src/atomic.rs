//! One way to write an output file: [`AtomicFile`]. The bytes go to a temporary file in the
//! destination's directory (so the final rename is atomic: same file system), which becomes the
//! destination only when complete ([`AtomicFile::commit`]); on error, on drop, and — when the
//! front end calls [`remove_temp_files_on_signal`] — on SIGINT/SIGTERM, the temporary file is
//! removed. A failed run therefore loses or overwrites nothing. Errors name the user's path,
//! never the temporary one.

use crate::{Error, Result};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// An output file being written (see the module docs).
pub struct AtomicFile {
    dest: PathBuf,
    tmp: PathBuf,
    out: Option<BufWriter<File>>,
    slot: Option<usize>,
    /// Renamed into place: nothing to remove.
    done: bool,
}

/// Whether `a` and `b` name the same file (both must exist).
fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// Refuse `dest` when it is a directory or one of `inputs` (an input directory counts for the
/// files directly in it, except `.fqm` outputs: `convert DIR -o DIR/model.fqm` is fine,
/// `convert DIR -o DIR/config.json` would overwrite what it reads).
pub fn check_output(dest: &Path, inputs: &[&Path]) -> Result<()> {
    if dest.is_dir() {
        return Err(Error::Input(format!(
            "{}: is a directory; give the output file's name (e.g. {})",
            dest.display(),
            dest.join("out").display()
        )));
    }
    if dest.file_name().is_none() {
        return Err(Error::Input(format!("{}: not a file path", dest.display())));
    }
    if !dest.exists() {
        return Ok(());
    }
    for &inp in inputs {
        let clash = if inp.is_dir() {
            let is_fqm = dest.extension().is_some_and(|e| e == "fqm");
            !is_fqm
                && dest
                    .canonicalize()
                    .ok()
                    .and_then(|d| d.parent().map(Path::to_path_buf))
                    .is_some_and(|p| same_file(&p, inp))
        } else {
            same_file(dest, inp)
        };
        if clash {
            return Err(Error::Input(format!(
                "{}: the output would overwrite an input ({}); choose another output path",
                dest.display(),
                inp.display()
            )));
        }
    }
    Ok(())
}

impl AtomicFile {
    /// Start writing `dest` (nothing at `dest` is touched before [`AtomicFile::commit`]).
    /// `inputs` are the files (or directories) the output is made from: `dest` may not be one
    /// of them.
    pub fn create(dest: impl AsRef<Path>, inputs: &[&Path]) -> Result<AtomicFile> {
        let dest = dest.as_ref().to_path_buf();
        check_output(&dest, inputs)?;
        let file_name = dest
            .file_name()
            .ok_or_else(|| Error::Input(format!("{}: not a file path", dest.display())))?;
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(file_name);
        tmp_name.push(format!(".tmp-{}-{n}", std::process::id()));
        let tmp = dest.with_file_name(tmp_name);
        let f = File::create(&tmp).map_err(|e| match dest.parent() {
            Some(dir) if !dir.as_os_str().is_empty() && !dir.is_dir() => Error::Input(format!(
                "{}: cannot create it: the directory {} does not exist",
                dest.display(),
                dir.display()
            )),
            _ => Error::io(&dest, e),
        })?;
        let slot = signal::register(&tmp);
        Ok(AtomicFile {
            dest,
            tmp,
            out: Some(BufWriter::with_capacity(1 << 20, f)),
            slot,
            done: false,
        })
    }

    /// The final path.
    pub fn dest(&self) -> &Path {
        &self.dest
    }

    /// An I/O error about this output (named by its final path).
    pub fn io_err(&self, e: std::io::Error) -> Error {
        Error::io(&self.dest, e)
    }

    /// The buffered writer.
    pub fn writer(&mut self) -> &mut BufWriter<File> {
        self.out.as_mut().expect("AtomicFile used after commit")
    }

    /// Append bytes.
    pub fn write_all(&mut self, b: &[u8]) -> Result<()> {
        let r = self.writer().write_all(b);
        r.map_err(|e| self.io_err(e))
    }

    /// Flush and sync the temporary file, run `check` on its complete contents (e.g. re-open
    /// and validate it), and only then rename it to the destination.
    pub fn commit_checked(mut self, check: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
        let out = self.out.take().expect("commit called once");
        let f = out
            .into_inner()
            .map_err(|e| Error::io(&self.dest, e.into_error()))?;
        f.sync_all().map_err(|e| self.io_err(e))?;
        drop(f);
        // on an error below, Drop removes the temporary file
        check(&self.tmp)?;
        std::fs::rename(&self.tmp, &self.dest).map_err(|e| self.io_err(e))?;
        self.done = true;
        Ok(())
    }

    /// [`AtomicFile::commit_checked`] without a check.
    pub fn commit(self) -> Result<()> {
        self.commit_checked(|_| Ok(()))
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if !self.done {
            drop(self.out.take());
            let _ = std::fs::remove_file(&self.tmp);
        }
        if let Some(s) = self.slot.take() {
            signal::unregister(s);
        }
    }
}

/// Remove the temporary files of unfinished [`AtomicFile`]s when the process gets SIGINT or
/// SIGTERM, then die of that signal as usual (exit status 130 / 143 in a shell). For front ends
/// (the `ferroq` CLI calls it first thing); a library embedded in a host must not take over the
/// host's signals, so nothing installs it implicitly. No-op off Unix.
pub fn remove_temp_files_on_signal() {
    signal::install();
}

#[cfg(unix)]
mod signal {
    //! The registry is a fixed table of C-string pointers, read by the handler with atomic
    //! loads only (async-signal-safe: no lock, no allocation); the handler calls `unlink` and
    //! re-raises the signal with the default action. Registered strings are leaked when
    //! unregistered (a handler on another thread may be reading one; a few bytes per output).
    use std::ffi::{c_char, c_int, CString};
    use std::path::Path;
    use std::sync::atomic::{AtomicBool, AtomicPtr, Ordering};

    const SLOTS: usize = 64;
    static PATHS: [AtomicPtr<c_char>; SLOTS] =
        [const { AtomicPtr::new(std::ptr::null_mut()) }; SLOTS];
    static INSTALLED: AtomicBool = AtomicBool::new(false);
    const SIGINT: c_int = 2;
    const SIGTERM: c_int = 15;
    const SIG_DFL: usize = 0;

    extern "C" {
        fn signal(sig: c_int, handler: usize) -> usize;
        fn unlink(path: *const c_char) -> c_int;
        fn raise(sig: c_int) -> c_int;
    }

    extern "C" fn on_signal(sig: c_int) {
        for p in &PATHS {
            let s = p.load(Ordering::Acquire);
            if !s.is_null() {
                // SAFETY: a pointer in the table is a leaked, NUL-terminated CString (never
                // freed); unlink and raise are async-signal-safe.
                unsafe { unlink(s) };
            }
        }
        // SAFETY: restoring the default action and re-raising is the documented way to die of
        // the signal after cleaning up.
        unsafe {
            signal(sig, SIG_DFL);
            raise(sig);
        }
    }

    pub fn install() {
        if INSTALLED.swap(true, Ordering::AcqRel) {
            return;
        }
        let h = on_signal as extern "C" fn(c_int) as usize;
        // SAFETY: installs a handler that only performs async-signal-safe calls.
        unsafe {
            signal(SIGINT, h);
            signal(SIGTERM, h);
        }
    }

    pub fn register(path: &Path) -> Option<usize> {
        use std::os::unix::ffi::OsStrExt;
        let c = CString::new(path.as_os_str().as_bytes()).ok()?;
        let raw = c.into_raw();
        for (i, p) in PATHS.iter().enumerate() {
            if p.compare_exchange(
                std::ptr::null_mut(),
                raw,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
            {
                return Some(i);
            }
        }
        // table full (64 outputs at once): still removed on error and drop, not on a signal
        // SAFETY: `raw` came from CString::into_raw just above and was not stored.
        drop(unsafe { CString::from_raw(raw) });
        None
    }

    pub fn unregister(slot: usize) {
        // leaked on purpose (see the module docs)
        PATHS[slot].store(std::ptr::null_mut(), Ordering::Release);
    }
}

#[cfg(not(unix))]
mod signal {
    use std::path::Path;
    pub fn install() {}
    pub fn register(_: &Path) -> Option<usize> {
        None
    }
    pub fn unregister(_: usize) {}
}
