//! Byte corpora: reading, the train / validation split, shards, and the batch sampler.

use std::path::{Path, PathBuf};

use rand_chacha::ChaCha8Rng;
use rand_core::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// Largest corpus read into memory (the split and the shards copy it, so a run holds about
/// three times this).
pub const CORPUS_BYTES_MAX: u64 = 4 << 30;

/// Read a whole file, refusing one of more than `limit` bytes: checked against its size first
/// and while reading, so a device or a pipe (whose size reads as 0, such as `/dev/zero`) is read
/// no further than the limit.
pub fn read_bounded(path: &Path, limit: u64) -> Result<Vec<u8>, DataError> {
    use std::io::Read;
    let io = |e| DataError::Io {
        path: path.to_path_buf(),
        source: e,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let size = file.metadata().map_err(io)?.len();
    let too_large = |bytes| DataError::TooLarge {
        path: path.to_path_buf(),
        bytes,
        limit,
    };
    if size > limit {
        return Err(too_large(size));
    }
    let mut bytes = Vec::with_capacity(size as usize);
    file.take(limit.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(io)?;
    if bytes.len() as u64 > limit {
        return Err(too_large(bytes.len() as u64));
    }
    Ok(bytes)
}

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("corpus {0}: is empty")]
    Empty(String),
    #[error("corpus {what}: {len} bytes is too short: {reason}")]
    TooShort {
        what: String,
        len: usize,
        reason: String,
    },
    #[error("corpus {}: {bytes} bytes exceed the limit of {limit}", path.display())]
    TooLarge {
        path: PathBuf,
        bytes: u64,
        limit: u64,
    },
    #[error("invalid data setting {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
}

/// The bytes of a corpus and where they came from.
#[derive(Clone, Debug)]
pub struct Corpus {
    pub bytes: Vec<u8>,
    pub source: String,
}

/// Read a file, or every regular file under a directory (sorted by path, each followed by a
/// newline), as bytes.
pub fn read_corpus(path: &Path) -> Result<Corpus, DataError> {
    let io = |e| DataError::Io {
        path: path.to_path_buf(),
        source: e,
    };
    let meta = std::fs::metadata(path).map_err(io)?;
    let mut files = Vec::new();
    if meta.is_dir() {
        collect_files(path, &mut files)?;
        files.sort();
    } else {
        files.push(path.to_path_buf());
    }
    let mut bytes = Vec::new();
    for f in &files {
        // Each file within what is left of the limit (sizes are checked as read, not trusted).
        let left = CORPUS_BYTES_MAX.saturating_sub(bytes.len() as u64);
        let mut content = read_bounded(f, left).map_err(|e| match e {
            DataError::TooLarge { .. } => DataError::TooLarge {
                path: path.to_path_buf(),
                bytes: bytes.len() as u64 + left + 1,
                limit: CORPUS_BYTES_MAX,
            },
            other => other,
        })?;
        bytes.append(&mut content);
        if meta.is_dir() {
            bytes.push(b'\n');
        }
    }
    if bytes.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(DataError::Empty(path.display().to_string()));
    }
    Ok(Corpus {
        bytes,
        source: path.display().to_string(),
    })
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), DataError> {
    let entries = std::fs::read_dir(dir).map_err(|e| DataError::Io {
        path: dir.to_path_buf(),
        source: e,
    })?;
    for entry in entries {
        let entry = entry.map_err(|e| DataError::Io {
            path: dir.to_path_buf(),
            source: e,
        })?;
        let kind = entry.file_type().map_err(|e| DataError::Io {
            path: entry.path(),
            source: e,
        })?;
        if kind.is_dir() {
            collect_files(&entry.path(), out)?;
        } else if kind.is_file() {
            out.push(entry.path());
        }
    }
    Ok(())
}

/// How the training split is divided among sites.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ShardMode {
    /// Blocks dealt round-robin (at most `IID_BLOCK_BYTES`, and small enough that each site gets
    /// about 64): every site sees all parts of the corpus.
    Iid,
    /// K contiguous regions, one per site (the reference's sharding): sites see different text.
    NonIid,
}

/// Largest block of `ShardMode::Iid`.
pub const IID_BLOCK_BYTES: usize = 1 << 16;

/// The corpus cut into a training part (sharded) and a held-out validation part no site trains on.
#[derive(Clone, Debug)]
pub struct Split {
    pub shards: Vec<Vec<u8>>,
    pub validation: Vec<u8>,
    pub train_bytes: usize,
}

/// What identifies the text of a run: the bytes and checksums of its shards (in site order) and
/// of its validation split. A resumed run and every node of a cluster must have the same one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CorpusFingerprint {
    pub train_bytes: u64,
    pub shards: usize,
    pub train_crc32: u32,
    pub validation_bytes: u64,
    pub validation_crc32: u32,
}

impl std::fmt::Display for CorpusFingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} training bytes in {} shards (crc32 {:08x}), {} validation bytes (crc32 {:08x})",
            self.train_bytes,
            self.shards,
            self.train_crc32,
            self.validation_bytes,
            self.validation_crc32
        )
    }
}

