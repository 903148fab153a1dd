//! `lowband coordinator` and `lowband site`: the nodes of a cluster as separate processes.
//!
//! Both read the same run file (`crate::settings`: the format `compare --config` reads), with
//! exactly one round strategy and the nodes' keys in its `[cluster]` table:
//! ```toml
//! strategies = ["diloco@50"]
//! preset = "tiny"
//! steps = 200
//! [cluster]
//! coordinator = "<64 hex digits>"     # the coordinator's public key (lowband keygen)
//! sites = ["<hex>", "<hex>"]          # site k is the k-th key; only these keys get in
//! ```
//! Every node builds the same split from the same corpus and seed, so a site needs only the file
//! and its key; a site whose file differs from the coordinator's is refused at its join, with
//! every differing field named (`lowband_runtime::network`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Result};
use lowband_data::Split;
use lowband_engine::checkpoint::write_atomic;
use lowband_net::{Identity, Limits};
use lowband_runtime::run_file::Cluster;
use lowband_runtime::RunConfig;

use crate::report::{self, Comparison};
use crate::train::load_corpus;

fn read_cluster(path: &Path) -> Result<Cluster> {
    Ok(Cluster::read(path)?)
}

fn split_of(cluster: &Cluster) -> Result<(Split, String, Option<f64>)> {
    let model = lowband_engine::preset(&cluster.config.preset)?.model;
    let (bytes, source, floor) = load_corpus(&cluster.config)?;
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
    #[command(flatten)]
    network: NetworkArgs,
    /// Continue from the state saved in the run directory after every round (a coordinator
    /// restarted after a crash; a scheduled run's: at its last save, which its sites restore
    /// theirs of); without it the run starts over.
    #[arg(long)]
    resume: bool,
    /// Serve the run's live view (page, /api/state, /metrics) on PORT (loopback) or HOST:PORT.
    #[arg(long, value_parser = crate::dashboard::parse_listen)]
    dashboard: Option<std::net::SocketAddr>,
}

/// The `[network]` settings as flags (each overrides the run file; defaults in `--help`).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct NetworkArgs {
    /// Updates that close a round once its deadline has passed (0: every member, so a round
    /// waits for all members still connected).
    #[arg(long)]
    pub quorum: Option<usize>,
    /// Time after a round opens at which it may close on a quorum: a straggler or a hung site
    /// cannot hold the run longer.
    #[arg(long)]
    pub round_deadline_ms: Option<u64>,
    /// How long the coordinator waits for the sites before the first round (then it starts
    /// with a quorum), and for any site to come back when all are gone.
    #[arg(long)]
    pub join_timeout_ms: Option<u64>,
    /// A peer silent this long (no packet, no keep-alive) is gone: a site is dropped and the
    /// round goes on; a site's coordinator is lost and the site reconnects.
    #[arg(long)]
    pub idle_timeout_ms: Option<u64>,
    /// A site that lost its coordinator (or starts before it) keeps trying to reach it this
    /// long.
    #[arg(long)]
    pub reconnect_ms: Option<u64>,
}

impl NetworkArgs {
    /// The flags over the run file's `[network]`.
    pub fn apply(&self, config: &mut RunConfig) -> Result<()> {
        let network = &mut config.network;
        if let Some(v) = self.quorum {
            network.quorum = v;
        }
        if let Some(v) = self.round_deadline_ms {
            network.round_deadline_ms = v;
        }
        if let Some(v) = self.join_timeout_ms {
            network.join_timeout_ms = v;
        }
        if let Some(v) = self.idle_timeout_ms {
            network.idle_timeout_ms = v;
        }
        if let Some(v) = self.reconnect_ms {
            network.reconnect_ms = v;
        }
        config
            .validate()
            .map_err(|(field, reason)| anyhow::anyhow!("{field}: {reason}"))
    }
}

