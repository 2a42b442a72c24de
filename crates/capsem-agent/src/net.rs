//! The guest side of the air gap: a DNS server and a TCP relay on `10.0.0.1`, both of which can
//! only reach the host over the channel (port 5002). Boot gives the guest no route anywhere
//! (`boot::system`), so these two are its only way out:
//!
//! ```text
//!   resolver ──UDP :53──▶ dns ──NetOpen::Dns──▶ host policy ──▶ A 10.0.0.1 | NXDOMAIN
//!   client ──TCP :443/:80──▶ relay ──NetOpen::Tcp + raw bytes──▶ host MITM proxy
//! ```
//!
//! Both start once and use whichever host connection is current ([`HostLink`]), so they keep
//! working across a host reconnect.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};

use capsem_proto::frame;
use capsem_proto::mux::MuxHandle;
use capsem_proto::net::{DnsAnswer, NetOpen, GUEST_ADDR, RELAY_PORTS};
use capsem_proto::port;
use simple_dns::rdata::{RData, A};
use simple_dns::{Packet, PacketFlag, ResourceRecord, CLASS, QTYPE, RCODE, TYPE};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream, UdpSocket};

/// The relay's copy buffer, each way: the most the guest's virtio console takes in one write.
const RELAY_BUF: usize = 32 * 1024;

/// TTL of the answers: short, so that a policy edit reaches a running session at once.
const TTL: u32 = 5;

/// The current host connection's mux handle (none while the host is away).
#[derive(Clone, Default)]
pub struct HostLink(Arc<Mutex<Option<MuxHandle>>>);

impl HostLink {
    pub fn set(&self, h: Option<MuxHandle>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = h;
    }

