//! What this machine says about its vsock and its sockets, read from /sys,
//! /proc and `/dev/vsock` without opening any socket: which vsock
//! transports are loaded, the local CID, and which process holds a TCP port
//! or a Unix socket path. Start-up errors ([`crate::hint`]) and `vsock-relay
//! doctor` read the same facts.

use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

use crate::endpoint::{Endpoint, Host};
use crate::sys;

/// The kernel modules that make AF_VSOCK work, and what each one means here.
pub const VSOCK_MODULES: [(&str, &str); 5] = [
    ("vsock", "the AF_VSOCK core"),
    ("vmw_vsock_virtio_transport", "guest transport (virtio): reaches this machine's host or Nitro parent"),
    ("vhost_vsock", "host transport (vhost): reaches VMs this machine runs"),
    ("vsock_loopback", "loopback transport: CID 1, this machine to itself"),
    ("nitro_enclaves", "the Nitro Enclaves driver: this is a parent instance"),
];

/// Whether a kernel module is loaded or built in. Built-in modules show in
/// /sys/module only when they have parameters, so modules.builtin is asked too.
pub fn module_loaded(name: &str) -> bool {
    if Path::new("/sys/module").join(name).exists() {
        return true;
    }
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let builtin = std::fs::read_to_string(format!("/lib/modules/{}/modules.builtin", release.trim()));
    let file = format!("/{name}.ko");
    builtin.is_ok_and(|list| list.lines().any(|line| line.ends_with(&file)))
}

/// This machine's vsock CID, as `/dev/vsock` reports it (the guest
/// transport's CID; the host transport's, 2, when only that is loaded).
/// `None` when no transport gives this machine a CID (loopback only).
pub fn local_cid() -> io::Result<Option<u32>> {
    let cid = sys::vsock_local_cid()?;
    Ok((cid != crate::endpoint::VSOCK_CID_ANY).then_some(cid))
}

/// Whether `:to-host=auto` sets `VMADDR_FLAG_TO_HOST` here: on a Nitro
/// parent (the nitro_enclaves driver is loaded), whose enclaves are reached
/// through the guest transport only, when the kernel knows the flag (5.11;
/// older kernels refuse a non-zero flags byte with EINVAL).
pub fn to_host_auto() -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    to_host_rule(module_loaded("nitro_enclaves"), kernel_version(&release))
}

/// The rule of [`to_host_auto`].
fn to_host_rule(nitro_parent: bool, kernel: (u32, u32)) -> bool {
    nitro_parent && kernel >= (5, 11)
}

/// `(major, minor)` of a kernel release string (`6.1.0-27-amd64`).
pub fn kernel_version(release: &str) -> (u32, u32) {
    let mut numbers = release.trim().split(|c: char| !c.is_ascii_digit()).filter_map(|n| n.parse().ok());
    (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0))
}

/// A process that holds a socket, as /proc tells.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holder {
    pub pid: u32,
    /// Its command name (`/proc/PID/comm`).
    pub name: String,
}

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PID {} ({})", self.pid, self.name)
    }
}

/// Whether something listens on a TCP or Unix `endpoint` in this network
/// namespace, and who: `Some(None)` when a listener exists but no process
/// we may look into holds it. Vsock listeners are not listed in /proc: `None`.
pub fn listener(endpoint: &Endpoint) -> Option<Option<Holder>> {
    let inode = match endpoint {
        Endpoint::Tcp { host, port } => tcp_listener_inode(host, *port),
        Endpoint::Unix { path } => unix_listener_inode(path),
        Endpoint::Vsock { .. } => None,
    }?;
    Some(socket_holder(inode))
}

/// The inode of a TCP socket listening on `port` at `host` (or at the
/// unspecified address, which covers it), from /proc/net/tcp and tcp6.
fn tcp_listener_inode(host: &Host, port: u16) -> Option<u64> {
    const LISTEN: &str = "0A";
    let wanted = match host {
        Host::Ip(ip) => Some(*ip),
        Host::Name(_) => None,
    };
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().find_map(|table| {
        let text = std::fs::read_to_string(table).ok()?;
        text.lines().skip(1).find_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (local, state, inode) = (fields.get(1)?, fields.get(3)?, fields.get(9)?);
            let (address, listen_port) = local.split_once(':')?;
            let address = proc_net_address(address)?;
            let covers = match wanted {
                None => true,
                Some(ip) => address == ip || address.is_unspecified() || ip.is_unspecified(),
            };
            (*state == LISTEN && u16::from_str_radix(listen_port, 16).ok()? == port && covers)
                .then(|| inode.parse().ok())
                .flatten()
        })
    })
}

