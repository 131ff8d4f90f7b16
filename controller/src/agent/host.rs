//! What the agent learns from the node itself: which host-side veth leads to
//! a pod, which cgroup holds it (kubelet's hierarchy), and the node's own
//! addresses.
//!
//! A pod's veth is found whatever wired it. Routed CNIs (ptp, Calico,
//! kindnet) route the pod's address to its veth; bridge CNIs (bridge,
//! flannel) route the whole subnet to the bridge, whose ports are the veths.
//! Either way the proof is the same: a veth whose other end is in another
//! network namespace, where that end holds the pod's address. The agent asks
//! the kernel for the addresses of that namespace by its id (netlink's
//! target-netnsid, CAP_NET_ADMIN), without entering it.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::{Path, PathBuf},
};

use futures::TryStreamExt;
use rtnetlink::packet_core::DefaultNla;
use rtnetlink::packet_route::{
    address::{AddressAttribute, AddressMessage, AddressScope},
    link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage},
    route::RouteAttribute,
    AddressFamily,
};
use rtnetlink::{
    sys::{AsyncSocket, TokioSocket},
    Handle, RouteMessageBuilder,
};

/// `IFA_TARGET_NETNSID`: the address dump of another namespace, by its id.
const IFA_TARGET_NETNSID: u16 = 10;

/// A pod's host-side interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostInterface {
    pub name: String,
    pub ifindex: u32,
}

/// Where a pod's address leads on this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Wiring {
    /// The host side of the pod's veth.
    Veth(HostInterface),
    /// No veth leads to the pod: why, for the operator.
    Missing(String),
}

/// A veth of this node coming or going, as the kernel announces it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VethEvent {
    /// A veth whose other end is in another namespace appeared (or changed).
    Added(HostInterface),
    /// An interface went away (any kind: the message may lack the veth's details).
    Removed(HostInterface),
    /// The kernel dropped announcements (the socket's buffer overflowed):
    /// what came and went meanwhile is unknown.
    Lost,
}

/// Follow the veths of this network namespace as they come and go: the
/// host side of a pod's veth appears when the CNI wires the pod, before
/// kubelet reports the pod's address.
pub fn veth_events() -> std::io::Result<tokio::sync::mpsc::UnboundedReceiver<VethEvent>> {
    use futures::StreamExt;
    use rtnetlink::packet_core::NetlinkPayload;
    use rtnetlink::packet_route::RouteNetlinkMessage;
    let (mut connection, _, mut messages) = rtnetlink::new_connection()?;
    let groups = rtnetlink::sys::SocketAddr::new(0, rtnetlink::constants::RTMGRP_LINK);
    connection.socket_mut().socket_mut().bind(&groups)?;
    tokio::spawn(connection);
    let (events, received) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some((message, _)) = messages.next().await {
            let event = match message.payload {
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link)) => {
                    veth_of(&link).map(|veth| VethEvent::Added(veth.interface))
                }
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(link)) => {
                    Some(VethEvent::Removed(HostInterface { name: name_of(&link), ifindex: link.header.index }))
                }
                NetlinkPayload::Overrun(_) => Some(VethEvent::Lost),
                _ => None,
            };
            if event.is_some_and(|event| events.send(event).is_err()) {
                return;
            }
        }
    });
    Ok(received)
}

/// A veth of this node whose other end is in another namespace.
struct Veth {
    interface: HostInterface,
    /// The namespace of the other end, as this namespace numbers it.
    peer_netns: i32,
    /// The other end's ifindex there.
    peer_ifindex: u32,
}

pub struct Host {
    netlink: Handle,
    /// A second connection with strict checking on, which the kernel
    /// requires to honour a target namespace in a dump.
    peers: Handle,
    cgroup_root: Option<PathBuf>,
}

impl Host {
    /// Open netlink connections in this process's network namespace.
    pub fn new(cgroup_root: Option<PathBuf>) -> std::io::Result<Self> {
        let (connection, netlink, _) = rtnetlink::new_connection()?;
        tokio::spawn(connection);
        let socket = TokioSocket::new(rtnetlink::sys::protocols::NETLINK_ROUTE)?;
        socket.socket_ref().set_netlink_get_strict_chk(true)?;
        let (connection, peers, _) = rtnetlink::from_socket(socket);
        tokio::spawn(connection);
        Ok(Self { netlink, peers, cgroup_root })
    }