    fn get(&self) -> Option<MuxHandle> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Bind the DNS server and the relay ports and serve them for the life of the agent.
/// Binding failures (no `10.0.0.1`, e.g. a standalone agent) are reported and skipped.
pub fn start(link: HostLink) {
    let addr = Ipv4Addr::from(GUEST_ADDR);
    let l = link.clone();
    tokio::spawn(async move {
        match UdpSocket::bind(SocketAddr::from((addr, 53))).await {
            Ok(sock) => dns_server(Arc::new(sock), l).await,
            Err(e) => crate::console::line(&format!("dns: cannot bind {addr}:53: {e}")),
        }
    });
    for p in RELAY_PORTS {
        let l = link.clone();
        tokio::spawn(async move {
            match TcpListener::bind(SocketAddr::from((addr, p))).await {
                Ok(listener) => relay(listener, p, l).await,
                Err(e) => crate::console::line(&format!("relay: cannot bind {addr}:{p}: {e}")),
            }
        });
    }
}

async fn dns_server(sock: Arc<UdpSocket>, link: HostLink) {
    let mut buf = vec![0u8; 1500];
    loop {
        let Ok((n, peer)) = sock.recv_from(&mut buf).await else {
            continue;
        };
        let query = buf[..n].to_vec();
        let (sock, link) = (sock.clone(), link.clone());
        tokio::spawn(async move {
            if let Some(reply) = answer(&query, &link).await {
                let _ = sock.send_to(&reply, peer).await;
            }
        });
    }
}

/// Ask the host whether `name` may resolve; any failure counts as a denial.
async fn ask_host(link: &HostLink, name: &str) -> bool {
    let Some(h) = link.get() else { return false };
    let Ok(mut s) = h.open(port::MITM).await else {
        return false;
    };
    let open = NetOpen::Dns {
        name: name.to_string(),
    };
    if frame::write_frame(&mut s, &open).await.is_err() {
        return false;
    }
    matches!(
        frame::read_frame::<_, DnsAnswer>(&mut s).await,
        Ok(Some(DnsAnswer::Allow))
    )
}

/// The reply to one DNS query: A 10.0.0.1 for an allowed name, an empty answer for other
/// record types of an allowed name, NXDOMAIN otherwise. `None` for packets that are not queries.
async fn answer(query: &[u8], link: &HostLink) -> Option<Vec<u8>> {
    let q = Packet::parse(query).ok()?;
    let question = q.questions.first()?.clone();
    let name = question.qname.to_string();
    let mut reply = q.clone().into_reply();
    reply.set_flags(PacketFlag::RECURSION_AVAILABLE);
    if ask_host(link, &name).await {
        if question.qtype == QTYPE::TYPE(TYPE::A) {
            reply.answers.push(ResourceRecord::new(
                question.qname.clone(),
                CLASS::IN,
                TTL,
                RData::A(A {
                    address: u32::from(Ipv4Addr::from(GUEST_ADDR)),
                }),
            ));
        }
    } else {
        *reply.rcode_mut() = RCODE::NameError;
    }
    reply.build_bytes_vec().ok()
}

async fn relay(listener: TcpListener, p: u16, link: HostLink) {
    loop {
        let Ok((conn, _)) = listener.accept().await else {
            continue;
        };
        let link = link.clone();
        tokio::spawn(async move { relay_one(conn, p, link).await });
    }
}

async fn relay_one(mut conn: TcpStream, p: u16, link: HostLink) {
    let _ = conn.set_nodelay(true);
    let Some(h) = link.get() else { return };
    // Who connected, looked up while the stream to the host opens.
    let peer_port = conn.peer_addr().map(|a| a.port()).unwrap_or(0);
    let (process, up) = tokio::join!(
        tokio::task::spawn_blocking(move || process_of(peer_port, p)),
        h.open(port::MITM)
    );
    let Ok(mut up) = up else {
        return;
    };
    let open = NetOpen::Tcp {
        port: p,
        process: process.ok().flatten(),
    };
    if frame::write_frame(&mut up, &open).await.is_err() {
        return;
    }
    // 32 KiB a read each way (tokio's default is 8 KiB): an upload crosses the channel in
    // fewer, larger frames.
    let _ =
        tokio::io::copy_bidirectional_with_sizes(&mut conn, &mut up, RELAY_BUF, RELAY_BUF).await;
    let _ = conn.shutdown().await;
}

/// The command name of the guest process owning the client end of a relayed connection (local
/// port `client_port`, remote port `relay_port`): its socket inode from `/proc/net/tcp`, then
/// the process holding that inode among `/proc/<pid>/fd`. `None` when it cannot be told.
pub fn process_of(client_port: u16, relay_port: u16) -> Option<String> {
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    let inode = socket_inode(&table, client_port, relay_port)?;
    let target = format!("socket:[{inode}]");
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == target.as_str()) {
                let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
                return Some(comm.trim_end().to_string());
            }
        }
    }
    None
}

/// The inode of the `/proc/net/tcp` row whose local port is `local` and remote port `remote`.
fn socket_inode(table: &str, local: u16, remote: u16) -> Option<u64> {
    let port = |addr: &str| {
        addr.rsplit_once(':')
            .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
    };
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() > 9 && port(f[1]) == Some(local) && port(f[2]) == Some(remote) {
            f[9].parse().ok().filter(|i| *i != 0)
        } else {
            None
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_client_row_of_a_relayed_connection() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 0100000A:01BB 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1111 1 0000000000000000 100 0 0 10 0\n\
   1: 0100000A:9C40 0100000A:01BB 01 00000000:00000000 00:00000000 00000000     0        0 4242 1 0000000000000000 20 4 30 10 -1\n\
   2: 0100000A:01BB 0100000A:9C40 01 00000000:00000000 00:00000000 00000000     0        0 5151 1 0000000000000000 20 4 30 10 -1\n";
        assert_eq!(socket_inode(table, 0x9C40, 443), Some(4242));
        assert_eq!(socket_inode(table, 443, 0x9C40), Some(5151));
        assert_eq!(socket_inode(table, 1, 443), None);
    }

    #[test]
    fn names_the_process_holding_a_real_socket() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (port, remote) = (
            c.local_addr().unwrap().port(),
            l.local_addr().unwrap().port(),
        );
        let me = std::fs::read_to_string("/proc/self/comm").unwrap();
        assert_eq!(process_of(port, remote).as_deref(), Some(me.trim_end()));
    }
}
