//! Outbound spreading (`manage_routes`): a multipath default route over the validated uplinks, one per family,
//! weighted per uplink and kept current; removed on exit, so the routes the system had come back into force.
//!
//! The route is marked with its own routing protocol number and installed with its own metric, so the system's
//! default routes are never touched, and discovery can tell them apart (it ignores ours).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use netlink_packet_route::route::{RouteMessage, RouteProtocol};
use rtnetlink::{Handle, RouteMessageBuilder, RouteNextHopBuilder};
use tracing::{info, warn};

use super::state::Candidate;

/// The routing protocol number tether's routes carry (`ip route` shows `proto 222`).
pub const PROTOCOL: u8 = 222;

/// The multipath routes installed, per family.
pub struct RouteManager {
    handle: Handle,
    metric: u32,
    installed: [Option<Vec<(u32, IpAddr, u8)>>; 2],
}

impl RouteManager {
    /// A manager installing its routes with `metric` (lower than the system's routes wins).
    pub fn new(handle: Handle, metric: u32) -> Self {
        Self { handle, metric, installed: [None, None] }
    }

    /// Makes the multipath default routes match `uplinks` (those with a gateway); `weight` gives each its share.
    pub async fn apply(&mut self, uplinks: &[Candidate], weight: impl Fn(&Candidate) -> u16) {
        for v6 in [false, true] {
            let mut hops: Vec<(u32, IpAddr, u8)> = uplinks
                .iter()
                .filter(|c| c.address.is_ipv6() == v6)
                .filter_map(|c| {
                    let gateway = c.gateway?;
                    Some((c.index, gateway, u8::try_from(weight(c).clamp(1, 255)).unwrap_or(1)))
                })
                .collect();
            hops.sort();
            hops.dedup_by_key(|h| (h.0, h.1));
            let slot = usize::from(v6);
            if self.installed[slot].as_ref() == Some(&hops) || (hops.is_empty() && self.installed[slot].is_none()) {
                continue;
            }
            let result = if hops.is_empty() { self.remove(v6).await } else { self.install(v6, &hops).await };
            match result {
                Ok(()) => {
                    info!(v6, nexthops = hops.len(), "multipath default route updated");
                    self.installed[slot] = (!hops.is_empty()).then_some(hops);
                }
                Err(error) => warn!(v6, %error, "cannot update the multipath default route"),
            }
        }
    }

    /// Removes tether's routes, leaving the system's default routes in force.
    pub async fn restore(&mut self) {
        for v6 in [false, true] {
            if self.installed[usize::from(v6)].take().is_some()
                && let Err(error) = self.remove(v6).await
            {
                warn!(v6, %error, "cannot remove the multipath default route");
            }
        }
        info!("system default routes restored");
    }

    async fn install(&self, v6: bool, hops: &[(u32, IpAddr, u8)]) -> Result<(), rtnetlink::Error> {
        let mut nexthops = Vec::with_capacity(hops.len());
        for (index, gateway, weight) in hops {
            let builder = if v6 { RouteNextHopBuilder::new_ipv6() } else { RouteNextHopBuilder::new_ipv4() };
            let hop = builder
                .interface(*index)
                .weight(*weight)
                .via(*gateway)
                .map_err(|e| rtnetlink::Error::InvalidNla(format!("{e:?}")))?
                .build();
            nexthops.push(hop);
        }
        let message = self.message(v6, Some(nexthops));
        self.handle.route().add(message).replace().execute().await
    }

    async fn remove(&self, v6: bool) -> Result<(), rtnetlink::Error> {
        match self.handle.route().del(self.message(v6, None)).execute().await {
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc_enoent() => Ok(()),
            other => other,
        }
    }

    fn message(&self, v6: bool, nexthops: Option<Vec<netlink_packet_route::route::RouteNextHop>>) -> RouteMessage {
        if v6 {
            let mut builder =
                RouteMessageBuilder::<Ipv6Addr>::new().priority(self.metric).protocol(RouteProtocol::Other(PROTOCOL));
            if let Some(hops) = nexthops {
                builder = builder.multipath(hops);
            }
            builder.build()
        } else {
            let mut builder =
                RouteMessageBuilder::<Ipv4Addr>::new().priority(self.metric).protocol(RouteProtocol::Other(PROTOCOL));
            if let Some(hops) = nexthops {
                builder = builder.multipath(hops);
            }
            builder.build()
        }
    }
}

/// ENOENT: deleting a route that is already gone is success.
const fn libc_enoent() -> i32 {
    2
}
