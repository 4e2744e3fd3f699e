//! Readings of the server process and the machine from `/proc`.

/// `VmRSS` of a process, KiB.
pub(crate) fn vm_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
}

/// User + system CPU time of a process (`/proc/PID/stat`), in seconds (USER_HZ = 100).
pub(crate) fn cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / 100.0)
}

/// (busy, total) jiffies of all CPUs together, from the first line of `/proc/stat`.
pub(crate) fn machine_jiffies() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<u64> =
        stat.lines().next()?.split_whitespace().skip(1).take(8).filter_map(|f| f.parse().ok()).collect();
    let total: u64 = fields.iter().sum();
    let idle = fields.get(3)? + fields.get(4)?;
    Some((total - idle, total))
}

/// `some avg10` of `/proc/pressure/cpu`: the share of time runnable tasks waited for a CPU.
pub(crate) fn cpu_pressure_avg10() -> Option<f64> {
    let pressure = std::fs::read_to_string("/proc/pressure/cpu").ok()?;
    pressure.lines().next()?.split_whitespace().find_map(|f| f.strip_prefix("avg10="))?.parse().ok()
}

/// CPU readings taken when sending starts.
pub(crate) struct CpuStart {
    /// The server's CPU seconds so far.
    server: Option<f64>,
    /// This process's CPU seconds so far.
    own: Option<f64>,
    /// The machine's (busy, total) jiffies.
    machine: Option<(u64, u64)>,
    /// CPU pressure avg10, %.
    pressure: Option<f64>,
}

/// The CPU used while sending (and draining).
pub(crate) struct CpuUse {
    /// Server CPU seconds.
    pub(crate) server: Option<f64>,
    /// This process's CPU seconds.
    pub(crate) own: Option<f64>,
    /// Seconds from the start of sending to the end of the drain.
    pub(crate) active_seconds: f64,
    /// The machine's cores.
    pub(crate) cores: usize,
    /// Busy cores of the whole machine.
    pub(crate) machine_busy_cores: Option<f64>,
    /// Of those, the cores used by other processes (other people's builds and benchmarks on a
    /// shared box).
    pub(crate) other_cores: Option<f64>,
    /// CPU pressure avg10 before and after, %.
    pub(crate) pressure_before: Option<f64>,
    pub(crate) pressure_after: Option<f64>,
}

impl CpuStart {
    /// Reads the server's (if its pid is known), this process's and the machine's CPU use so far.
    pub(crate) fn read(server: Option<u32>) -> Self {
        Self {
            server: server.and_then(|pid| cpu_seconds(&pid.to_string())),
            own: cpu_seconds("self"),
            machine: machine_jiffies(),
            pressure: cpu_pressure_avg10(),
        }
    }

    /// The CPU used since these readings; sending started at `send_started`.
    pub(crate) fn since(self, server: Option<u32>, send_started: tokio::time::Instant) -> CpuUse {
        let cpu_server = server.and_then(|pid| cpu_seconds(&pid.to_string())).zip(self.server).map(|(b, a)| b - a);
        let cpu_self = cpu_seconds("self").zip(self.own).map(|(b, a)| b - a);
        let active_seconds = send_started.elapsed().as_secs_f64();
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        // Busy cores of the whole machine while sending, and what is left for everything else
        // (other people's builds and benchmarks on a shared box).
        let machine_busy_cores = machine_jiffies().zip(self.machine).and_then(|((busy, total), (busy0, total0))| {
            (total > total0).then(|| (busy - busy0) as f64 / (total - total0) as f64 * cores as f64)
        });
        let other_cores = machine_busy_cores
            .map(|busy| busy - (cpu_server.unwrap_or(0.0) + cpu_self.unwrap_or(0.0)) / active_seconds);
        CpuUse {
            server: cpu_server,
            own: cpu_self,
            active_seconds,
            cores,
            machine_busy_cores,
            other_cores,
            pressure_before: self.pressure,
            pressure_after: cpu_pressure_avg10(),
        }
    }
}
