//! The process's own resource use, read from `/proc/self` by the `procfs` crate at scrape time
//! (Linux; elsewhere the families are left out): the standard `process_*` names the Prometheus
//! client libraries use (prometheus-client has no process collector).
//! [`read`] does blocking file I/O: `/metrics` calls it on the blocking pool.

use crate::exposition::Exposition;

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

/// Reads `/proc/self` (with the `procfs` crate); `None` where there is no procfs.
#[cfg(target_os = "linux")]
pub fn read() -> Option<ProcessStats> {
    use procfs::process::{LimitValue, Process};
    let me = Process::myself().ok()?;
    let stat = me.stat().ok()?;
    let ticks = procfs::ticks_per_second() as f64;
    let boot = procfs::boot_time_secs().unwrap_or(0) as f64;
    Some(ProcessStats {
        cpu_seconds: (stat.utime + stat.stime) as f64 / ticks,
        resident_bytes: stat.rss * procfs::page_size(),
        virtual_bytes: stat.vsize,
        threads: u64::try_from(stat.num_threads).unwrap_or(0),
        start_time_seconds: boot + stat.starttime as f64 / ticks,
        open_fds: me.fd_count().map_or(0, |n| n as u64),
        max_fds: me
            .limits()
            .ok()
            .and_then(|l| match l.max_open_files.soft_limit {
                LimitValue::Value(n) => Some(n),
                LimitValue::Unlimited => None,
            }),
    })
}

/// Elsewhere there is no `/proc`: the `process_*` families are left out.
#[cfg(not(target_os = "linux"))]
pub fn read() -> Option<ProcessStats> {
    None
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
    fn this_process_has_memory_threads_and_a_start_time() {
        let p = read().expect("/proc/self is readable on Linux");
        assert!(p.resident_bytes > 1024 * 1024, "{p:?}");
        assert!(p.virtual_bytes >= p.resident_bytes, "{p:?}");
        assert!(p.threads >= 1 && p.open_fds >= 3, "{p:?}");
        assert!(p.start_time_seconds > 1.6e9, "{p:?}");
        assert!(p.max_fds.is_some_and(|m| m >= p.open_fds), "{p:?}");
    }
}
