//! The process's own resource use, read from `/proc/self` at scrape time (Linux; elsewhere the
//! families are left out): the standard `process_*` names the Prometheus client libraries use.
//! [`read`] does blocking file I/O: `/metrics` calls it on the blocking pool.

use crate::exposition::Exposition;

/// Kernel clock ticks per second for `/proc` times (USER_HZ, 100 on every Linux ABI).
const TICKS_PER_SEC: f64 = 100.0;

/// What `/proc/self` says about this process.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ProcessStats {
    pub cpu_seconds: f64,
    pub resident_bytes: u64,
    pub virtual_bytes: u64,
    pub threads: u64,
    pub start_time_seconds: f64,
    pub open_fds: u64,
    pub max_fds: Option<u64>,
}

/// Reads `/proc/self`; `None` where there is no procfs.
pub fn read() -> Option<ProcessStats> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let mut stats = parse_stat(&stat)?;
    stats.resident_bytes = status_kib(&status, "VmRSS:").unwrap_or(0) * 1024;
    stats.virtual_bytes = status_kib(&status, "VmSize:").unwrap_or(0) * 1024;
    if let Some(boot) = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("btime ")?.trim().parse::<f64>().ok())
    }) {
        stats.start_time_seconds += boot;
    }
    stats.open_fds = std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count() as u64)
        .unwrap_or(0);
    stats.max_fds = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|l| {
            l.lines()
                .find(|line| line.starts_with("Max open files"))
                .and_then(|line| line.split_whitespace().nth(3)?.parse().ok())
        });
    Some(stats)
}

/// Fields of `/proc/self/stat` after the `(comm)`, which may itself hold spaces.
fn parse_stat(stat: &str) -> Option<ProcessStats> {
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state): field N is fields[N - 3].
    let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<u64>().ok());
    let ticks = field(14)? + field(15)?;
    Some(ProcessStats {
        cpu_seconds: ticks as f64 / TICKS_PER_SEC,
        threads: field(20)?,
        // Seconds since boot here; `read` adds the boot time.
        start_time_seconds: field(22)? as f64 / TICKS_PER_SEC,
        ..ProcessStats::default()
    })
}

fn status_kib(status: &str, key: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Adds the `process_*` families.
pub fn render(out: &mut Exposition, p: &ProcessStats) {
    let gauge = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    out.counter_f64(
        "process_cpu_seconds_total",
        "User and system CPU time spent, in seconds.",
        p.cpu_seconds,
    );
    out.gauge(
        "process_resident_memory_bytes",
        "Resident memory size in bytes.",
        gauge(p.resident_bytes),
    );
    out.gauge(
        "process_virtual_memory_bytes",
        "Virtual memory size in bytes.",
        gauge(p.virtual_bytes),
    );
    out.gauge(
        "process_threads",
        "OS threads in the process.",
        gauge(p.threads),
    );
    out.gauge_f64(
        "process_start_time_seconds",
        "Start time of the process since the Unix epoch, in seconds.",
        p.start_time_seconds,
    );
    out.gauge(
        "process_open_fds",
        "Open file descriptors.",
        gauge(p.open_fds),
    );
    if let Some(max) = p.max_fds {
        out.gauge(
            "process_max_fds",
            "Most open file descriptors allowed.",
            gauge(max),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_read_after_a_command_name_with_spaces() {
        let stat = "4242 (my (odd) proc) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 7 0 12345 1000000 500 18446744073709551615";
        let p = parse_stat(stat).expect("parses");
        assert_eq!(p.cpu_seconds, 3.0);
        assert_eq!(p.threads, 7);
        assert_eq!(p.start_time_seconds, 123.45);
    }

    #[test]
    fn this_process_has_memory_and_threads() {
        let p = read().expect("/proc/self is readable on Linux");
        assert!(p.resident_bytes > 1024 * 1024, "{p:?}");
        assert!(p.threads >= 1 && p.open_fds >= 3, "{p:?}");
        assert!(p.start_time_seconds > 1.6e9, "{p:?}");
    }
}
