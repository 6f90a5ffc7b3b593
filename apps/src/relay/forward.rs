//! The enclave forwarder: TCP listeners inside the enclave, each forwarding
//! to a vsock port on the parent (where `vsock-proxy` waits). It replaces the
//! workshop's `traffic_forwarder.py` and the lines of its run.sh that bring
//! the loopback interface up and map the remote name to it in /etc/hosts.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use vsock_relay_engine::endpoint::{Endpoint, Host};
use vsock_relay_engine::{IpFamily, Service, Target};

use crate::relay::options::{EngineArgs, UsageError, Workers};
use crate::relay::run::Running;

/// `vsock-relay forward`'s options.
#[derive(Args, Clone, Debug)]
pub struct ForwardArgs {
    /// The workshop's form: LOCAL_IP LOCAL_PORT REMOTE_CID REMOTE_PORT.
    #[arg(value_name = "LOCAL_IP LOCAL_PORT REMOTE_CID REMOTE_PORT", num_args = 0..)]
    pub positional: Vec<String>,

    /// Where to listen: an endpoint, or a bare port (TCP on 127.0.0.1).
    #[arg(long, value_name = "ENDPOINT", value_parser = parse_listen, requires = "to")]
    pub listen: Option<Endpoint>,

    /// Where to forward the connections of --listen.
    #[arg(long, value_name = "ENDPOINT", requires = "listen")]
    pub to: Option<Endpoint>,

    /// One more forwarding, LISTEN=TO (repeatable), e.g. 443=vsock:3:8001.
    #[arg(long = "map", value_name = "LISTEN=TO", value_parser = parse_mapping)]
    pub maps: Vec<Mapping>,

    /// Map NAME to 127.0.0.1 in the hosts file and bring the loopback
    /// interface up, as the workshop's run.sh does by hand (repeatable;
    /// adds nothing that is already there).
    #[arg(long = "hosts", value_name = "NAME")]
    pub hosts: Vec<String>,

    /// Bring the loopback interface up (the enclave boots with it down);
    /// --hosts does too. For a forwarder on 127.0.0.1 without a hosts line,
    /// such as a routed egress port (HTTPS_PROXY=http://127.0.0.1:3128).
    #[arg(long)]
    pub loopback_up: bool,

    /// Transparent egress: the --listen forwarding's clients were
    /// redirected to it by iptables (`nat OUTPUT ... REDIRECT`, set up by
    /// the enclave's entry script); each connection's original destination
    /// goes first to the parent in a PROXY v2 header, where
    /// `route: transparent` decides. A connection made to the port itself
    /// (not redirected) is refused.
    #[arg(long, requires = "listen")]
    pub transparent: bool,

    /// The hosts file --hosts edits.
    #[arg(long, default_value = "/etc/hosts", value_name = "FILE")]
    pub hosts_file: PathBuf,

    /// Worker threads, serving every forwarding.
    #[command(flatten)]
    pub workers: Workers,

    #[command(flatten)]
    pub engine: EngineArgs,
}

impl ForwardArgs {
    /// The forwardings asked for; a usage error when none.
    fn mappings(self) -> Result<(Vec<Mapping>, Self), UsageError> {
        let mut mappings = Vec::new();
        if !self.positional.is_empty() {
            mappings.push(parse_positional(&self.positional).map_err(UsageError)?);
        }
        if let (Some(listen), Some(to)) = (self.listen.clone(), self.to.clone()) {
            mappings.push(Mapping { listen, to });
        }
        mappings.extend(self.maps.iter().cloned());
        if mappings.is_empty() {
            return Err(UsageError(
                "nothing to forward: give LOCAL_IP LOCAL_PORT REMOTE_CID REMOTE_PORT, --listen and --to, or --map LISTEN=TO".into(),
            ));
        }
        Ok((mappings, self))
    }

    /// Does what --hosts asks, then starts one relay serving every forwarding.
    pub fn start(self) -> anyhow::Result<Running> {
        let (mappings, args) = self.mappings()?;
        let wants_loopback = !args.hosts.is_empty() || args.loopback_up;
        if wants_loopback
            && vsock_relay_engine::bring_up_loopback()
                .context("cannot bring the loopback interface up (run as root)")?
        {
            tracing::info!("loopback interface brought up");
        }
        if !args.hosts.is_empty() {
            let added = ensure_hosts(&args.hosts_file, [127, 0, 0, 1].into(), &args.hosts)
                .map_err(anyhow::Error::msg)?;
            if !added.is_empty() {
                tracing::info!(file = %args.hosts_file.display(), names = %added.join(" "), "hosts entries added");
            }
        }
        let mut services = Vec::with_capacity(mappings.len());
        for Mapping { listen, to } in mappings {
            let target = Target::new(&to, &args.engine.dns(IpFamily::Any))
                .with_context(|| format!("cannot use {to}"))?;
            let transparent = args.transparent && Some(&listen) == args.listen.as_ref();
            if transparent && !matches!(listen, Endpoint::Tcp { .. }) {
                return Err(UsageError(format!("--transparent takes a TCP --listen, not {listen}")).into());
            }
            services.push(Service { transparent, ..args.engine.service(listen, target) });
        }
        args.engine.launch(services, args.workers.workers)
    }
}

/// One forwarding: where to listen, where to connect.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mapping {
    pub listen: Endpoint,
    pub to: Endpoint,
}

/// A listen endpoint as the user may type it: an endpoint, or a bare port,
/// which means TCP on 127.0.0.1 (a forwarder serves its own enclave only).
pub fn parse_listen(text: &str) -> Result<Endpoint, String> {
    if let Ok(port) = text.parse::<u16>() {
        return Ok(Endpoint::Tcp { host: Host::Ip([127, 0, 0, 1].into()), port });
    }
    text.parse().map_err(|e: vsock_relay_engine::endpoint::EndpointParseError| e.to_string())
}