impl Split {
    /// The split's fingerprint (one pass over its bytes).
    pub fn fingerprint(&self) -> CorpusFingerprint {
        let mut train = crc32fast::Hasher::new();
        for shard in &self.shards {
            train.update(&(shard.len() as u64).to_le_bytes());
            train.update(shard);
        }
        CorpusFingerprint {
            train_bytes: self.shards.iter().map(|s| s.len() as u64).sum(),
            shards: self.shards.len(),
            train_crc32: train.finalize(),
            validation_bytes: self.validation.len() as u64,
            validation_crc32: crc32fast::hash(&self.validation),
        }
    }

    /// How many of `len` bytes train: the first `1 − validation_fraction` (the rest validate).
    /// Tuning runs keep only these bytes, so that their own held-out part comes from training
    /// text and the validation split stays untouched.
    pub fn train_len(len: usize, validation_fraction: f64) -> usize {
        (len as f64 * (1.0 - validation_fraction)) as usize
    }

    /// The first `1 − validation_fraction` of the bytes train, the rest validate (as the
    /// reference: 95% / 5%); the train part is cut into `sites` shards. Every shard and the
    /// validation part must hold at least one window of `context + 1` bytes.
    pub fn new(
        bytes: &[u8],
        validation_fraction: f64,
        sites: usize,
        mode: ShardMode,
        context: usize,
    ) -> Result<Split, DataError> {
        if sites == 0 {
            return Err(DataError::Invalid {
                field: "sites",
                reason: "must be at least 1".into(),
            });
        }
        if !(validation_fraction > 0.0 && validation_fraction < 1.0) {
            return Err(DataError::Invalid {
                field: "validation_fraction",
                reason: "must be in (0, 1)".into(),
            });
        }
        let (train, validation) =
            bytes.split_at(Split::train_len(bytes.len(), validation_fraction));
        let window = context + 1;
        if validation.len() < window {
            return Err(DataError::TooShort {
                what: "validation split".into(),
                len: validation.len(),
                reason: format!("needs at least one window of {window} bytes (context + 1)"),
            });
        }
        let shards: Vec<Vec<u8>> = match mode {
            ShardMode::NonIid => {
                let len = train.len() / sites;
                (0..sites)
                    .map(|k| train[k * len..(k + 1) * len].to_vec())
                    .collect()
            }
            ShardMode::Iid => {
                let mut shards = vec![Vec::new(); sites];
                let block_bytes = (train.len() / (sites * 64)).clamp(1, IID_BLOCK_BYTES);
                for (i, block) in train.chunks(block_bytes).enumerate() {
                    shards[i % sites].extend_from_slice(block);
                }
                shards
            }
        };
        if let Some((k, s)) = shards.iter().enumerate().find(|(_, s)| s.len() < window) {
            return Err(DataError::TooShort {
                what: format!("shard of site {k}"),
                len: s.len(),
                reason: format!("needs at least one window of {window} bytes; use fewer sites or a longer corpus"),
            });
        }
        Ok(Split {
            shards,
            validation: validation.to_vec(),
            train_bytes: train.len(),
        })
    }

    /// Non-overlapping windows of the validation split: (inputs, targets) of `count` x `context`,
    /// the evaluation protocol of the reference (all (len − 1) / context full windows).
    pub fn validation_windows(&self, context: usize) -> (Vec<u32>, Vec<u32>, usize) {
        windows(&self.validation, context)
    }
}

/// All non-overlapping full windows of `bytes`: inputs, targets (shifted by one) and their count.
pub fn windows(bytes: &[u8], context: usize) -> (Vec<u32>, Vec<u32>, usize) {
    let count = bytes.len().saturating_sub(1) / context;
    let mut inputs = Vec::with_capacity(count * context);
    let mut targets = Vec::with_capacity(count * context);
    for w in 0..count {
        let start = w * context;
        inputs.extend(bytes[start..start + context].iter().map(|&b| b as u32));
        targets.extend(
            bytes[start + 1..start + context + 1]
                .iter()
                .map(|&b| b as u32),
        );
    }
    (inputs, targets, count)
}

/// Draws batches of random windows from one shard, deterministically from its seed.
#[derive(Clone, Debug)]
pub struct Sampler {
    rng: ChaCha8Rng,
    /// Windows drawn so far (the position to resume from).
    pub drawn: u64,
    seed: u64,
}

impl Sampler {
    pub fn new(seed: u64) -> Self {
        Sampler {
            rng: ChaCha8Rng::seed_from_u64(seed),
            drawn: 0,
            seed,
        }
    }

