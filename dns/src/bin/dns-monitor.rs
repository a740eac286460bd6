//! `dns-monitor`: the anycast health monitor beside a master dns (see `dns::monitor`).

use std::process::ExitCode;

fn main() -> ExitCode {
    tether_service::main(
        "dns-monitor",
        "Probes this master's dns and the freshness of its view, and has BIRD announce, demote or withdraw the shared \
         service address accordingly.",
        dns::monitor::run,
    )
}
