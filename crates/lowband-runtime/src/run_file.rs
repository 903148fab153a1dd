//! The run file: one TOML format for `compare --config`, `cluster --config` and the cluster file
//! that `coordinator` and `site` read (and that `cluster` writes for its site processes).
//!
//! ```toml
//! strategies = ["ddp", "diloco@50"]   # compare: any number; coordinator and site: one
//! preset = "small"                    # every field of RunConfig, at the top level
//! steps = 1000
//! corpus = "kjv.txt"                  # optional: the generated synthetic language otherwise
//! [optimizer]                         # RunConfig's tables: optimizer, link, network
//! lr = 0.001
//! [network]                           # deadlines and retries of a networked run
//! quorum = 3
//! [cluster]                           # the nodes' keys (coordinator, site)
//! coordinator = "<64 hex digits>"     # the coordinator's public key (lowband keygen)
//! sites = ["<hex>", "<hex>"]          # site k is the k-th key; only these keys get in
//! ```
//! Every default is `RunConfig::default()`'s, stated once there; the command-line flags override
//! the file. A relative `corpus` (or `model.initial`) is relative to the file's directory. An
//! external model's run file has a `[model]` table (see `crate::external`). The binary and the
//! Python package read it here, so both read the same files the same way.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::RunConfig;

/// A run file that cannot be used: one line naming the file and the field.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct RunFileError(pub String);

type Result<T> = std::result::Result<T, RunFileError>;

macro_rules! bail {
    ($($arg:tt)*) => { return Err(RunFileError(format!($($arg)*))) };
}

/// Largest run file read (a settings file, not data).
pub const RUN_FILE_BYTES_MAX: u64 = 16 << 20;

/// A whole text file of at most `limit` bytes.
fn read_text(path: &Path, limit: u64) -> Result<String> {
    use lowband_data::DataError;
    let bytes = lowband_data::corpus::read_bounded(path, limit).map_err(|e| match e {
        DataError::TooLarge { .. } => RunFileError(format!(
            "{}: more than {limit} bytes: not a settings file",
            path.display()
        )),
        other => RunFileError(other.to_string()),
    })?;
    String::from_utf8(bytes)
        .map_err(|_| RunFileError(format!("{}: not UTF-8 text", path.display())))
}

/// A TOML syntax error on one line: "FILE: line N: not valid TOML: message".
fn syntax_error(path: &Path, text: &str, error: &toml::de::Error) -> RunFileError {
    let line = error
        .span()
        .map(|span| text[..span.start.min(text.len())].matches('\n').count() + 1);
    let message = error.message().trim();
    RunFileError(match line {
        Some(line) => format!("{}: line {line}: not valid TOML: {message}", path.display()),
        None => format!("{}: not valid TOML: {message}", path.display()),
    })
}

/// A run file, read.
#[derive(Clone, Debug, Default)]
pub struct RunFile {
    pub run: RunConfig,
    /// The strategies named in the file (None: the command's default).
    pub strategies: Option<Vec<String>>,
    /// The nodes' keys (a cluster file).
    pub cluster: Option<ClusterKeys>,
}

/// The keys of a cluster: the coordinator's, and one per site (site k is the k-th).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterKeys {
    pub coordinator: String,
    pub sites: Vec<String>,
}

