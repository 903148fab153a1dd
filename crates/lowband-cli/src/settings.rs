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
//! the file. A relative `corpus` is relative to the file's directory.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use lowband_runtime::RunConfig;
use serde::{Deserialize, Serialize};

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
        let text = crate::files::read_text(path, crate::files::SETTINGS_BYTES_MAX)?;
        let mut table: toml::Table = text
            .parse()
            .map_err(|e| crate::files::toml_error(path, &text, &e, true))?;
        refuse_old_cluster_format(path, &table)?;
        let strategies = match table.remove("strategies") {
            None => None,
            Some(toml::Value::Array(items)) => Some(
                items
                    .into_iter()
                    .map(|v| {
                        v.as_str().map(str::to_owned).with_context(|| {
                            format!(
                                "{}: strategies: every entry must be a string",
                                path.display()
                            )
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
                anyhow::anyhow!("{}: cluster: {}", path.display(), e.message().trim())
            })?),
        };
        // The rest is a RunConfig. Deserialize it from text (the table written back without the
        // keys above) so that an error carries a span, from which the field is named.
        let rest = toml::to_string(&table)
            .with_context(|| format!("{}: re-reading the settings", path.display()))?;
        let mut run: RunConfig = toml::from_str(&rest).map_err(|e| field_error(path, &rest, &e))?;
        if let Some(corpus) = run.corpus.take() {
            let base = path.parent().unwrap_or(Path::new(""));
            run.corpus = Some(base.join(corpus));
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
        let run = toml::Value::try_from(&self.run).context("writing the run settings")?;
        if let toml::Value::Table(run) = run {
            table.extend(run);
        }
        if let Some(cluster) = &self.cluster {
            table.insert("cluster".into(), toml::Value::try_from(cluster)?);
        }
        Ok(toml::to_string(&table)?)
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
fn field_error(path: &Path, text: &str, error: &toml::de::Error) -> anyhow::Error {
    let message = error.message().trim();
    let Some(span) = error.span() else {
        return anyhow::anyhow!("{}: {message}", path.display());
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
    anyhow::anyhow!("{}: {field}{message}", path.display())
}

/// An absolute form of a corpus path, for a file other processes read from elsewhere.
pub fn absolute(path: &Path) -> Result<PathBuf> {
    std::fs::canonicalize(path).with_context(|| format!("{}", path.display()))
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
                network: lowband_runtime::config::NetworkConfig {
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
