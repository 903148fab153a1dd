//! `lowband coordinator` and `lowband site`: the nodes of a cluster as separate processes.
//!
//! Both read the same cluster file (TOML):
//! ```toml
//! strategy = "diloco@50"          # one round strategy
//! coordinator = "<64 hex digits>" # the coordinator's public key (lowband keygen)
//! sites = ["<hex>", "<hex>"]      # site k is the k-th key; only these keys get in
//! corpus = "kjv.txt"              # optional (default: the generated synthetic language)
//! corpus_bytes = 8388608          # size of the generated corpus
//! tuning = false                  # true: set the validation split aside (compare --tuning)
//! [run]                           # any RunConfig field (sites = the number of keys)
//! preset = "tiny"
//! steps = 200
//! ```
//! Every node builds the same split from the same corpus and seed, so a site needs only the file
//! and its key; a site whose file differs from the coordinator's is refused at its join, with
//! every differing field named (`lowband_runtime::network`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use lowband_data::Split;
use lowband_engine::checkpoint::write_atomic;
use lowband_net::{Identity, Limits, PublicKey};
use lowband_runtime::{RunConfig, Strategy};
use serde::Deserialize;

use crate::report::{self, Comparison};
use crate::train::load_corpus;

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct ClusterFile {
    strategy: String,
    coordinator: String,
    sites: Vec<String>,
    corpus: Option<PathBuf>,
    #[serde(default = "default_corpus_bytes")]
    corpus_bytes: usize,
    #[serde(default)]
    tuning: bool,
    #[serde(default)]
    run: Option<RunConfig>,
}

fn default_corpus_bytes() -> usize {
    8 << 20
}

/// A cluster file, checked: keys parse, sites match, the strategy is a round strategy.
struct Cluster {
    config: RunConfig,
    strategy: Strategy,
    coordinator: PublicKey,
    sites: Vec<PublicKey>,
    corpus: Option<PathBuf>,
    corpus_bytes: usize,
    tuning: bool,
}

fn read_cluster(path: &Path) -> Result<Cluster> {
    let text = crate::files::read_text(path, crate::files::SETTINGS_BYTES_MAX)?;
    let file: ClusterFile =
        toml::from_str(&text).map_err(|e| crate::files::toml_error(path, &text, &e, false))?;
    let coordinator: PublicKey = file
        .coordinator
        .parse()
        .with_context(|| format!("{}: coordinator", path.display()))?;
    let sites: Vec<PublicKey> = file
        .sites
        .iter()
        .enumerate()
        .map(|(k, s)| {
            s.parse()
                .with_context(|| format!("{}: sites[{k}]", path.display()))
        })
        .collect::<Result<_>>()?;
    if sites.is_empty() {
        bail!("{}: sites: list at least one site key", path.display());
    }
    for (k, key) in sites.iter().enumerate() {
        if *key == coordinator {
            bail!("{}: sites[{k}] is the coordinator's key: a node is either the coordinator or a site", path.display());
        }
        if let Some(first) = sites[..k].iter().position(|other| other == key) {
            bail!(
                "{}: sites[{k}] repeats sites[{first}]: every site has its own key",
                path.display()
            );
        }
    }
    crate::train::check_corpus_bytes(file.corpus_bytes)
        .map_err(|e| anyhow::anyhow!("{}: corpus_bytes: {e}", path.display()))?;
    let mut config = file.run.unwrap_or_default();
    config.sites = sites.len();
    config
        .validate()
        .map_err(|(field, reason)| anyhow::anyhow!("{}: run.{field}: {reason}", path.display()))?;
    let strategy = Strategy::parse(&file.strategy, config.inner_steps)
        .map_err(|e| anyhow::anyhow!("{}: strategy: {e}", path.display()))?;
    Ok(Cluster {
        config,
        strategy,
        coordinator,
        sites,
        corpus: file.corpus,
        corpus_bytes: file.corpus_bytes,
        tuning: file.tuning,
    })
}

fn split_of(cluster: &Cluster) -> Result<(Split, String, Option<f64>)> {
    let model = lowband_engine::preset(&cluster.config.preset)?.model;
    let (bytes, source, floor) = load_corpus(
        cluster.corpus.as_ref(),
        cluster.corpus_bytes,
        cluster.tuning.then_some(cluster.config.validation_fraction),
    )?;
    let split = Split::new(
        &bytes,
        cluster.config.validation_fraction,
        cluster.config.sites,
        cluster.config.shard,
        model.context_length,
    )?;
    Ok((split, source, floor))
}

#[derive(clap::Args, Debug)]
pub struct CoordinatorArgs {
    /// The cluster file.
    #[arg(long)]
    config: PathBuf,
    /// This node's key file (its public key must be the file's `coordinator`).
    #[arg(long)]
    key: PathBuf,
    /// Address to listen on (port 0: any free port; see --address-file).
    #[arg(long, default_value = "0.0.0.0:7700")]
    listen: std::net::SocketAddr,
    /// Write the bound address here once listening (for scripts that start the sites).
    #[arg(long)]
    address_file: Option<PathBuf>,
    /// Run directory name under --runs-dir.
    #[arg(long, default_value = "cluster")]
    name: String,
    /// Directory that holds run directories.
    #[arg(long, default_value = "runs")]
    runs_dir: PathBuf,
    /// Write the machine-readable summary here too.
    #[arg(long)]
    json: Option<PathBuf>,
    /// A site silent this long (no packet, no keep-alive) is dropped and the round goes on
    /// without it.
    #[arg(long, default_value_t = 30_000)]
    idle_timeout_ms: u64,
    /// Updates that close a round once its deadline has passed (default: every site, so a
    /// round waits for all members still connected).
    #[arg(long)]
    quorum: Option<usize>,
    /// Time after a round opens at which it closes on a quorum: a straggler or a hung site
    /// cannot hold the run longer.
    #[arg(long, default_value_t = 600_000)]
    round_deadline_ms: u64,
    /// How long to wait for the sites before the first round (then start with a quorum).
    #[arg(long, default_value_t = lowband_runtime::network::JOIN_TIMEOUT_MS)]
    join_timeout_ms: u64,
    /// Continue from the state saved in the run directory after every round (a coordinator
    /// restarted after a crash); without it the run starts over.
    #[arg(long)]
    resume: bool,
}

