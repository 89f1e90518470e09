//! Byte sizes for people: formatting in binary units (parsing a size is the
//! configuration's, `crate::config::parse_bytes`).

const BINARY_UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];

/// Formats a byte count with binary units and three significant digits:
/// `512 B`, `1.50 KiB`, `12.0 MiB`, `256 MiB`, `1.50 GiB`.
pub fn format_bytes(bytes: u64) -> String {
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    // f64 is exact enough here: three digits are shown.
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    // Move up while the value would print as 1024 or more.
    while value >= 1023.5 && unit + 1 < BINARY_UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    let suffix = BINARY_UNITS[unit];
    if value < 9.995 {
        format!("{value:.2} {suffix}")
    } else if value < 99.95 {
        format!("{value:.1} {suffix}")
    } else {
        format!("{value:.0} {suffix}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_with_three_significant_digits() {
        let cases = [
            (0, "0 B"),
            (512, "512 B"),
            (1023, "1023 B"),
            (1024, "1.00 KiB"),
            (1536, "1.50 KiB"),
            (10 * 1024, "10.0 KiB"),
            (12 << 20, "12.0 MiB"),
            (256 << 20, "256 MiB"),
            ((1 << 20) - 1, "1.00 MiB"),
            (3 << 29, "1.50 GiB"),
            (5 << 40, "5.00 TiB"),
            (u64::MAX, "16.0 EiB"),
        ];
        for (bytes, expected) in cases {
            assert_eq!(format_bytes(bytes), expected, "{bytes}");
        }
    }
}
