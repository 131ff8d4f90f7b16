//! What the agent learns from the node itself: which host-side veth leads to
//! a pod (a route lookup, then the link, as a CNI left them), which cgroup
//! holds it (kubelet's hierarchy), and the node's own addresses.

use std::{
    collections::BTreeSet,
    net::IpAddr,
    path::{Path, PathBuf},
};

use futures::TryStreamExt;
use rtnetlink::packet_route::{
    address::{AddressAttribute, AddressScope},
    link::{InfoKind, LinkAttribute, LinkInfo},
    route::RouteAttribute,
};
use rtnetlink::{Handle, RouteMessageBuilder};

/// A pod's host-side interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostInterface {
    pub name: String,
    pub ifindex: u32,
}

pub struct Host {
    netlink: Handle,
    cgroup_root: Option<PathBuf>,
}

impl Host {
    /// Open a netlink connection in this process's network namespace.
    pub fn new(cgroup_root: Option<PathBuf>) -> std::io::Result<Self> {
        let (connection, netlink, _) = rtnetlink::new_connection()?;
        tokio::spawn(connection);
        Ok(Self { netlink, cgroup_root })
    }

    /// The veth the node routes `address` out of, when there is one: a route
    /// through a gateway or to a device that is not a veth leads elsewhere.
    pub async fn interface_to(&self, address: IpAddr) -> Result<Option<HostInterface>, rtnetlink::Error> {
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
        let Some(link) = links.try_next().await? else { return Ok(None) };
        let is_veth = link.attributes.iter().any(|a| matches!(a, LinkAttribute::LinkInfo(infos) if infos.iter().any(|i| matches!(i, LinkInfo::Kind(InfoKind::Veth)))));
        let name = link.attributes.iter().find_map(|a| match a {
            LinkAttribute::IfName(name) => Some(name.clone()),
            _ => None,
        });
        Ok(name.filter(|_| is_veth).map(|name| HostInterface { name, ifindex }))
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
}

/// kubelet names a pod's cgroup `pod<uid>` (cgroupfs driver) or
/// `kubepods-<qos>-pod<uid with _ for ->.slice` (systemd driver), a few levels
/// under the root.
pub fn find_pod_cgroup(root: &Path, uid: &str) -> Option<PathBuf> {
    let cgroupfs = format!("pod{uid}");
    let systemd = format!("pod{}.slice", uid.replace('-', "_"));
    let mut level = vec![root.to_path_buf()];
    for _ in 0..4 {
        let mut next = Vec::new();
        for dir in level {
            for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                let name = entry.file_name().to_string_lossy().into_owned();
                if name == cgroupfs || name.ends_with(&format!("-{systemd}")) {
                    return Some(entry.path());
                }
                next.push(entry.path());
            }
        }
        level = next;
    }
    None
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
