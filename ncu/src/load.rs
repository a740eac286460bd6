//! The load an NCU (or a server agent) reports with each heartbeat reply, 0-100: by default the one-minute load
//! average per CPU; or a number a file holds (written by the service itself); or the established TCP connections on
//! the service tuples' ports as a share of a capacity. The answers hold back a member whose load is well above the
//! average (`load_threshold_pct`).

use std::{collections::BTreeSet, path::PathBuf, str::FromStr};

/// Where the load comes from (`load` in the configuration).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum LoadSource {
    /// `cpu`: the load average per CPU.
    #[default]
    Cpu,
    /// `file:PATH`: a number 0-100 in that file (unreadable: 100, so a broken reporter holds the member back).
    File(PathBuf),
    /// `connections:N`: established TCP connections on the tuples' ports, as a percentage of N.
    Connections(u32),
}

impl FromStr for LoadSource {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "cpu" {
            return Ok(Self::Cpu);
        }
        if let Some(path) = s.strip_prefix("file:").filter(|p| !p.is_empty()) {
            return Ok(Self::File(PathBuf::from(path)));
        }
        if let Some(n) = s.strip_prefix("connections:").and_then(|n| n.parse::<u32>().ok()).filter(|n| *n > 0) {
            return Ok(Self::Connections(n));
        }
        Err(format!("load {s:?}: `cpu`, `file:PATH` or `connections:N` with N above zero"))
    }
}

impl<'de> serde::Deserialize<'de> for LoadSource {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer)?.parse().map_err(serde::de::Error::custom)
    }
}

impl LoadSource {
    /// The load now; `ports` are the service tuples' ports (for `connections`).
    pub fn read(&self, ports: &BTreeSet<u16>) -> u16 {
        match self {
            Self::Cpu => current(),
            Self::File(path) => std::fs::read_to_string(path)
                .ok()
                .and_then(|text| text.trim().parse::<f64>().ok())
                .map_or(100, |v| v.clamp(0.0, 100.0).round() as u16),
            Self::Connections(capacity) => {
                let established = ["/proc/net/tcp", "/proc/net/tcp6"]
                    .iter()
                    .filter_map(|path| std::fs::read_to_string(path).ok())
                    .map(|table| established(&table, ports))
                    .sum::<u64>();
                (established * 100 / u64::from(*capacity)).min(100) as u16
            }
        }
    }
}

/// Established connections in a `/proc/net/tcp` table whose local port is one of `ports`.
fn established(table: &str, ports: &BTreeSet<u16>) -> u64 {
    table
        .lines()
        .skip(1)
        .filter(|line| {
            let mut fields = line.split_whitespace();
            let local = fields.nth(1).and_then(|a| a.rsplit(':').next()).and_then(|p| u16::from_str_radix(p, 16).ok());
            let state = fields.nth(1);
            state == Some("01") && local.is_some_and(|p| ports.contains(&p))
        })
        .count() as u64
}

/// Current load average per CPU, 0–100.
pub fn current() -> u16 {
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let Ok(text) = std::fs::read_to_string("/proc/loadavg") else {
        return 0;
    };
    parse(&text, cpus)
}

fn parse(loadavg: &str, cpus: usize) -> u16 {
    let Some(one_minute) = loadavg.split_whitespace().next().and_then(|v| v.parse::<f64>().ok()) else {
        return 0;
    };
    let percent = one_minute / cpus.max(1) as f64 * 100.0;
    percent.clamp(0.0, 100.0).round() as u16
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn sources_parse_and_connections_are_counted_on_the_ports() {
        use super::{LoadSource, established};
        assert_eq!("cpu".parse::<LoadSource>(), Ok(LoadSource::Cpu));
        assert_eq!("file:/run/load".parse::<LoadSource>(), Ok(LoadSource::File("/run/load".into())));
        assert_eq!("connections:200".parse::<LoadSource>(), Ok(LoadSource::Connections(200)));
        for bad in ["", "file:", "connections:0", "connections:x", "gpu"] {
            assert!(bad.parse::<LoadSource>().is_err(), "{bad}");
        }
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0
   1: 0100007F:1F90 0100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0 20 4 30 10 -1
   2: 0100007F:1F90 0100007F:C351 01 00000000:00000000 00:00000000 00000000     0        0 3 1 0 20 4 30 10 -1
   3: 0100007F:0050 0100007F:C352 01 00000000:00000000 00:00000000 00000000     0        0 4 1 0 20 4 30 10 -1";
        assert_eq!(established(table, &[8080].into()), 2, "listening sockets and other ports do not count");
        assert_eq!(established(table, &[8080, 80].into()), 3);
        let dir = std::env::temp_dir().join(format!("tether-load-{}", std::process::id()));
        std::fs::write(&dir, "90\n").expect("write");
        assert_eq!(LoadSource::File(dir.clone()).read(&[].into()), 90);
        std::fs::write(&dir, "garbage").expect("write");
        assert_eq!(LoadSource::File(dir.clone()).read(&[].into()), 100, "an unreadable load holds the member back");
        let _ = std::fs::remove_file(dir);
    }

    #[test]
    fn loadavg_parses() {
        assert_eq!(parse("0.50 0.40 0.30 1/100 42", 2), 25);
        assert_eq!(parse("9.00 1 1 1/1 1", 2), 100);
        assert_eq!(parse("garbage", 2), 0);
    }
}
