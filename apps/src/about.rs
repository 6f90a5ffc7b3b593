//! What the binaries say about themselves rather than about relaying:
//! `--version` (which build this is and which backends this kernel lets it
//! use: the first question of a bug report), the manual pages and the shell
//! completions, all derived from the clap definitions so they cannot drift
//! from `--help`. The packages (`dist/build`) ship the pages and
//! completions that `vsock-relay --generate-docs DIR` writes.

use std::ffi::OsStr;
use std::io::{self, Write};
use std::path::Path;
use std::process::ExitCode;

use clap::error::ErrorKind;
use clap::{Command, CommandFactory, Parser};
use clap_complete::Shell;

use crate::relay::dropin;

/// The commit the binary was built from (`unknown` outside git).
pub const COMMIT: &str = env!("VSOCK_RELAY_COMMIT");
/// The target triple it was built for.
pub const TARGET: &str = env!("VSOCK_RELAY_TARGET");

/// The shells whose completion scripts [`generate_docs`] writes, with the
/// file name each shell looks for.
pub const SHELLS: [(Shell, &str); 3] =
    [(Shell::Bash, "vsock-relay.bash"), (Shell::Zsh, "_vsock-relay"), (Shell::Fish, "vsock-relay.fish")];

/// `--version`'s text: name and version, commit, target, and the backends
/// this build can use on this kernel by the engine's own probe (the one a
/// relay decides by; it sets up an io_uring and opens no socket).
pub fn version_text(name: &str) -> String {
    let backends = match vsock_relay_engine::probe_uring() {
        Ok(()) => "io_uring, portable (epoll)".to_string(),
        Err(why) => format!("portable (epoll); io_uring unavailable: {why}"),
    };
    format!(
        "{name} {}\ncommit:   {COMMIT}\ntarget:   {TARGET}\nbackends: {backends}\n",
        env!("CARGO_PKG_VERSION")
    )
}

/// Parses the command line as clap does, except that `-V`/`--version`
/// print [`version_text`] (computed only then: the probe is not free).
pub fn parse<P: Parser>() -> P {
    match P::try_parse() {
        Ok(parsed) => parsed,
        Err(e) if e.kind() == ErrorKind::DisplayVersion => {
            // A closed stdout is no reason to panic; the exit status says it.
            let written = io::stdout().write_all(version_text(P::command().get_name()).as_bytes());
            std::process::exit(i32::from(written.is_err()))
        }
        Err(e) => e.exit(),
    }
}

/// Writes `command`'s completion script for `shell` to `out`. Generated in
/// memory first: clap_complete panics on a failed write (a closed pipe).
pub fn completions(shell: Shell, command: &mut Command, out: &mut dyn Write) -> io::Result<()> {
    let name = command.get_name().to_string();
    let mut script = Vec::new();
    clap_complete::generate(shell, command, name, &mut script);
    out.write_all(&script)?;
    out.flush()
}

/// The first argument that makes `vsock-relay` write its pages and
/// completions (dist/build). Looked for before clap parses, so that no
/// help text, page or completion script offers it (clap_complete's bash
/// script would offer even a hidden subcommand).
pub const GENERATE_DOCS: &str = "--generate-docs";

/// With `--generate-docs DIR` as the whole command line: writes
/// [`generate_docs`] of `relay()` into DIR and says the exit code; `None`
/// for any other command line.
pub fn generate_docs_if_asked(relay: impl FnOnce() -> Command) -> Option<ExitCode> {
    let args: Vec<_> = std::env::args_os().skip(1).collect();
    if args.first().map(|a| a.as_os_str()) != Some(OsStr::new(GENERATE_DOCS)) {
        return None;
    }
    let [_, dir] = args.as_slice() else {
        eprintln!("usage: vsock-relay {GENERATE_DOCS} DIR");
        return Some(ExitCode::from(2));
    };
    let dir = Path::new(dir);
    Some(match generate_docs(relay(), dir) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!(
                "vsock-relay: cannot write the manual pages and completions into {}: {e}",
                dir.display()
            );
            ExitCode::FAILURE
        }
    })
}

/// Writes into `dir`: `man/` with a page for `relay` (the `vsock-relay`
/// command), one for each of its subcommands (`vsock-relay-proxy.1`, ...)
/// and one for the drop-in `vsock-proxy` (named [`dropin::MAN_PAGE`], so it
/// never takes the name of AWS's command); `completions/` with the scripts
/// of [`SHELLS`].
pub fn generate_docs(relay: Command, dir: &Path) -> io::Result<()> {
    let man = dir.join("man");
    let scripts = dir.join("completions");
    std::fs::create_dir_all(&man)?;
    std::fs::create_dir_all(&scripts)?;
    for (shell, file) in SHELLS {
        completions(shell, &mut relay.clone(), &mut std::fs::File::create(scripts.join(file))?)?;
    }
    // No pages for the `help` subcommands: each page already is the help.
    let relay = relay.disable_help_subcommand(true).mut_subcommands(|s| s.disable_help_subcommand(true));
    clap_mangen::generate_to(relay, &man)?;
    let page = clap_mangen::Man::new(dropin::Cli::command()).title(dropin::MAN_PAGE);
    let mut out = std::fs::File::create(man.join(format!("{}.1", dropin::MAN_PAGE)))?;
    page.render(&mut out)?;
    out.flush()
}
