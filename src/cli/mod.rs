//! One module per subcommand.

pub mod bench;
pub mod chat;
pub mod convert;
pub mod generate;
pub mod imatrix;
pub mod inspect;
pub mod logits;
pub mod perplexity;
pub mod run;
#[cfg(feature = "server")]
pub mod serve;
pub mod synth;
pub mod tokenize;
pub mod verify;