impl RunFile {
    /// Read and check a run file; every error names the file and the field.
    pub fn read(path: &Path) -> Result<RunFile> {
        let text = read_text(path, RUN_FILE_BYTES_MAX)?;
        let mut table: toml::Table = text.parse().map_err(|e| syntax_error(path, &text, &e))?;
        refuse_old_cluster_format(path, &table)?;
        let strategies = match table.remove("strategies") {
            None => None,
            Some(toml::Value::Array(items)) => Some(
                items
                    .into_iter()
                    .map(|v| {
                        v.as_str().map(str::to_owned).ok_or_else(|| {
                            RunFileError(format!(
                                "{}: strategies: every entry must be a string",
                                path.display()
                            ))
                        })
                    })
                    .collect::<Result<_>>()?,
            ),
            Some(_) => bail!(
                "{}: strategies: must be an array of strings, e.g. [\"diloco@50\"]",
                path.display()
            ),
        };
        let cluster = match table.remove("cluster") {
            None => None,
            Some(value) => Some(value.try_into::<ClusterKeys>().map_err(|e| {
                RunFileError(format!(
                    "{}: cluster: {}",
                    path.display(),
                    e.message().trim()
                ))
            })?),
        };
        // The rest is a RunConfig. Deserialize it from text (the table written back without the
        // keys above) so that an error carries a span, from which the field is named.
        let rest = toml::to_string(&table).map_err(|e| {
            RunFileError(format!("{}: re-reading the settings: {e}", path.display()))
        })?;
        let mut run: RunConfig = toml::from_str(&rest).map_err(|e| field_error(path, &rest, &e))?;
        let base = path.parent().unwrap_or(Path::new(""));
        if let Some(corpus) = run.corpus.take() {
            run.corpus = Some(base.join(corpus));
        }
        if let Some(initial) = run.model.as_mut().and_then(|m| m.initial.take()) {
            run.model.as_mut().expect("taken from it").initial = Some(base.join(initial));
        }
        Ok(RunFile {
            run,
            strategies,
            cluster,
        })
    }

    /// The file's text (what `read` reads back to the same settings).
    pub fn to_toml(&self) -> Result<String> {
        let mut table = toml::Table::new();
        if let Some(strategies) = &self.strategies {
            table.insert(
                "strategies".into(),
                toml::Value::Array(strategies.iter().map(|s| s.clone().into()).collect()),
            );
        }
        let run = toml::Value::try_from(&self.run)
            .map_err(|e| RunFileError(format!("writing the run settings: {e}")))?;
        if let toml::Value::Table(run) = run {
            table.extend(run);
        }
        if let Some(cluster) = &self.cluster {
            let cluster = toml::Value::try_from(cluster)
                .map_err(|e| RunFileError(format!("writing the cluster keys: {e}")))?;
            table.insert("cluster".into(), cluster);
        }
        toml::to_string(&table).map_err(|e| RunFileError(format!("writing the run file: {e}")))
    }
}

/// Cluster files written before the run file was one format: say what changed.
fn refuse_old_cluster_format(path: &Path, table: &toml::Table) -> Result<()> {
    let old = [
        ("strategy", "write `strategies = [\"NAME\"]`"),
        ("run", "the [run] fields go at the top level"),
        (
            "coordinator",
            "the keys go in a [cluster] table: coordinator = ..., sites = [...]",
        ),
    ];
    for (key, instead) in old {
        if table.contains_key(key) {
            bail!(
                "{}: `{key}` is the old cluster file format: {instead} (one format for compare --config and cluster files; see `lowband coordinator --help`)",
                path.display()
            );
        }
    }
    if matches!(table.get("sites"), Some(toml::Value::Array(_))) {
        bail!("{}: sites: the site keys go in a [cluster] table (`sites` at the top level is the number of sites)", path.display());
    }
    Ok(())
}

/// One line naming the field: "FILE: optimizer.lr: invalid type: ...".
fn field_error(path: &Path, text: &str, error: &toml::de::Error) -> RunFileError {
    let message = error.message().trim();
    let Some(span) = error.span() else {
        return RunFileError(format!("{}: {message}", path.display()));
    };
    let before = &text[..span.start.min(text.len())];
    let line = text[before.rfind('\n').map_or(0, |i| i + 1)..]
        .lines()
        .next()
        .unwrap_or("");
    let table = before
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').to_string());
    let key = line.split('=').next().unwrap_or("").trim();
    let field = match (table, key.is_empty()) {
        (Some(t), false) => format!("{t}.{key}: "),
        (None, false) => format!("{key}: "),
        _ => String::new(),
    };
    RunFileError(format!("{}: {field}{message}", path.display()))
}

/// A cluster file, checked: the keys parse and differ, the sites match, one round strategy.
#[derive(Clone, Debug)]
pub struct Cluster {
    pub config: RunConfig,
    pub strategy: crate::Strategy,
    pub coordinator: lowband_net::PublicKey,
    /// Site k's key is the k-th.
    pub sites: Vec<lowband_net::PublicKey>,
}

impl Cluster {
    /// Read a cluster file (a run file with one strategy and a `[cluster]` table of keys).
    pub fn read(path: &Path) -> Result<Cluster> {
        Cluster::of(RunFile::read(path)?, path)
    }

