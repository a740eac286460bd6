//! Reading links, addresses and default routes over rtnetlink, and subscribing to their changes.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures_util::stream::TryStreamExt;
use netlink_packet_route::{
    address::{AddressAttribute, AddressFlags, AddressScope},
    link::{LinkAttribute, LinkFlags},
    route::{RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteType},
};
use rtnetlink::{Handle, MulticastGroup, RouteMessageBuilder};

use super::state::{Addr, DefaultRoute, Link, Observed};

/// The main routing table.
const MAIN_TABLE: u8 = 254;

/// The groups whose messages trigger a re-read: links, addresses and routes, both families.
pub const GROUPS: [MulticastGroup; 5] = [
    MulticastGroup::Link,
    MulticastGroup::Ipv4Ifaddr,
    MulticastGroup::Ipv6Ifaddr,
    MulticastGroup::Ipv4Route,
    MulticastGroup::Ipv6Route,
];

/// One full reading of links, addresses and default routes.
pub async fn read(handle: &Handle) -> Result<Observed, rtnetlink::Error> {
    let mut observed = Observed::default();
    let mut links = handle.link().get().execute();
    while let Some(link) = links.try_next().await? {
        let name = link.attributes.iter().find_map(|a| match a {
            LinkAttribute::IfName(name) => Some(name.clone()),
            _ => None,
        });
        let flags = link.header.flags;
        observed.links.push(Link {
            index: link.header.index,
            name: name.unwrap_or_default(),
            up: flags.contains(LinkFlags::Up) && flags.contains(LinkFlags::LowerUp),
        });
    }
    let mut addrs = handle.address().get().execute();
    while let Some(addr) = addrs.try_next().await? {
        let mut ip = None;
        let mut flags = None;
        for attribute in &addr.attributes {
            match attribute {
                // For point-to-point links Local is ours and Address the peer's; otherwise they agree.
                AddressAttribute::Local(local) => ip = Some(*local),
                AddressAttribute::Address(address) if ip.is_none() => ip = Some(*address),
                AddressAttribute::Flags(f) => flags = Some(*f),
                _ => {}
            }
        }
        let Some(ip) = ip else { continue };
        let unusable = flags.is_some_and(|f| {
            f.intersects(AddressFlags::Tentative | AddressFlags::Deprecated | AddressFlags::Dadfailed)
        });
        observed.addrs.push(Addr {
            index: addr.header.index,
            ip,
            global: addr.header.scope == AddressScope::Universe && !unusable,
        });
    }
    for v6 in [false, true] {
        let filter = if v6 {
            RouteMessageBuilder::<Ipv6Addr>::new().build()
        } else {
            RouteMessageBuilder::<Ipv4Addr>::new().build()
        };
        let mut routes = handle.route().get(filter).execute();
        while let Some(route) = routes.try_next().await? {
            default_routes(&route, v6, &mut observed.routes);
        }
    }
    Ok(observed)
}

fn default_routes(route: &RouteMessage, v6: bool, out: &mut Vec<DefaultRoute>) {
    let header = &route.header;
    let table = route.attributes.iter().find_map(|a| match a {
        RouteAttribute::Table(t) => Some(*t),
        _ => None,
    });
    let in_main = table.map_or(header.table == MAIN_TABLE, |t| t == u32::from(MAIN_TABLE));
    let ours = header.protocol == RouteProtocol::Other(super::routes::PROTOCOL);
    if header.destination_prefix_length != 0 || header.kind != RouteType::Unicast || !in_main || ours {
        return;
    }
    let gateway = route.attributes.iter().find_map(|a| match a {
        RouteAttribute::Gateway(g) => ip_of(g),
        _ => None,
    });
    for attribute in &route.attributes {
        match attribute {
            RouteAttribute::Oif(index) => out.push(DefaultRoute { index: *index, v6, gateway }),
            RouteAttribute::MultiPath(hops) => {
                for hop in hops {
                    let gateway = hop.attributes.iter().find_map(|a| match a {
                        RouteAttribute::Gateway(g) => ip_of(g),
                        _ => None,
                    });
                    out.push(DefaultRoute { index: hop.interface_index, v6, gateway });
                }
            }
            _ => {}
        }
    }
}

fn ip_of(address: &RouteAddress) -> Option<IpAddr> {
    match address {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}
