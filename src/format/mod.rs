//! The `.fqm` model file format (see `SPEC.md` beside this file).
