//! The machine a benchmark ran on, and the date, as recorded beside its figures.

use serde::{Deserialize, Serialize};

/// What a benchmark records about the machine: figures vary with the processor, the
/// number of threads and how busy the machine was.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Machine {
    /// Processor model (`/proc/cpuinfo`), where known.
    pub cpu: Option<String>,
    /// Logical processors available to the process.
    pub logical_cpus: usize,
    /// Threads candle's kernels run on (`RAYON_NUM_THREADS`, else every processor).
    pub kernel_threads: usize,
    /// Physical memory (`/proc/meminfo`), where known.
    pub memory_bytes: Option<u64>,
    /// Operating system and architecture, e.g. `linux x86_64`.
    pub os: String,
    /// 1-, 5- and 15-minute load averages when the benchmark started (`/proc/loadavg`):
    /// other work on the machine slows the timings down.
    pub load_average_start: Option<[f64; 3]>,
    /// The same when the benchmark last wrote its results.
    pub load_average_end: Option<[f64; 3]>,
}

impl Machine {
    /// This machine, now.
    pub fn current() -> Self {
        let load = load_average();
        Machine {
            cpu: cpu_model(),
            logical_cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            kernel_threads: candle_core::utils::get_num_threads(),
            memory_bytes: crate::memory::physical_memory_bytes(),
            os: format!("{} {}", std::env::consts::OS, std::env::consts::ARCH),
            load_average_start: load,
            load_average_end: load,
        }
    }

    /// One line for people: `Intel Xeon …, 2 threads, 24.0 GiB, load 1.8 at the start`.
    pub fn describe(&self) -> String {
        let mut parts = vec![self
            .cpu
            .clone()
            .unwrap_or_else(|| "unknown processor".into())];
        parts.push(format!(
            "{} logical CPUs, kernels on {} thread{}",
            self.logical_cpus,
            self.kernel_threads,
            if self.kernel_threads == 1 { "" } else { "s" }
        ));
        if let Some(bytes) = self.memory_bytes {
            parts.push(crate::memory::format_bytes(bytes));
        }
        parts.push(self.os.clone());
        let load = |l: Option<[f64; 3]>| l.map_or("?".to_string(), |l| format!("{:.2}", l[0]));
        parts.push(format!(
            "load average {} at the start, {} at the end",
            load(self.load_average_start),
            load(self.load_average_end)
        ));
        parts.join(", ")
    }
}

fn cpu_model() -> Option<String> {
    let text = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    describe_cpu(&text)
}

/// The first processor's `model name` in a `/proc/cpuinfo` text, with its family,
/// model and stepping where given: a virtual machine's name can be as vague as `AMD
/// EPYC`, while the numbers tell processor generations apart (and, with them, which
/// kernels a BLAS library picks).
fn describe_cpu(cpuinfo: &str) -> Option<String> {
    let first = cpuinfo.split("\n\n").next().unwrap_or(cpuinfo);
    let field = |key: &str| {
        first
            .lines()
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.trim() == key)
            .map(|(_, v)| v.trim().to_string())
    };
    let name = field("model name")?;
    let numbers: Vec<String> = [
        ("family", "cpu family"),
        ("model", "model"),
        ("stepping", "stepping"),
    ]
    .iter()
    .filter_map(|(label, key)| field(key).map(|v| format!("{label} {v}")))
    .collect();
    Some(if numbers.is_empty() {
        name
    } else {
        format!("{name} ({})", numbers.join(", "))
    })
}

/// The 1-, 5- and 15-minute load averages, where `/proc/loadavg` exists.
pub fn load_average() -> Option<[f64; 3]> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    let mut fields = text.split_whitespace().map(|f| f.parse::<f64>().ok());
    Some([fields.next()??, fields.next()??, fields.next()??])
}

/// The current time in UTC as ISO 8601, e.g. `2025-06-01T12:34:56Z`.
pub fn utc_now() -> String {
    let seconds = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    utc_date(seconds)
}

/// `seconds` after the Unix epoch as an ISO 8601 UTC date and time.
pub fn utc_date(seconds: u64) -> String {
    let days = (seconds / 86_400) as i64;
    let rem = seconds % 86_400;
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Year, month and day of the day `days` after 1970-01-01 (proleptic Gregorian
/// calendar; H. Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_iso_8601_utc() {
        assert_eq!(utc_date(0), "1970-01-01T00:00:00Z");
        // 2000-02-29 (a leap day of a century leap year), 23:59:59.
        assert_eq!(utc_date(951_868_799), "2000-02-29T23:59:59Z");
        assert_eq!(utc_date(1_709_251_200), "2024-03-01T00:00:00Z");
        assert_eq!(utc_date(4_102_444_800), "2100-01-01T00:00:00Z");
    }

    #[test]
    fn machine_is_described() {
        let m = Machine::current();
        assert!(m.logical_cpus >= 1 && m.kernel_threads >= 1);
        if cfg!(target_os = "linux") {
            assert!(m.memory_bytes.is_some_and(|b| b > 0), "{m:?}");
            assert!(m.load_average_start.is_some(), "{m:?}");
        }
        assert!(m.describe().contains("logical CPUs"), "{}", m.describe());
    }

    #[test]
    fn the_processor_is_named_with_family_model_and_stepping() {
        let text = "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\n\
                    model name\t: AMD EPYC\nstepping\t: 1\n\nprocessor\t: 1\nmodel name\t: other\n";
        assert_eq!(
            describe_cpu(text).as_deref(),
            Some("AMD EPYC (family 26, model 2, stepping 1)")
        );
        assert_eq!(
            describe_cpu("model name : Some CPU\n").as_deref(),
            Some("Some CPU")
        );
        assert_eq!(describe_cpu("processor : 0\n"), None);
    }
}