    /// The veth that leads to `address`: the one the node routes it out of
    /// when that veth's other end holds it (routed CNIs), else any veth whose
    /// other end holds it (bridges). `Missing` says what the node does with
    /// the address instead.
    pub async fn wiring(&self, address: IpAddr) -> Result<Wiring, rtnetlink::Error> {
        let route = self.route_device(address).await?;
        if let Some(link) = &route {
            if let Some(veth) = veth_of(link) {
                if self.peer_holds(&veth, address).await? {
                    return Ok(Wiring::Veth(veth.interface));
                }
            }
        }
        for veth in self.veths().await? {
            if self.peer_holds(&veth, address).await? {
                return Ok(Wiring::Veth(veth.interface));
            }
        }
        let why = match route.as_ref().map(|link| (name_of(link), kind_of(link))) {
            None => format!("the node has no route to {address} yet (the CNI has not wired the pod)"),
            Some((name, Some(InfoKind::Bridge))) => {
                format!("the node routes {address} to the bridge {name}, and no veth's other end holds it yet")
            }
            Some((name, Some(InfoKind::MacVlan | InfoKind::IpVlan | InfoKind::MacVtap | InfoKind::IpVtap))) => format!(
                "the node routes {address} to {name}, a macvlan/ipvlan device: such pods have no host-side veth, which Bulkhead needs (unsupported)"
            ),
            Some((name, kind)) => format!(
                "the node routes {address} to {name} ({}), and no veth's other end holds it: the pod is not wired by a veth-based CNI (unsupported), or not yet",
                kind.map(|k| format!("{k:?}").to_lowercase()).unwrap_or_else(|| "no kind".into())
            ),
        };
        Ok(Wiring::Missing(why))
    }

    /// The device the node routes `address` out of directly (no gateway).
    async fn route_device(&self, address: IpAddr) -> Result<Option<LinkMessage>, rtnetlink::Error> {
        let request = match address {
            IpAddr::V4(v4) => RouteMessageBuilder::<std::net::Ipv4Addr>::new().destination_prefix(v4, 32).build(),
            IpAddr::V6(v6) => RouteMessageBuilder::<std::net::Ipv6Addr>::new().destination_prefix(v6, 128).build(),
        };
        let mut routes = self.netlink.route().get(request).execute();
        let route = match routes.try_next().await {
            Ok(Some(route)) => route,
            Ok(None) => return Ok(None),
            // No route at all (ENETUNREACH): the pod is not wired yet.
            Err(rtnetlink::Error::NetlinkError(_)) => return Ok(None),
            Err(error) => return Err(error),
        };
        if route.attributes.iter().any(|a| matches!(a, RouteAttribute::Gateway(_))) {
            return Ok(None);
        }
        let Some(ifindex) = route.attributes.iter().find_map(|a| match a {
            RouteAttribute::Oif(index) => Some(*index),
            _ => None,
        }) else {
            return Ok(None);
        };
        let mut links = self.netlink.link().get().match_index(ifindex).execute();
        links.try_next().await
    }

    /// The host sides of this node's veths whose other end is in another
    /// namespace.
    pub async fn veth_interfaces(&self) -> Result<Vec<HostInterface>, rtnetlink::Error> {
        Ok(self.veths().await?.into_iter().map(|veth| veth.interface).collect())
    }

    /// Every veth of this node whose other end is in another namespace.
    async fn veths(&self) -> Result<Vec<Veth>, rtnetlink::Error> {
        let links: Vec<LinkMessage> = self.netlink.link().get().execute().try_collect().await?;
        Ok(links.iter().filter_map(veth_of).collect())
    }

    /// Whether a veth's other end holds `address`.
    async fn peer_holds(&self, veth: &Veth, address: IpAddr) -> Result<bool, rtnetlink::Error> {
        let mut request = self.peers.address().get();
        let message: &mut AddressMessage = request.message_mut();
        message.header.family = if address.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 };
        message.header.index = veth.peer_ifindex;
        message
            .attributes
            .push(AddressAttribute::Other(DefaultNla::new(IFA_TARGET_NETNSID, veth.peer_netns.to_ne_bytes().to_vec())));
        let messages: Vec<AddressMessage> = match request.execute().try_collect().await {
            Ok(messages) => messages,
            // The namespace went away meanwhile (a pod deleted).
            Err(rtnetlink::Error::NetlinkError(_)) => return Ok(false),
            Err(error) => return Err(error),
        };
        Ok(messages.iter().filter(|m| m.header.index == veth.peer_ifindex).any(|m| {
            m.attributes
                .iter()
                .any(|a| matches!(a, AddressAttribute::Address(a) | AddressAttribute::Local(a) if *a == address))
        }))
    }

    /// The node's own addresses (global scope): kubelet probes come from them.
    pub async fn node_addresses(&self) -> Result<BTreeSet<IpAddr>, rtnetlink::Error> {
        let mut out = BTreeSet::new();
        let mut addresses = self.netlink.address().get().execute();
        while let Some(message) = addresses.try_next().await? {
            if message.header.scope != AddressScope::Universe {
                continue;
            }
            for attribute in &message.attributes {
                if let AddressAttribute::Address(address) | AddressAttribute::Local(address) = attribute {
                    if !address.is_loopback() {
                        out.insert(*address);
                    }
                }
            }
        }
        Ok(out)
    }

    /// The cgroup of a pod, found by its UID the way kubelet names it.
    pub fn cgroup_of(&self, uid: &str) -> Option<PathBuf> {
        find_pod_cgroup(self.cgroup_root.as_deref()?, uid)
    }

    /// Every interface of this network namespace: name → ifindex.
    pub async fn interfaces(&self) -> Result<BTreeMap<String, u32>, rtnetlink::Error> {
        let links: Vec<LinkMessage> = self.netlink.link().get().execute().try_collect().await?;
        Ok(links.iter().map(|link| (name_of(link), link.header.index)).collect())
    }

    /// The cgroups of the pods with these UIDs that exist now (path → id,
    /// its inode), or `None` without a cgroup root.
    pub fn pod_cgroups(&self, uids: &BTreeSet<&str>) -> Option<BTreeMap<PathBuf, u64>> {
        use std::os::unix::fs::MetadataExt;
        let root = self.cgroup_root.as_deref()?;
        Some(
            cgroup_tree(root)
                .filter(|dir| pod_uid_of(dir).is_some_and(|uid| uids.contains(uid.as_str())))
                .filter_map(|dir| {
                    let id = std::fs::metadata(&dir).ok()?.ino();
                    Some((dir, id))
                })
                .collect(),
        )
    }
}

