//! An external model over the network (`crate::external`): the coordinator of a run whose sites
//! are PyTorch processes (the Python package), and what such a site needs from the run file to
//! join it. The coordinator reads the initial parameters, sends them to every site in full when
//! the run starts, runs the same rounds (outer step, aggregators, trust checks, deadlines,
//! rejoins, checkpoints) and, when the run is over, sends every site the final parameters.

use std::net::SocketAddr;
use std::sync::Arc;

use lowband_net::{ClientOptions, Identity, PublicKey};
use lowband_protocol::{wire, Site};

use crate::config::RunConfig;
use crate::driver::Common;
use crate::external::{initial_fingerprint, read_initial, ExternalModel};
use crate::run_file::Cluster;
use crate::strategy::{Strategy, Streaming};
use crate::{RunError, RunResult};

use super::{check_rounds, join, serve_books, NetworkOptions, RoundSteps, Served};

/// A run of an external model: its `[model]`, with a round or streaming strategy.
fn external_model<'a>(
    config: &'a RunConfig,
    strategy: &Strategy,
) -> Result<&'a ExternalModel, RunError> {
    check_rounds(config, strategy)?;
    if strategy.scheduled() {
        return Err(RunError::InvalidConfig {
            field: "strategy",
            reason: format!("{}: asynchronous rounds and quorums run on the emulated clock's schedule, which needs lowband's engine (a nominal step time per site); an external model runs round and streaming strategies", strategy.name()),
        });
    }
    let Some(model) = config.model.as_ref() else {
        return Err(RunError::InvalidConfig {
            field: "model",
            reason: "no [model] table: an external model's run file names its parameter count (params = N) and its initial parameters (initial = FILE)".into(),
        });
    };
    if !config.attacks.is_empty() {
        return Err(RunError::InvalidConfig {
            field: "attacks",
            reason: "hostile sites are an experiment of lowband's own engine sites".into(),
        });
    }
    Ok(model)
}

/// A coordinator process for an external model: listen on `listen`, admit exactly `site_keys`,
/// send every site the initial parameters (`model.initial`), run the rounds, send every site
/// the final parameters, return the result (no validation loss: the coordinator cannot run the
/// model; the report shows the losses the sites report). Resumes as `serve_coordinator` does.
#[allow(clippy::too_many_arguments)]
pub fn serve_external_coordinator(
    config: &RunConfig,
    strategy: Strategy,
    identity: Arc<Identity>,
    site_keys: Vec<PublicKey>,
    listen: SocketAddr,
    options: NetworkOptions,
    listening: impl FnOnce(SocketAddr) -> Result<(), RunError>,
) -> Result<RunResult, RunError> {
    let model = external_model(config, &strategy)?;
    let Some(path) = model.initial.as_ref() else {
        return Err(RunError::InvalidConfig {
            field: "model.initial",
            reason: "name the initial parameters' file (safetensors, one f32 tensor \"params\"; lowband.torch writes it)".into(),
        });
    };
    let initial = read_initial(path, model.params)?;
    let common = Common::external(
        config,
        strategy.clone(),
        initial_fingerprint(&initial, config.sites),
    );
    let served = Served {
        identity,
        site_keys,
        listen,
        settings: join::join_settings(config, &strategy, None),
        sites_start_synced: false,
    };
    serve_books(common, initial, served, options, listening)
}

/// What a PyTorch site needs to take part: how it reaches the coordinator, its protocol state
/// (which holds θ, encodes its updates with their error feedback and decodes the broadcasts), and
/// the run's rounds.
pub struct ExternalSite {
    /// Site k of the run (its key is the cluster's k-th).
    pub index: u32,
    pub client: ClientOptions,
    pub site: Site,
    /// Rounds in the run (streaming: the fragment syncs during training and the P final
    /// ones); which steps each covers.
    pub rounds: u64,
    pub round_steps: RoundSteps,
    pub inner_steps: u64,
    pub steps: u64,
    /// Streaming DiLoCo's fragments, delay and mix (None: whole-model rounds).
    pub streaming: Option<Streaming>,
}

