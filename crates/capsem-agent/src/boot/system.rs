//! System setup inside the new root: devpts (with a usable `/dev/ptmx`), tmpfs on `/tmp`, `/run`
//! and `/dev/shm`, the `/dev/fd` links, `lo` up and the hostname.

use std::io;
use std::os::fd::AsRawFd;

use nix::mount::MsFlags;

use super::{mkdir, mount, BootError};

/// Create a symlink, leaving an existing entry alone.
fn link(target: &str, path: &str) -> Result<(), BootError> {
    match std::os::unix::fs::symlink(target, path) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => Err(BootError::Mkdir {
            path: path.into(),
            source: e,
        }),
        _ => Ok(()),
    }
}

/// `lo` up and the hostname (needs no root filesystem).
pub fn network_and_hostname(hostname: &str) -> Result<(), BootError> {
    loopback_up().map_err(BootError::Loopback)?;
    air_gap().map_err(BootError::Network)?;
    nix::unistd::sethostname(hostname).map_err(|e| BootError::Hostname(e.into()))?;
    Ok(())
}

/// The mounts and links of the new root (after the switch).
pub fn mounts() -> Result<(), BootError> {
    let nosuid_nodev = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    mkdir("/dev/pts")?;
    mount(
        "devpts",
        "/dev/pts",
        "devpts",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
    )?;
    // /dev/ptmx must reach this devpts instance.
    let _ = std::fs::remove_file("/dev/ptmx");
    link("pts/ptmx", "/dev/ptmx")?;
    mkdir("/dev/shm")?;
    mount(
        "tmpfs",
        "/dev/shm",
        "tmpfs",
        nosuid_nodev,
        Some("mode=1777"),
    )?;
    mkdir("/tmp")?;
    mount("tmpfs", "/tmp", "tmpfs", nosuid_nodev, Some("mode=1777"))?;
    mkdir("/run")?;
    mount("tmpfs", "/run", "tmpfs", nosuid_nodev, Some("mode=0755"))?;
    link("/proc/self/fd", "/dev/fd")?;
    link("/proc/self/fd/0", "/dev/stdin")?;
    link("/proc/self/fd/1", "/dev/stdout")?;
    link("/proc/self/fd/2", "/dev/stderr")?;
    Ok(())
}

#[repr(C)]
struct IfReq {
    name: [libc::c_char; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// The air gap's addressing: `dummy0` holds 10.0.0.1/32 (the DNS server and the relay listen
/// there) and nothing else exists — no default route, no IPv6, so every other destination is
/// unreachable. `/etc/resolv.conf` points at the agent's DNS server.
fn air_gap() -> io::Result<()> {
    for f in ["all", "default", "lo"] {
        let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{f}/disable_ipv6"), "1");
    }
    let [a, b, c, d] = capsem_proto::net::GUEST_ADDR;
    set_addr_up(b"dummy0", [a, b, c, d], [255, 255, 255, 255])?;
    std::fs::write(
        "/etc/resolv.conf",
        format!("# written by capsem-agent at boot: the air gap's DNS\nnameserver {a}.{b}.{c}.{d}\noptions timeout:2 attempts:2\n"),
    )
}

#[repr(C)]
struct IfReqAddr {
    name: [libc::c_char; libc::IFNAMSIZ],
    addr: libc::sockaddr_in,
    _pad: [u8; 8],
}

/// `ip addr add ADDR/MASK dev NAME; ip link set NAME up`, with ioctls.
fn set_addr_up(name: &[u8], addr: [u8; 4], mask: [u8; 4]) -> io::Result<()> {
    let s = ioctl_socket()?;
    // SAFETY: all-zero is a valid ifreq; the ioctls read the struct we own.
    unsafe {
        let mut req: IfReqAddr = std::mem::zeroed();
        set_name(&mut req.name, name);
        req.addr.sin_family = libc::AF_INET as libc::sa_family_t;
        req.addr.sin_addr.s_addr = u32::from_ne_bytes(addr);
        check(libc::ioctl(s.as_raw_fd(), libc::SIOCSIFADDR as _, &req))?;
        req.addr.sin_addr.s_addr = u32::from_ne_bytes(mask);
        check(libc::ioctl(s.as_raw_fd(), libc::SIOCSIFNETMASK as _, &req))?;
    }
    if_up(name)
}

/// `ip link set lo up`, with two ioctls.
fn loopback_up() -> io::Result<()> {
    if_up(b"lo")
}

/// `ip link set NAME up`: read the flags, add UP and RUNNING.
fn if_up(name: &[u8]) -> io::Result<()> {
    let s = ioctl_socket()?;
    // SAFETY: all-zero is a valid ifreq; the ioctls read/write the struct we own.
    unsafe {
        let mut req: IfReq = std::mem::zeroed();
        set_name(&mut req.name, name);
        check(libc::ioctl(
            s.as_raw_fd(),
            libc::SIOCGIFFLAGS as _,
            &mut req,
        ))?;
        req.flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        check(libc::ioctl(s.as_raw_fd(), libc::SIOCSIFFLAGS as _, &req))?;
    }
    Ok(())
}

/// A datagram socket for interface ioctls (closed when dropped).
fn ioctl_socket() -> io::Result<std::os::fd::OwnedFd> {
    // SAFETY: socket() has no memory arguments; a valid fd is owned from here on.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    check(fd)?;
    // SAFETY: fd was just returned by socket() and is owned by nobody else.
    Ok(unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) })
}

fn set_name(field: &mut [libc::c_char; libc::IFNAMSIZ], name: &[u8]) {
    for (d, b) in field.iter_mut().zip(name.iter().take(libc::IFNAMSIZ - 1)) {
        *d = *b as libc::c_char;
    }
}

fn check(r: libc::c_int) -> io::Result<()> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}