fn name_of(link: &LinkMessage) -> String {
    link.attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::IfName(name) => Some(name.clone()),
            _ => None,
        })
        .unwrap_or_else(|| format!("ifindex {}", link.header.index))
}

fn kind_of(link: &LinkMessage) -> Option<InfoKind> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
            LinkInfo::Kind(kind) => Some(kind.clone()),
            _ => None,
        }),
        _ => None,
    })
}

/// A veth whose other end is in another namespace (its peer's namespace id
/// and ifindex are known); `None` for anything else.
fn veth_of(link: &LinkMessage) -> Option<Veth> {
    if kind_of(link) != Some(InfoKind::Veth) {
        return None;
    }
    let peer_netns = link.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkNetNsId(id) => Some(*id),
        _ => None,
    })?;
    let peer_ifindex = link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Link(index) => Some(*index),
        _ => None,
    })?;
    let interface = HostInterface { name: name_of(link), ifindex: link.header.index };
    Some(Veth { interface, peer_netns, peer_ifindex })
}

/// How deep under the root kubelet puts a pod's cgroup, at most (its own
/// --cgroup-root, kubepods, the QoS class, the pod, with room to spare).
const POD_CGROUP_DEPTH: usize = 6;

/// The cgroup directories under `root`, level by level, down to
/// `POD_CGROUP_DEPTH`.
fn cgroup_tree(root: &Path) -> impl Iterator<Item = PathBuf> {
    let mut queue = std::collections::VecDeque::from([(root.to_path_buf(), 0)]);
    let mut children = Vec::<(PathBuf, usize)>::new().into_iter();
    std::iter::from_fn(move || loop {
        if let Some((dir, depth)) = children.next() {
            if depth < POD_CGROUP_DEPTH {
                queue.push_back((dir.clone(), depth));
            }
            return Some(dir);
        }
        let (dir, depth) = queue.pop_front()?;
        children = std::fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|entry| entry.file_type().is_ok_and(|t| t.is_dir()))
            .map(|entry| (entry.path(), depth + 1))
            .collect::<Vec<_>>()
            .into_iter();
    })
}

/// The UID of the pod whose cgroup `dir` is: kubelet names it `pod<uid>`
/// (cgroupfs driver) or `kubepods-<qos>-pod<uid with _ for ->.slice` (systemd
/// driver).
fn pod_uid_of(dir: &Path) -> Option<String> {
    let name = dir.file_name()?.to_str()?;
    if let Some(uid) = name.strip_prefix("pod") {
        return Some(uid.to_string());
    }
    let (_, uid) = name.strip_suffix(".slice")?.rsplit_once("-pod")?;
    Some(uid.replace('_', "-"))
}

/// A pod's cgroup, a few levels under the root (kubelet's own --cgroup-root,
/// kubepods, the QoS class).
pub fn find_pod_cgroup(root: &Path, uid: &str) -> Option<PathBuf> {
    cgroup_tree(root).find(|dir| pod_uid_of(dir).as_deref() == Some(uid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_cgroups_are_found_under_both_kubelet_drivers() {
        let root = std::env::temp_dir().join(format!("bulkhead-cgroup-test-{}", std::process::id()));
        let cgroupfs = root.join("kubepods/burstable/pod1234-ab");
        std::fs::create_dir_all(root.join("kubepods/burstable/xpod77")).unwrap();
        let systemd = root.join("kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod99_cd.slice");
        std::fs::create_dir_all(&cgroupfs).unwrap();
        std::fs::create_dir_all(&systemd).unwrap();
        assert_eq!(find_pod_cgroup(&root, "1234-ab"), Some(cgroupfs));
        assert_eq!(find_pod_cgroup(&root, "99-cd"), Some(systemd));
        assert_eq!(find_pod_cgroup(&root, "77"), None);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