    /// The cluster a run file describes (`path` names it in errors).
    pub fn of(file: RunFile, path: &Path) -> Result<Cluster> {
        let Some(keys) = file.cluster else {
            bail!("{}: no [cluster] table: a cluster file names the coordinator's key and the sites' keys (coordinator = ..., sites = [...])", path.display());
        };
        let coordinator: lowband_net::PublicKey = keys
            .coordinator
            .parse()
            .map_err(|e| RunFileError(format!("{}: cluster.coordinator: {e}", path.display())))?;
        let sites: Vec<lowband_net::PublicKey> = keys
            .sites
            .iter()
            .enumerate()
            .map(|(k, s)| {
                s.parse().map_err(|e| {
                    RunFileError(format!("{}: cluster.sites[{k}]: {e}", path.display()))
                })
            })
            .collect::<Result<_>>()?;
        if sites.is_empty() {
            bail!(
                "{}: cluster.sites: list at least one site key",
                path.display()
            );
        }
        for (k, key) in sites.iter().enumerate() {
            if *key == coordinator {
                bail!("{}: cluster.sites[{k}] is the coordinator's key: a node is either the coordinator or a site", path.display());
            }
            if let Some(first) = sites[..k].iter().position(|other| other == key) {
                bail!(
                    "{}: cluster.sites[{k}] repeats cluster.sites[{first}]: every site has its own key",
                    path.display()
                );
            }
        }
        let mut config = file.run;
        let default_sites = RunConfig::default().sites;
        if config.sites != default_sites && config.sites != sites.len() {
            bail!(
                "{}: sites = {} but [cluster] lists {} site keys (leave `sites` out: the keys count them)",
                path.display(),
                config.sites,
                sites.len()
            );
        }
        config.sites = sites.len();
        config.validate().map_err(|(field, reason)| {
            RunFileError(format!("{}: {field}: {reason}", path.display()))
        })?;
        let strategy = match file.strategies.as_deref() {
            Some([one]) => crate::Strategy::parse(one, config.inner_steps)
                .map_err(|e| RunFileError(format!("{}: strategies: {e}", path.display())))?,
            Some(many) => bail!(
                "{}: strategies: a cluster runs one strategy, the file names {}",
                path.display(),
                many.len()
            ),
            None => bail!(
                "{}: strategies: name the cluster's strategy, e.g. strategies = [\"diloco@50\"]",
                path.display()
            ),
        };
        Ok(Cluster {
            config,
            strategy,
            coordinator,
            sites,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_file_reads_back_what_it_wrote() {
        let dir = tempfile::tempdir().unwrap();
        let file = RunFile {
            run: RunConfig {
                steps: 24,
                seed: 7,
                corpus: Some(dir.path().join("kjv.txt")),
                network: crate::config::NetworkConfig {
                    quorum: 3,
                    ..Default::default()
                },
                ..RunConfig::default()
            },
            strategies: Some(vec!["diloco@4".into()]),
            cluster: Some(ClusterKeys {
                coordinator: "ab".repeat(32),
                sites: vec!["cd".repeat(32)],
            }),
        };
        let path = dir.path().join("run.toml");
        std::fs::write(&path, file.to_toml().unwrap()).unwrap();
        let back = RunFile::read(&path).unwrap();
        assert_eq!(back.run, file.run);
        assert_eq!(back.strategies, file.strategies);
        assert_eq!(back.cluster, file.cluster);
    }

    #[test]
    fn the_old_cluster_format_is_refused_with_what_changed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cluster.toml");
        std::fs::write(&path, "strategy = \"diloco@4\"\n[run]\nsteps = 4\n").unwrap();
        let error = RunFile::read(&path).unwrap_err().to_string();
        assert!(
            error.contains("strategies = [\\\"NAME\\\"]")
                || error.contains("strategies = [\"NAME\"]"),
            "{error}"
        );
        std::fs::write(&path, "steps = 4\n[optimizer]\nlr = \"fast\"\n").unwrap();
        let error = RunFile::read(&path).unwrap_err().to_string();
        assert!(error.contains("optimizer.lr"), "{error}");
    }
}
