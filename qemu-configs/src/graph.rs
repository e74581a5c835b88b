//! The topology as Graphviz: a cluster per network with its VMs and subnet, the outside,
//! an edge per allowed flow (and per forward from the outside), labelled with what passes.

use crate::topology::Topology;

/// `s` as a quoted DOT identifier.
fn q(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

pub fn dot(topo: &Topology) -> String {
    let mut d = format!(
        "digraph {} {{\n  rankdir=LR;\n  node [shape=box, style=rounded];\n",
        q(&topo.name)
    );
    d += "  \"outside\" [shape=ellipse, label=\"outside\"];\n";
    for (i, name) in topo.network_names().into_iter().enumerate() {
        let subnet = topo
            .switch_network(name)
            .map(|n| n.address.clone())
            .or_else(|| topo.network(name).and_then(|n| n.address.clone()))
            .unwrap_or_default();
        d += &format!(
            "  subgraph cluster_{i} {{\n    label={};\n    {} [shape=point, style=invis];\n",
            q(&format!("{name} {subnet}")),
            q(&format!("net:{name}"))
        );
        // A node per NIC (a VM with several is in several clusters), named by its port.
        for (vm, nic) in topo.nics_on(name) {
            d += &format!(
                "    {} [label={}];\n",
                q(&nic.port),
                q(&format!("{}\n{}", vm.name, nic.address))
            );
        }
        d += "  }\n";
    }
    // An edge between networks ends at the cluster's first VM (or its anchor), clipped to
    // the cluster by lhead/ltail.
    let anchor = |net: &str| -> String {
        topo.nics_on(net)
            .next()
            .map(|(_, nic)| nic.port)
            .unwrap_or_else(|| format!("net:{net}"))
    };
    let cluster = |net: &str| {
        topo.network_names()
            .iter()
            .position(|n| *n == net)
            .map(|i| format!("cluster_{i}"))
    };
    d += "  compound=true;\n";
    for a in &topo.allows {
        let label = format!(
            "{}{}",
            a.proto.name(),
            a.port.map(|p| format!("/{p}")).unwrap_or_default()
        );
        let (from, to) = (
            if a.from == "outside" {
                "outside".into()
            } else {
                anchor(&a.from)
            },
            anchor(&a.to),
        );
        let mut attrs = vec![format!("label={}", q(&label))];
        if let Some(c) = cluster(&a.from) {
            attrs.push(format!("ltail={c}"));
        }
        if let Some(c) = cluster(&a.to) {
            attrs.push(format!("lhead={c}"));
        }
        d += &format!("  {} -> {} [{}];\n", q(&from), q(&to), attrs.join(", "));
    }
    for n in &topo.switch_networks {
        for f in &n.forward {
            let balanced = topo.nics_on(&n.name).count() > 1;
            let label = format!(
                "host:{} -> {}{}",
                f.host_port,
                f.guest_port,
                if balanced { " (balanced)" } else { "" }
            );
            let lhead = cluster(&n.name)
                .map(|c| format!(", lhead={c}"))
                .unwrap_or_default();
            d += &format!(
                "  \"outside\" -> {} [label={}, color=blue{lhead}];\n",
                q(&anchor(&n.name)),
                q(&label)
            );
        }
        if n.nat {
            let ltail = cluster(&n.name)
                .map(|c| format!(", ltail={c}"))
                .unwrap_or_default();
            d += &format!(
                "  {} -> \"outside\" [label=\"nat\", style=dashed{ltail}];\n",
                q(&anchor(&n.name))
            );
        }
    }
    for n in &topo.networks {
        for f in &n.forward {
            let to = topo
                .nics_on(&n.name)
                .find(|(_, nic)| nic.ip() == Some(f.guest))
                .map_or(f.guest.to_string(), |(_, nic)| nic.port);
            d += &format!(
                "  \"outside\" -> {} [label={}, color=blue];\n",
                q(&to),
                q(&format!("host:{} -> {}", f.host_port, f.guest_port))
            );
        }
    }
    d += "}\n";
    d
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::tests::THREE_TIER;

    #[test]
    fn networks_are_clusters_and_flows_are_edges() {
        let t = Topology::parse(THREE_TIER).unwrap();
        let d = dot(&t);
        assert!(d.starts_with("digraph \"shop\" {"), "{d}");
        assert!(d.contains("label=\"web 10.10.1.1/24\""), "{d}");
        assert!(
            d.contains(
                "\"web1\" -> \"app1\" [label=\"tcp/8080\", ltail=cluster_0, lhead=cluster_1]"
            ),
            "{d}"
        );
        assert!(
            d.contains("\"outside\" -> \"web1\" [label=\"host:8080 -> 80\""),
            "{d}"
        );
        assert_eq!(d.matches('{').count(), d.matches('}').count());
    }
}
