//! Byte sizes as settings and flags write them (`--memory-budget 4GiB`).

use crate::{Error, Result};

/// Parses a byte size: a plain byte count (`1048576`), or a number and a unit,
/// with or without a space between them (`512MiB`, `4 GiB`, `1.5GB`).
///
/// Binary units `KiB`, `MiB`, `GiB`, `TiB`, `PiB`, `EiB` are powers of 1024;
/// decimal units `KB`, `MB`, `GB`, `TB`, `PB`, `EB` are powers of 1000; `B` is
/// bytes. Units are not case
/// sensitive. A fractional size is rounded down to a whole byte; a byte count
/// itself must be whole. Fails with [`Error::InvalidArgument`] naming the value
/// and the accepted forms.
pub fn parse_bytes(text: &str) -> Result<u64> {
    let invalid = |why: &str| {
        Error::InvalidArgument(format!(
            "byte size `{text}`: {why}; expected a byte count such as `1048576` or a number \
             with a unit such as `512MiB`, `4 GiB` or `1.5GB` (binary units KiB, MiB, GiB, TiB \
             are powers of 1024; decimal units KB, MB, GB, TB are powers of 1000)"
        ))
    };

    let s = text.trim();
    let number_end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = (&s[..number_end], s[number_end..].trim_start());
    let (whole, fraction) = match number.split_once('.') {
        Some((w, f)) => (w, f),
        None => (number, ""),
    };
    if whole.is_empty() || number.ends_with('.') || fraction.contains('.') {
        return Err(invalid("not a number"));
    }

    let multiplier: u128 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1000,
        "mb" => 1000u128.pow(2),
        "gb" => 1000u128.pow(3),
        "tb" => 1000u128.pow(4),
        "pb" => 1000u128.pow(5),
        "eb" => 1000u128.pow(6),
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        "pib" => 1 << 50,
        "eib" => 1 << 60,
        _ => return Err(invalid(&format!("unknown unit `{unit}`"))),
    };
    if multiplier == 1 && !fraction.is_empty() {
        return Err(invalid("a byte count must be a whole number"));
    }

    let too_large = || invalid("too large");
    let whole: u128 = whole.parse().map_err(|_| too_large())?;
    // Digits beyond what the largest unit can resolve do not change the result
    // (rounded down), and keeping at most 18 keeps the arithmetic within u128.
    let fraction = &fraction[..fraction.len().min(18)];
    let fraction_value: u128 = if fraction.is_empty() {
        0
    } else {
        fraction.parse().map_err(|_| invalid("not a number"))?
    };
    let scale = 10u128.pow(fraction.len() as u32);
    let bytes = whole
        .checked_mul(multiplier)
        .and_then(|b| b.checked_add(fraction_value * multiplier / scale))
        .ok_or_else(too_large)?;
    u64::try_from(bytes).map_err(|_| too_large())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::format_bytes;

    #[test]
    fn parses_accepted_forms() {
        let cases = [
            ("0", 0),
            ("1048576", 1 << 20),
            ("512B", 512),
            ("512 b", 512),
            ("4GiB", 4 << 30),
            ("4 GiB", 4 << 30),
            ("  4 gib ", 4 << 30),
            ("512MiB", 512 << 20),
            ("1.5GB", 1_500_000_000),
            ("1.5 GiB", 3 << 29),
            ("2KB", 2000),
            ("2kB", 2000),
            ("2KiB", 2048),
            ("3MB", 3_000_000),
            ("1TiB", 1 << 40),
            ("15.5 EiB", 31 << 59),
            ("1PB", 1_000_000_000_000_000),
            ("0.1KiB", 102),
            ("1.0000000000000000000001 GiB", 1 << 30),
        ];
        for (text, expected) in cases {
            assert_eq!(parse_bytes(text).ok(), Some(expected), "{text}");
        }
    }

    #[test]
    fn format_parse_round_trip() {
        for bytes in [0u64, 1, 512, 1023] {
            assert_eq!(parse_bytes(&format_bytes(bytes)).ok(), Some(bytes));
        }
        // Exact multiples of a unit print with zeros and come back exactly.
        for bytes in [
            1u64 << 10,
            12 << 20,
            3 << 29,
            5 << 40,
            100 << 30,
            2 << 50,
            8 << 60,
        ] {
            assert_eq!(
                parse_bytes(&format_bytes(bytes)).ok(),
                Some(bytes),
                "{bytes}"
            );
        }
    }

    #[test]
    fn rejects_bad_values_with_clear_errors() {
        let cases = [
            ("", "not a number"),
            ("GiB", "not a number"),
            ("-4GiB", "not a number"),
            ("4.", "not a number"),
            (".5GiB", "not a number"),
            ("1.2.3MiB", "not a number"),
            ("4 XB", "unknown unit `XB`"),
            ("4G", "unknown unit `G`"),
            ("4 GiB extra", "unknown unit `GiB extra`"),
            ("1.5", "whole number"),
            ("1.5 B", "whole number"),
            ("16EiB", "too large"),
            ("19EB", "too large"),
            ("18446744073709551616", "too large"),
            ("17179869184 GiB", "too large"),
            ("999999999999999999999999999999999999999999 B", "too large"),
        ];
        for (text, why) in cases {
            match parse_bytes(text) {
                Err(Error::InvalidArgument(message)) => {
                    assert!(message.contains(&format!("`{text}`")), "{message}");
                    assert!(message.contains(why), "{text}: {message}");
                    assert!(message.contains("4 GiB"), "lists accepted forms: {message}");
                }
                other => panic!("`{text}`: expected InvalidArgument, got {other:?}"),
            }
        }
    }

    #[test]
    fn largest_value_parses() {
        assert_eq!(parse_bytes("18446744073709551615").ok(), Some(u64::MAX));
    }
}
