//! The load an NCU reports with each heartbeat reply: the one-minute load average per CPU, as a percentage.

/// Current load, 0–100.
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
    fn loadavg_parses() {
        assert_eq!(parse("0.50 0.40 0.30 1/100 42", 2), 25);
        assert_eq!(parse("9.00 1 1 1/1 1", 2), 100);
        assert_eq!(parse("garbage", 2), 0);
    }
}
