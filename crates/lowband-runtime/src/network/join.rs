//! Joining a run: the settings a site says first on every connection (the coordinator's door,
//! `lowband_net::door`, compares them with its own).
//!
//! A site's first message is a signed join request (`wire::JoinRequest`): the settings of the
//! run it was started for, the corpus fingerprint among them. The coordinator admits it only if
//! the request is the site's own (its key signed it, it names its own site number) and every
//! setting equals the coordinator's; otherwise it closes the connection with `CLOSE_REFUSED` and
//! a reason that names every differing field, and the site stops with that reason (a refusal is
//! final: retrying cannot change the settings). Refusals are logged, at most one line every
//! `REFUSAL_LOG_INTERVAL_MS` with a count of the ones not shown.

use std::collections::BTreeMap;

use lowband_data::CorpusFingerprint;
use lowband_protocol::wire::JoinRequest;

use crate::config::RunConfig;
use crate::strategy::Strategy;

/// The settings a site and its coordinator must agree on: every field of the run settings (as
/// dotted names), the strategy's canonical name and the corpus fingerprint (an engine run), or
/// the model's tensors as a digest (an external model, whose sites hold their own data: its
/// parameter count is `run.model.params`, the site's from its own model).
pub fn join_settings(
    config: &RunConfig,
    strategy: &Strategy,
    corpus: Option<CorpusFingerprint>,
) -> JoinRequest {
    let mut settings = BTreeMap::new();
    let run = serde_json::to_value(config.comparable()).unwrap_or(serde_json::Value::Null);
    flatten("run", &run, &mut settings);
    settings.insert("strategy".into(), strategy.name());
    if let Some(corpus) = corpus {
        settings.insert("corpus".into(), corpus.to_string());
    }
    if let Some(model) = &config.model {
        settings.retain(|name, _| !name.starts_with("run.model.tensors"));
        settings.insert("run.model.tensors".into(), model.tensors_digest());
    }
    JoinRequest { settings }
}

fn flatten(prefix: &str, value: &serde_json::Value, out: &mut BTreeMap<String, String>) {
    match value {
        serde_json::Value::Object(fields) => {
            for (name, inner) in fields {
                flatten(&format!("{prefix}.{name}"), inner, out);
            }
        }
        serde_json::Value::String(text) => {
            out.insert(prefix.into(), text.replace(['\t', '\n'], " "));
        }
        other => {
            out.insert(prefix.into(), other.to_string());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_name_every_field_of_the_run() {
        let config = RunConfig::default();
        let strategy = Strategy::parse("diloco@10", config.inner_steps).unwrap();
        let corpus = lowband_data::CorpusFingerprint {
            train_bytes: 1,
            shards: 1,
            train_crc32: 1,
            validation_bytes: 1,
            validation_crc32: 1,
        };
        let ours = join_settings(&config, &strategy, Some(corpus));
        assert_eq!(ours.settings["strategy"], "diloco@10");
        assert!(
            ours.settings.contains_key("run.seed")
                && ours.settings.contains_key("run.optimizer.lr")
        );
        let other = RunConfig {
            seed: 5,
            ..config.clone()
        };
        let theirs = join_settings(
            &other,
            &Strategy::parse("diloco@5", 50).unwrap(),
            Some(corpus),
        );
        let differences = ours.differences(&theirs);
        assert_eq!(differences.len(), 2, "{differences:?}");
        assert!(
            differences[0].starts_with("run.seed (coordinator 0, site 5)"),
            "{differences:?}"
        );
    }
}