impl ExternalSite {
    /// This run as this site joins it (the CRC-32 of its join request: every run setting, the
    /// strategy, the model): what its saved state must match. (Without the envelope's own
    /// CRC-32 at its end: a message followed by its CRC always hashes to the same residue.)
    pub fn run_fingerprint(&self) -> u32 {
        let join = &self.client.join;
        crc32fast::hash(&join[..join.len().saturating_sub(wire::TRAILER_BYTES)])
    }
}

/// Site `identity` of `cluster`, with its own model `model` (its parameter count and, if known,
/// tensors), joining the coordinator at `coordinator`. A model that differs from the cluster's is
/// refused here, naming both (and the coordinator would refuse its join the same way).
pub fn external_site(
    cluster: &Cluster,
    identity: Arc<Identity>,
    coordinator: SocketAddr,
    model: &ExternalModel,
) -> Result<ExternalSite, RunError> {
    let config = &cluster.config;
    let ours = external_model(config, &cluster.strategy)?;
    let key = identity.public_key();
    let Some(index) = cluster.sites.iter().position(|k| *k == key) else {
        return Err(RunError::InvalidConfig {
            field: "cluster",
            reason: format!("key {key} is not one of the cluster's sites"),
        });
    };
    if model.params != ours.params {
        return Err(RunError::InvalidConfig {
            field: "model.params",
            reason: format!(
                "this model has {} parameters, the cluster's has {}",
                model.params, ours.params
            ),
        });
    }
    if !ours.tensors.is_empty() && !model.tensors.is_empty() {
        if let Some(difference) = model.first_tensor_difference(ours) {
            return Err(RunError::InvalidConfig {
                field: "model.tensors",
                reason: format!("this model differs from the cluster's ({difference})"),
            });
        }
    }
    // The join carries this site's own model: a coordinator with another refuses it by name.
    let mut joined = config.clone();
    joined.model = Some(ExternalModel {
        initial: None,
        tokens_per_step: ours.tokens_per_step,
        tensors: if ours.tensors.is_empty() {
            Vec::new()
        } else {
            model.tensors.clone()
        },
        params: model.params,
    });
    let join = join::join_settings(&joined, &cluster.strategy, None).encode(index as u32);
    let strategy = &cluster.strategy;
    let mut site = Site::unsynced(
        index as u32,
        model.params,
        strategy.compression_for(config.sites),
    )?;
    if let Some(streaming) = strategy.streaming {
        // The same fragments as the coordinator's (`driver::coordinator_config`).
        site = site.with_fragments(crate::driver::fragments(model.params, streaming.fragments))?;
    }
    let round_steps = RoundSteps::of(config, strategy);
    Ok(ExternalSite {
        index: index as u32,
        client: ClientOptions {
            identity,
            coordinator: (coordinator, cluster.coordinator),
            limits: super::limits(config),
            reconnect_ms: config.network.reconnect_ms,
            join,
            leave_on_ctrl_c: false,
        },
        site,
        rounds: round_steps.rounds(),
        round_steps,
        inner_steps: strategy.inner_steps,
        steps: config.steps,
        streaming: strategy.streaming,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(model: Option<ExternalModel>, strategy: &str) -> Cluster {
        let config = RunConfig {
            sites: 2,
            steps: 10,
            model,
            ..RunConfig::default()
        };
        let keys: Vec<PublicKey> = (0..3)
            .map(|_| Identity::generate().unwrap().public_key())
            .collect();
        Cluster {
            strategy: Strategy::parse(strategy, config.inner_steps).unwrap(),
            config,
            coordinator: keys[0],
            sites: keys[1..].to_vec(),
        }
    }

    fn model(params: usize) -> ExternalModel {
        ExternalModel {
            params,
            initial: None,
            tokens_per_step: None,
            tensors: Vec::new(),
        }
    }

    #[test]
    fn a_site_gets_its_index_rounds_and_a_join_naming_its_model() {
        let identity = Arc::new(Identity::generate().unwrap());
        let mut ours = cluster(Some(model(12)), "diloco@4");
        ours.sites[1] = identity.public_key();
        let address = "127.0.0.1:9".parse().unwrap();
        let site = external_site(&ours, identity.clone(), address, &model(12)).unwrap();
        assert_eq!((site.index, site.rounds, site.inner_steps), (1, 3, 4));
        let error = external_site(&ours, identity.clone(), address, &model(13))
            .err()
            .unwrap()
            .to_string();
        assert!(
            error.contains("this model has 13 parameters, the cluster's has 12"),
            "{error}"
        );
        let stranger = Arc::new(Identity::generate().unwrap());
        let error = external_site(&ours, stranger, address, &model(12))
            .err()
            .unwrap()
            .to_string();
        assert!(error.contains("not one of the cluster's sites"), "{error}");
    }

    #[test]
    fn engine_runs_are_refused_for_external_models() {
        let identity = Arc::new(Identity::generate().unwrap());
        let address = "127.0.0.1:9".parse().unwrap();
        let engine = cluster(None, "diloco@4");
        let error = external_site(&engine, identity.clone(), address, &model(12))
            .err()
            .unwrap()
            .to_string();
        assert!(error.contains("no [model] table"), "{error}");
        // The emulated clock's schedule needs the engine's nominal step time.
        let mut scheduled = cluster(Some(model(12)), "async-diloco@4");
        scheduled.sites[0] = identity.public_key();
        let error = external_site(&scheduled, identity.clone(), address, &model(12))
            .err()
            .unwrap()
            .to_string();
        assert!(error.contains("needs lowband's engine"), "{error}");
        // And the engine's drivers refuse an external model's run file.
        let config = RunConfig {
            model: Some(model(12)),
            ..RunConfig::default()
        };
        let error = crate::driver::refuse_external(&config)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("run `lowband coordinator` with it"),
            "{error}"
        );
    }

    /// A streaming run's PyTorch site: the coordinator's fragments and schedule (T = 10, H = 8,
    /// P = 2: syncs after steps 4 and 8, then 2 final syncs).
    #[test]
    fn a_streaming_site_gets_the_fragments_and_their_schedule() {
        let identity = Arc::new(Identity::generate().unwrap());
        let mut streaming = cluster(
            Some(model(12)),
            "streaming@8[fragments=2;overlap=3;mix=0.25]",
        );
        streaming.sites[0] = identity.public_key();
        let address = "127.0.0.1:9".parse().unwrap();
        let site = external_site(&streaming, identity, address, &model(12)).unwrap();
        assert_eq!(site.rounds, 4);
        let steps = &site.round_steps;
        assert_eq!((steps.end_step(0), steps.end_step(1)), (4, 8));
        assert_eq!((steps.syncs_in_run(), steps.first_step(2)), (2, 8));
        assert_eq!(site.streaming.map(|s| s.overlap_steps), Some(3));
        assert_eq!(
            (site.site.fragment(0), site.site.fragment(3)),
            (0..6, 6..12)
        );
    }

    /// A site's saved state belongs to one run: the fingerprint changes with any run setting.
    #[test]
    fn the_run_fingerprint_follows_the_settings() {
        let identity = Arc::new(Identity::generate().unwrap());
        let address: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let mut first = cluster(Some(model(12)), "sparseloco@5");
        first.sites[0] = identity.public_key();
        let mut second = first.clone();
        second.config.steps += 5;
        let fingerprint = |c: &Cluster| {
            external_site(c, identity.clone(), address, &model(12))
                .unwrap()
                .run_fingerprint()
        };
        assert_eq!(fingerprint(&first), fingerprint(&first.clone()));
        assert_ne!(fingerprint(&first), fingerprint(&second));
    }
}