/// An address as /proc/net/tcp{,6} writes it: the bytes in network order,
/// printed as 32-bit words in the machine's order.
fn proc_net_address(hex: &str) -> Option<IpAddr> {
    let mut bytes = Vec::with_capacity(16);
    for word in 0..hex.len() / 8 {
        let value = u32::from_str_radix(hex.get(word * 8..word * 8 + 8)?, 16).ok()?;
        bytes.extend_from_slice(&value.to_ne_bytes());
    }
    match bytes.len() {
        4 => Some(IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(bytes).ok()?))),
        16 => {
            let v6 = Ipv6Addr::from(<[u8; 16]>::try_from(bytes).ok()?);
            Some(v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4))
        }
        _ => None,
    }
}

/// The inode of a Unix stream socket listening at `path` (/proc/net/unix).
fn unix_listener_inode(path: &Path) -> Option<u64> {
    const ACCEPTING: u32 = 0x0001_0000; // __SO_ACCEPTCON
    let text = std::fs::read_to_string("/proc/net/unix").ok()?;
    let path = path.to_str()?;
    text.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let flags = u32::from_str_radix(fields.get(3)?, 16).ok()?;
        (fields.get(7) == Some(&path) && flags & ACCEPTING != 0)
            .then(|| fields.get(6)?.parse().ok())
            .flatten()
    })
}

/// The process with a descriptor on socket `inode`, if /proc lets us see it.
fn socket_holder(inode: u64) -> Option<Holder> {
    let link = format!("socket:[{inode}]");
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|entry| {
        let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
        let holds = std::fs::read_dir(entry.path().join("fd"))
            .ok()?
            .flatten()
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|target| target.as_os_str() == link.as_str()));
        holds.then(|| {
            let name = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
            Holder { pid, name: name.trim().to_string() }
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn to_host_auto_only_on_a_nitro_parent_with_the_flag() {
        assert!(to_host_rule(true, kernel_version("6.1.0-27-amd64")));
        assert!(to_host_rule(true, kernel_version("5.11.0")));
        assert!(!to_host_rule(true, kernel_version("5.10.228-219.884.amzn2.x86_64")), "no flag before 5.11");
        assert!(
            !to_host_rule(false, kernel_version("6.12.1")),
            "no Nitro parent: the kernel's choice stands"
        );
    }

    #[test]
    fn proc_net_addresses_read_in_machine_order() {
        // 127.0.0.1 as x86 and arm64 (little-endian) print it.
        assert_eq!(proc_net_address("0100007F"), Some(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        assert_eq!(
            proc_net_address("00000000000000000000000001000000"),
            Some(IpAddr::V6(Ipv6Addr::LOCALHOST))
        );
        assert_eq!(
            proc_net_address("0000000000000000FFFF00000100007F"),
            Some(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            "an IPv4-mapped listener is its IPv4 address"
        );
        assert_eq!(proc_net_address("XYZ"), None);
    }

    #[test]
    fn finds_the_process_holding_a_tcp_port_and_a_unix_path() {
        let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = held.local_addr().unwrap().port();
        let me = Holder {
            pid: std::process::id(),
            name: std::fs::read_to_string("/proc/self/comm").unwrap().trim().to_string(),
        };
        let at = |ip: [u8; 4]| Endpoint::Tcp { host: Host::Ip(ip.into()), port };
        assert_eq!(listener(&at([127, 0, 0, 1])), Some(Some(me.clone())));
        assert_eq!(listener(&at([0, 0, 0, 0])), Some(Some(me.clone())), "any address covers it");
        assert_eq!(listener(&at([127, 0, 0, 2])), None, "another address is free");
        drop(held);
        assert_eq!(listener(&at([127, 0, 0, 1])), None);

        let dir = std::env::temp_dir().join(format!("machine-holder-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s");
        let unix = std::os::unix::net::UnixListener::bind(&path).unwrap();
        assert_eq!(listener(&Endpoint::Unix { path: path.clone() }), Some(Some(me)));
        drop(unix);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
