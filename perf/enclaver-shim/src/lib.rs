//! The argument parsing shared by the two enclaver egress shims. Kept apart
//! so that both binaries read their flags the same way and fail with one
//! clear line (no clap: the shims add nothing to enclaver's dependency set).

use anyhow::{Context, Result, bail};

/// Enclaver's vsock port for egress (enclaver `constants::HTTP_EGRESS_VSOCK_PORT`).
pub const DEFAULT_VSOCK_PORT: u32 = 17002;
/// Enclaver's in-enclave proxy port when the manifest names none
/// (enclaver `constants::HTTP_EGRESS_PROXY_PORT`).
pub const DEFAULT_LISTEN_PORT: u16 = 10000;

/// The flags of both shims; each binary refuses the ones it does not take.
#[derive(Debug, Default, PartialEq)]
pub struct Flags {
    pub listen_port: Option<u16>,
    pub vsock_port: Option<u32>,
    pub allow: Vec<String>,
    pub deny: Vec<String>,
    pub allow_all: bool,
    pub verbosity: u8,
}

/// Parses `--flag VALUE` pairs and `-v`; `takes` names the flags this binary
/// accepts (besides `-v`).
pub fn parse(args: impl IntoIterator<Item = String>, takes: &[&str]) -> Result<Flags> {
    let mut flags = Flags::default();
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        if arg == "-v" {
            flags.verbosity = flags.verbosity.saturating_add(1);
            continue;
        }
        if !takes.contains(&arg.as_str()) {
            bail!("unknown argument {arg:?} (this binary takes {takes:?} and -v)");
        }
        if arg == "--allow-all" {
            flags.allow_all = true;
            continue;
        }
        let value = args.next().with_context(|| format!("{arg} needs a value"))?;
        match arg.as_str() {
            "--listen-port" => {
                flags.listen_port = Some(value.parse().with_context(|| format!("{arg} {value:?}"))?)
            }
            "--vsock-port" => {
                flags.vsock_port = Some(value.parse().with_context(|| format!("{arg} {value:?}"))?)
            }
            "--allow" => flags.allow.push(value),
            "--deny" => flags.deny.push(value),
            _ => bail!("unknown argument {arg:?}"),
        }
    }
    Ok(flags)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(args: &[&str]) -> Vec<String> {
        args.iter().map(|a| a.to_string()).collect()
    }

    #[test]
    fn reads_every_flag() {
        let flags = parse(
            strings(&[
                "--listen-port",
                "10001",
                "--vsock-port",
                "17003",
                "--allow",
                "127.0.0.1",
                "--deny",
                "10.0.0.0/8",
                "-v",
            ]),
            &["--listen-port", "--vsock-port", "--allow", "--deny"],
        )
        .unwrap();
        assert_eq!(flags.listen_port, Some(10001));
        assert_eq!(flags.vsock_port, Some(17003));
        assert_eq!(flags.allow, ["127.0.0.1"]);
        assert_eq!(flags.deny, ["10.0.0.0/8"]);
        assert_eq!(flags.verbosity, 1);
    }

    #[test]
    fn refuses_what_it_does_not_take() {
        assert!(parse(strings(&["--allow", "x"]), &["--vsock-port"]).is_err());
        assert!(parse(strings(&["--vsock-port"]), &["--vsock-port"]).is_err());
        assert!(parse(strings(&["--vsock-port", "x"]), &["--vsock-port"]).is_err());
    }
}
