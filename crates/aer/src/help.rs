//! Every option of every `aer` command says what it takes: a help line, and for an option
//! that takes a value, an example (`e.g.`) or its list of possible values.

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use crate::cli::Args;

    /// (command path, option) for every option that lacks a help line or an example.
    fn gaps(cmd: &clap::Command, path: &str, out: &mut Vec<String>) {
        for a in cmd.get_arguments() {
            let id = a.get_id().as_str();
            if matches!(id, "help" | "version") || a.is_hide_set() {
                continue;
            }
            let help = a
                .get_long_help()
                .or_else(|| a.get_help())
                .map(ToString::to_string)
                .unwrap_or_default();
            if help.trim().is_empty() {
                out.push(format!("{path} --{id}: no help text"));
                continue;
            }
            let takes_value =
                a.get_action().takes_values() && a.get_num_args().is_none_or(|n| n.takes_values());
            let listed = !a.get_possible_values().is_empty();
            let positional_argv = a.is_last_set() || a.get_long().is_none();
            if takes_value && !listed && !positional_argv && !help.contains("e.g.") {
                out.push(format!("{path} --{id}: no example (e.g. …) in {help:?}"));
            }
        }
        for sub in cmd.get_subcommands() {
            gaps(sub, &format!("{path} {}", sub.get_name()), out);
        }
    }

    #[test]
    fn every_option_has_help_and_an_example() {
        let mut out = Vec::new();
        gaps(&Args::command(), "aer", &mut out);
        assert!(out.is_empty(), "{} options:\n{}", out.len(), out.join("\n"));
    }
}
