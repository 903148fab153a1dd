//! `--help` shows every flag's default. Flags that override the run file are `Option`s (unset
//! means "the file's value, or the default"), so clap cannot show their defaults by itself: they
//! are written here from `RunConfig::default()`, where they are stated once.

use clap::Command;
use lowband_runtime::RunConfig;

/// The default each run-file override stands for, by flag id.
fn run_defaults() -> Vec<(&'static str, String)> {
    let run = RunConfig::default();
    let network = &run.network;
    vec![
        ("sites", run.sites.to_string()),
        ("preset", run.preset.clone()),
        ("steps", run.steps.to_string()),
        (
            "tokens",
            "steps x sites x site_batch x the context length".into(),
        ),
        ("inner_steps", run.inner_steps.to_string()),
        ("site_batch", run.site_batch.to_string()),
        ("seed", run.seed.to_string()),
        ("corpus", "the generated synthetic language".into()),
        ("corpus_bytes", run.corpus_bytes.to_string()),
        ("aggregator", run.aggregator.to_string()),
        ("attacks", "none (every site honest)".into()),
        ("site_speeds", "1 for every site".into()),
        ("faults", "none".into()),
        (
            "site_gflop_per_second",
            run.site_gflop_per_second.to_string(),
        ),
        ("strategies", crate::compare::STRATEGIES_DEFAULT.to_string()),
        ("config", "none (every setting its default)".into()),
        ("name", "from the settings".into()),
        ("quorum", format!("{} (every member)", network.quorum)),
        ("round_deadline_ms", network.round_deadline_ms.to_string()),
        ("join_timeout_ms", network.join_timeout_ms.to_string()),
        ("idle_timeout_ms", network.idle_timeout_ms.to_string()),
        ("reconnect_ms", network.reconnect_ms.to_string()),
        ("threads", "every core".into()),
    ]
}

/// The command tree with every flag's default in its help.
pub fn with_defaults(command: Command) -> Command {
    let defaults = run_defaults();
    add_defaults(command, &defaults)
}

fn add_defaults(mut command: Command, defaults: &[(&'static str, String)]) -> Command {
    let ids: Vec<String> = command
        .get_arguments()
        .map(|a| a.get_id().to_string())
        .collect();
    for id in ids {
        command = command.mut_arg(id.as_str(), |arg| {
            let takes_value = arg.get_action().takes_values();
            let shown = !arg.get_default_values().is_empty() || arg.is_hide_default_value_set();
            if !takes_value || shown || arg.is_positional() || arg.is_required_set() {
                return arg;
            }
            let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
            // (A help text that already says its default, in its own words, keeps them.)
            if help.contains("[default:") || help.contains("(default") {
                return arg;
            }
            let value = defaults
                .iter()
                .find(|(name, _)| *name == id)
                .map_or("none", |(_, v)| v.as_str());
            // (`-h` prints the short help, `--help` the long one when the doc comment has one.)
            let long = arg.get_long_help().map(|h| h.to_string());
            let arg = arg.help(format!("{help} [default: {value}]"));
            match long {
                Some(long) => arg.long_help(format!("{long} [default: {value}]")),
                None => arg,
            }
        });
    }
    let names: Vec<String> = command
        .get_subcommands()
        .map(|c| c.get_name().to_string())
        .collect();
    for name in names {
        command = command.mut_subcommand(name, |sub| add_defaults(sub, defaults));
    }
    command
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// Every flag of every command has help text and shows its default (a value flag), so a
    /// newcomer never has to read the source to learn what a flag does or what it is unset.
    #[test]
    fn every_flag_has_help_and_shows_its_default() {
        let command = super::with_defaults(crate::Cli::command());
        let mut missing = Vec::new();
        let mut checked = 0;
        visit(&command, "lowband", &mut |path, arg| {
            let id = arg.get_id().as_str();
            if id == "help" || id == "version" {
                return;
            }
            checked += 1;
            let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
            let long = arg.get_long_help().map(|h| h.to_string());
            if long
                .as_ref()
                .is_some_and(|l| help.contains("[default:") && !l.contains("[default:"))
            {
                missing.push(format!("{path} --{id}: --help does not show the default"));
            }
            let own = help.split("[default:").next().unwrap_or("");
            if own.trim().is_empty() {
                missing.push(format!("{path} --{id}: no help text"));
            }
            let takes_value = arg.get_action().takes_values();
            let shows_default = !arg.get_default_values().is_empty()
                || help.contains("[default:")
                || help.contains("(default");
            if takes_value && !arg.is_positional() && !arg.is_required_set() && !shows_default {
                missing.push(format!("{path} --{id}: no default shown"));
            }
        });
        assert!(checked > 100, "only {checked} flags seen");
        assert!(missing.is_empty(), "{}", missing.join("\n"));
    }

    fn visit(command: &clap::Command, path: &str, f: &mut dyn FnMut(&str, &clap::Arg)) {
        for arg in command.get_arguments() {
            f(path, arg);
        }
        for sub in command.get_subcommands() {
            visit(sub, &format!("{path} {}", sub.get_name()), f);
        }
    }
}