/// The transport's limits for a run (see `lowband_runtime::network::limits`).
pub fn limits(config: &RunConfig) -> Limits {
    lowband_runtime::network::limits(config)
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
    #[command(flatten)]
    network: NetworkArgs,
    /// Where this site saves its own state (optimizer moments, data position, error feedback)
    /// after every update; in a scheduled run (async-diloco, [quorum=N]) its whole model side,
    /// when the coordinator cues it (without one, such a run is not saved).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Continue from the state saved in --state-dir (a site restarted after a crash); it gets the
    /// current parameters from the coordinator when it rejoins (a scheduled run's coordinator
    /// cues it to restore its save of the moment the run resumes from).
    #[arg(long, requires = "state_dir")]
    resume: bool,
}

pub fn coordinator(args: &CoordinatorArgs) -> Result<()> {
    crate::files::check_run_name(&args.name)?;
    let mut cluster = read_cluster(&args.config)?;
    args.network.apply(&mut cluster.config)?;
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
    let address_file = args.address_file.clone();
    let watch =
        crate::dashboard::Watch::start(&args.name, vec![cluster.strategy.name()], args.dashboard)?;
    let options = lowband_runtime::network::NetworkOptions {
        observer: Some(watch.observer()),
        state_dir: Some(args.runs_dir.join(&args.name).join("coordinator-state")),
        resume: args.resume,
        ..lowband_runtime::network::NetworkOptions::of(&cluster.config, limits(&cluster.config))
    };
    let listening = |address: std::net::SocketAddr| {
        println!("listening on {address}");
        if let Some(path) = &address_file {
            write_atomic(path, address.to_string().as_bytes())
                .map_err(|e| lowband_runtime::RunError::Protocol(e.to_string()))?;
        }
        Ok(())
    };
    let (result, source, floor) = serve(&cluster, identity, args.listen, options, listening)?;
    let result = result.map_err(|e| crate::failure::ran(e.into()))?;
    watch.finished(&result);
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
    .map_err(crate::failure::ran)?;
    watch.finish(&args.runs_dir.join(&args.name))
}

/// Serve the cluster's rounds: an external model's (PyTorch sites) or lowband's own. The result,
/// the corpus's description and its entropy floor (for the report).
fn serve(
    cluster: &Cluster,
    identity: Arc<Identity>,
    listen: std::net::SocketAddr,
    options: lowband_runtime::network::NetworkOptions,
    listening: impl FnOnce(std::net::SocketAddr) -> Result<(), lowband_runtime::RunError>,
) -> Result<(
    Result<lowband_runtime::RunResult, lowband_runtime::RunError>,
    String,
    Option<f64>,
)> {
    Ok(match &cluster.config.model {
        Some(model) => {
            println!(
                "lowband coordinator: {} for {} PyTorch sites, an external model of {} parameters, {} steps; waiting for the sites",
                cluster.strategy.name(),
                cluster.config.sites,
                model.params,
                cluster.config.steps
            );
            let result = lowband_runtime::network::serve_external_coordinator(
                &cluster.config,
                cluster.strategy.clone(),
                identity,
                cluster.sites.clone(),
                listen,
                options,
                listening,
            );
            (
                result,
                "the sites' own data (an external model)".to_string(),
                None,
            )
        }
        None => {
            let (split, source, floor) = split_of(cluster)?;
            println!(
                "lowband coordinator: {} for {} sites, preset {}, {} steps; waiting for the sites",
                cluster.strategy.name(),
                cluster.config.sites,
                cluster.config.preset,
                cluster.config.steps
            );
            let result = lowband_runtime::network::serve_coordinator(
                &cluster.config,
                cluster.strategy.clone(),
                &split,
                identity,
                cluster.sites.clone(),
                listen,
                options,
                listening,
            );
            (result, source, floor)
        }
    })
}

pub fn site(args: &SiteArgs) -> Result<()> {
    let mut cluster = read_cluster(&args.config)?;
    args.network.apply(&mut cluster.config)?;
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
    if cluster.config.model.is_some() {
        bail!("{}: this cluster trains an external model ([model]): its sites are PyTorch processes (the lowband Python package: lowband.torch), not `lowband site`", args.config.display());
    }
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
            limits: limits(&cluster.config),
            reconnect_ms: cluster.config.network.reconnect_ms,
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
