//! Corpora for lowband (no ML framework, no async): read bytes from files, hold a validation
//! split out, cut the training part into per-site shards, draw seeded batches, and generate a
//! synthetic language whose entropy rate is known exactly.

pub mod corpus;
pub mod synthetic;

pub use corpus::{read_corpus, Corpus, CorpusFingerprint, DataError, Sampler, ShardMode, Split};
pub use synthetic::{SyntheticLanguage, SyntheticSpec};