fn limits(idle_timeout_ms: u64) -> Result<Limits> {
    anyhow::ensure!(idle_timeout_ms >= 100, "--idle-timeout-ms: at least 100");
    Ok(Limits {
        idle_timeout_ms,
        keep_alive_ms: (idle_timeout_ms / 4).max(50),
        ..Limits::default()
    })
}

#[derive(clap::Args, Debug)]
pub struct SiteArgs {
    /// The cluster file.
    #[arg(long)]
    config: PathBuf,
    /// This node's key file (its public key must be one of the file's `sites`).
    #[arg(long)]
    key: PathBuf,
    /// The coordinator's address.
    #[arg(long)]
    join: std::net::SocketAddr,
    /// The coordinator silent this long ends this site's connection.
    #[arg(long, default_value_t = 30_000)]
    idle_timeout_ms: u64,
    /// After losing the coordinator mid-run, keep trying to reach it this long (a coordinator
    /// restarting from its checkpoint).
    #[arg(long, default_value_t = 60_000)]
    reconnect_ms: u64,
    /// Where this site saves its own state (optimizer moments, data position, error feedback)
    /// after every update.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Continue from the state saved in --state-dir (a site restarted after a crash); it gets the
    /// current parameters from the coordinator when it rejoins.
    #[arg(long, requires = "state_dir")]
    resume: bool,
}

pub fn coordinator(args: &CoordinatorArgs) -> Result<()> {
    crate::files::check_run_name(&args.name)?;
    let cluster = read_cluster(&args.config)?;
    let run_dir = args.runs_dir.join(&args.name);
    let _lock = crate::files::RunLock::acquire(&run_dir)?;
    if let Some(json) = &args.json {
        crate::files::check_writable(json)?;
    }
    let identity = Arc::new(Identity::load(&args.key)?);
    if identity.public_key() != cluster.coordinator {
        bail!(
            "{}: this key is {}, the cluster's coordinator is {}",
            args.key.display(),
            identity.public_key(),
            cluster.coordinator
        );
    }
    let (split, source, floor) = split_of(&cluster)?;
    println!(
        "lowband coordinator: {} for {} sites, preset {}, {} steps; waiting for the sites",
        cluster.strategy.name(),
        cluster.config.sites,
        cluster.config.preset,
        cluster.config.steps
    );
    let address_file = args.address_file.clone();
    anyhow::ensure!(args.quorum != Some(0), "--quorum: at least 1");
    let options = lowband_runtime::network::NetworkOptions {
        quorum: args.quorum.unwrap_or(0),
        round_deadline_ms: args.round_deadline_ms,
        join_timeout_ms: args.join_timeout_ms,
        state_dir: Some(args.runs_dir.join(&args.name).join("coordinator-state")),
        resume: args.resume,
        ..lowband_runtime::network::NetworkOptions::new(limits(args.idle_timeout_ms)?)
    };
    let result = lowband_runtime::network::serve_coordinator(
        &cluster.config,
        cluster.strategy.clone(),
        &split,
        identity,
        cluster.sites.clone(),
        args.listen,
        options,
        |address| {
            println!("listening on {address}");
            if let Some(path) = &address_file {
                write_atomic(path, address.to_string().as_bytes())
                    .map_err(|e| lowband_runtime::RunError::Protocol(e.to_string()))?;
            }
            Ok(())
        },
    )
    .map_err(|e| crate::failure::ran(e.into()))?;
    let results = vec![result];
    let comparison = Comparison {
        config: &cluster.config,
        results: &results,
        corpus: &source,
        floor,
        name: &args.name,
        events: &[],
    };
    report::write_all(
        &comparison,
        &args.runs_dir.join(&args.name),
        args.json.as_deref(),
    )
    .map_err(crate::failure::ran)
}

pub fn site(args: &SiteArgs) -> Result<()> {
    let cluster = read_cluster(&args.config)?;
    let identity = Arc::new(Identity::load(&args.key)?);
    let Some(k) = cluster
        .sites
        .iter()
        .position(|key| *key == identity.public_key())
    else {
        bail!(
            "{}: key {} is not one of the cluster's sites",
            args.key.display(),
            identity.public_key()
        );
    };
    let (split, _, _) = split_of(&cluster)?;
    println!("lowband site {k}: joining {}", args.join);
    lowband_runtime::network::serve_site(
        &cluster.config,
        cluster.strategy.clone(),
        &split,
        k as u32,
        identity,
        (args.join, cluster.coordinator),
        lowband_runtime::network::SiteOptions {
            limits: limits(args.idle_timeout_ms)?,
            reconnect_ms: args.reconnect_ms,
            state_dir: args.state_dir.clone(),
            resume: args.resume,
        },
        || {
            use std::io::Write;
            println!("lowband site {k}: connected");
            let _ = std::io::stdout().flush();
        },
    )
    .map_err(|e| crate::failure::ran(e.into()))?;
    println!("lowband site {k}: done");
    Ok(())
}