/// Parses `--map LISTEN=TO`.
pub fn parse_mapping(text: &str) -> Result<Mapping, String> {
    let (listen, to) = text.split_once('=').ok_or_else(|| format!("`{text}`: expected LISTEN=TO"))?;
    Ok(Mapping { listen: parse_listen(listen)?, to: to.parse().map_err(|e| format!("{e}"))? })
}

/// The workshop's positional form: `LOCAL_IP LOCAL_PORT REMOTE_CID REMOTE_PORT`.
pub fn parse_positional(args: &[String]) -> Result<Mapping, String> {
    let [ip, port, cid, remote_port] = args else {
        return Err(format!(
            "expected LOCAL_IP LOCAL_PORT REMOTE_CID REMOTE_PORT (4 values), got {}",
            args.len()
        ));
    };
    let ip: IpAddr = ip.parse().map_err(|_| format!("LOCAL_IP `{ip}` is not an IP address"))?;
    let port: u16 = port.parse().map_err(|_| format!("LOCAL_PORT `{port}` is not a port (0-65535)"))?;
    let cid: u32 = cid.parse().map_err(|_| format!("REMOTE_CID `{cid}` is not a vsock CID (a number)"))?;
    let remote_port: u32 = remote_port
        .parse()
        .map_err(|_| format!("REMOTE_PORT `{remote_port}` is not a vsock port (a number)"))?;
    Ok(Mapping { listen: Endpoint::Tcp { host: Host::Ip(ip), port }, to: Endpoint::vsock(cid, remote_port) })
}

/// Adds `address name` to a hosts file for every name it does not map to
/// `address` yet. Returns the names added. Idempotent: a second run adds
/// nothing.
pub fn ensure_hosts(file: &Path, address: IpAddr, names: &[String]) -> Result<Vec<String>, String> {
    let text = match std::fs::read_to_string(file) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(format!("cannot read {}: {e}", file.display())),
    };
    let mapped = |name: &str| {
        text.lines().any(|line| {
            let line = line.split('#').next().unwrap_or("");
            let mut words = line.split_whitespace();
            words.next().and_then(|a| a.parse::<IpAddr>().ok()) == Some(address)
                && words.any(|w| w.eq_ignore_ascii_case(name))
        })
    };
    let missing: Vec<String> = names.iter().filter(|n| !mapped(n)).cloned().collect();
    if missing.is_empty() {
        return Ok(missing);
    }
    let mut addition = String::new();
    if !text.is_empty() && !text.ends_with('\n') {
        addition.push('\n');
    }
    for name in &missing {
        addition.push_str(&format!("{address} {name}\n"));
    }
    use std::io::Write;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(file)
        .and_then(|mut f| f.write_all(addition.as_bytes()))
        .map_err(|e| {
            format!(
                "cannot add {} to {}: {e} (run as root, or add the line yourself: `{address} {}`)",
                missing.join(", "),
                file.display(),
                missing[0]
            )
        })?;
    Ok(missing)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workshop_positional_form() {
        let args: Vec<String> = ["127.0.0.1", "443", "3", "8001"].map(String::from).to_vec();
        let mapping = parse_positional(&args).unwrap();
        assert_eq!(mapping.listen.to_string(), "tcp:127.0.0.1:443");
        assert_eq!(mapping.to.to_string(), "vsock:3:8001");
        let bad: Vec<String> = ["127.0.0.1", "443", "x", "8001"].map(String::from).to_vec();
        assert_eq!(parse_positional(&bad).unwrap_err(), "REMOTE_CID `x` is not a vsock CID (a number)");
        assert!(parse_positional(&args[..3]).unwrap_err().contains("got 3"));
    }

    #[test]
    fn mappings_and_bare_ports_bind_loopback() {
        let m = parse_mapping("443=vsock:3:8001").unwrap();
        assert_eq!(
            (m.listen.to_string(), m.to.to_string()),
            ("tcp:127.0.0.1:443".into(), "vsock:3:8001".into())
        );
        assert!(parse_mapping("443").unwrap_err().contains("LISTEN=TO"));
        assert!(parse_mapping("443=vsock:x:1").unwrap_err().contains("bad vsock CID"));
    }

    #[test]
    fn hosts_lines_are_added_once() {
        let dir = std::env::temp_dir().join(format!("forward-hosts-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("hosts");
        std::fs::write(&file, "127.0.0.1 localhost\n10.0.0.1 other.example").unwrap();
        let names = vec!["ip-ranges.amazonaws.com".to_string(), "localhost".to_string()];
        let local: IpAddr = [127, 0, 0, 1].into();
        assert_eq!(ensure_hosts(&file, local, &names).unwrap(), vec!["ip-ranges.amazonaws.com".to_string()]);
        assert!(ensure_hosts(&file, local, &names).unwrap().is_empty(), "a second run adds nothing");
        assert_eq!(
            std::fs::read_to_string(&file).unwrap(),
            "127.0.0.1 localhost\n10.0.0.1 other.example\n127.0.0.1 ip-ranges.amazonaws.com\n"
        );
        let err = ensure_hosts(Path::new("/proc/version"), local, &names).unwrap_err();
        assert!(err.starts_with("cannot add ip-ranges.amazonaws.com, localhost to /proc/version"), "{err}");
        assert!(err.contains("add the line yourself: `127.0.0.1 ip-ranges.amazonaws.com`"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