    /// A sampler that continues after `drawn` windows of a sampler with the same seed. Each
    /// window takes one `next_u64` (two 32-bit words of the ChaCha stream), so this seeks.
    pub fn resume(seed: u64, drawn: u64) -> Self {
        let mut s = Sampler::new(seed);
        s.rng.set_word_pos(2 * drawn as u128);
        s.drawn = drawn;
        s
    }

    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Fill `inputs` and `targets` with `batch` windows of `context` bytes from `shard`.
    pub fn fill(
        &mut self,
        shard: &[u8],
        batch: usize,
        context: usize,
        inputs: &mut Vec<u32>,
        targets: &mut Vec<u32>,
    ) {
        assert!(
            shard.len() > context,
            "shard shorter than a window (checked by Split::new)"
        );
        inputs.clear();
        targets.clear();
        let positions = (shard.len() - context) as u64;
        for _ in 0..batch {
            // Lemire-style multiply-shift: uniform enough over < 2^32 positions, one draw each.
            let start = (((self.rng.next_u64() >> 32) * positions) >> 32) as usize;
            self.drawn += 1;
            inputs.extend(shard[start..start + context].iter().map(|&b| b as u32));
            targets.extend(
                shard[start + 1..start + context + 1]
                    .iter()
                    .map(|&b| b as u32),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_holds_validation_out_and_shards_cover_train() {
        let bytes: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        for mode in [ShardMode::Iid, ShardMode::NonIid] {
            let s = Split::new(&bytes, 0.05, 4, mode, 16).unwrap();
            assert_eq!(s.validation, bytes[190_000..]);
            let total: usize = s.shards.iter().map(|x| x.len()).sum();
            assert!(total <= 190_000 && total > 190_000 - 4);
        }
        let non_iid = Split::new(&bytes, 0.05, 4, ShardMode::NonIid, 16).unwrap();
        assert_eq!(non_iid.shards[1], bytes[47_500..95_000]);
    }

    #[test]
    fn a_tuning_split_never_sees_the_validation_bytes() {
        let bytes: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let full = Split::new(&bytes, 0.05, 4, ShardMode::NonIid, 16).unwrap();
        let training = &bytes[..Split::train_len(bytes.len(), 0.05)];
        assert_eq!(training.len(), full.train_bytes);
        let tuning = Split::new(training, 0.05, 4, ShardMode::NonIid, 16).unwrap();
        // Its held-out part is the end of the training split, its shards come before it.
        assert_eq!(tuning.validation, bytes[180_500..190_000]);
        assert_eq!(tuning.train_bytes, 180_500);
        assert_eq!(tuning.shards[3], bytes[135_375..180_500]);
    }

    #[test]
    fn too_short_corpus_and_zero_sites_are_refused() {
        assert!(matches!(
            Split::new(&[1u8; 100], 0.05, 1, ShardMode::Iid, 16),
            Err(DataError::TooShort { .. })
        ));
        assert!(matches!(
            Split::new(&[1u8; 10_000], 0.05, 0, ShardMode::Iid, 16),
            Err(DataError::Invalid { .. })
        ));
        assert!(matches!(
            Split::new(&[1u8; 10_000], 0.05, 1000, ShardMode::NonIid, 16),
            Err(DataError::TooShort { .. })
        ));
    }

    #[test]
    fn sampler_is_deterministic_and_resumes_where_it_stopped() {
        let shard: Vec<u8> = (0..5000u32).map(|i| (i * 7 % 256) as u8).collect();
        let (mut a_in, mut a_t, mut b_in, mut b_t) = (vec![], vec![], vec![], vec![]);
        let mut a = Sampler::new(9);
        a.fill(&shard, 4, 32, &mut a_in, &mut a_t);
        a.fill(&shard, 4, 32, &mut a_in, &mut a_t);
        let mut b = Sampler::resume(9, 4);
        b.fill(&shard, 4, 32, &mut b_in, &mut b_t);
        assert_eq!(a_in, b_in);
        assert_eq!(a_t, b_t);
        // Far into the stream too (seeking, not replaying).
        let mut far = Sampler::new(9);
        let (mut f_in, mut f_t) = (vec![], vec![]);
        for _ in 0..1001 {
            far.fill(&shard, 3, 32, &mut f_in, &mut f_t);
        }
        let mut sought = Sampler::resume(9, 3000);
        sought.fill(&shard, 3, 32, &mut b_in, &mut b_t);
        assert_eq!(f_in, b_in);
        assert_eq!(
            &a_in[1..32],
            &a_t[..31],
            "targets are inputs shifted by one"
        );
    }

    #[test]
    fn windows_are_non_overlapping_and_complete() {
        let bytes: Vec<u8> = (0..100u8).collect();
        let (inputs, targets, count) = windows(&bytes, 10);
        assert_eq!(count, 9);
        assert_eq!(inputs[..10], (0..10).collect::<Vec<u32>>()[..]);
        assert_eq!(targets[80..90], (81..91).collect::<Vec<u32>>()[..]);
    }

    #[test]
    fn missing_and_empty_files_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            read_corpus(&dir.path().join("nope.txt")),
            Err(DataError::Io { .. })
        ));
        let empty = dir.path().join("empty.txt");
        std::fs::write(&empty, "  \n").unwrap();
        assert!(matches!(read_corpus(&empty), Err(DataError::Empty(_))));
    }
}
