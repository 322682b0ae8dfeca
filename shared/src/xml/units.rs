//! libvirt's scaled integers: `<memory unit='GiB'>2</memory>` and friends.
//!
//! Follows `virScaleInteger`: unit names are case-insensitive; `b`/`byte`/`bytes`
//! are 1; a bare prefix letter or `XiB` is a power of 1024; `XB` a power of 1000.
//! With no unit, memory is in KiB. Values are kept in KiB, rounded up, as
//! libvirt stores them.

/// Why a scaled value was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnitError {
    /// The unit suffix is not one libvirt knows.
    #[error("unknown suffix '{0}'")]
    UnknownSuffix(String),
    /// The number is not a non-negative integer.
    #[error("'{0}' is not a non-negative integer")]
    NotANumber(String),
    /// The scaled value does not fit in 64 bits.
    #[error("value too large: {value}{unit}")]
    TooLarge {
        /// The number as written.
        value: u64,
        /// The unit as written.
        unit: String,
    },
}

/// Bytes per unit for `unit` (None = default KiB).
pub fn unit_scale(unit: Option<&str>) -> Result<u64, UnitError> {
    let Some(unit) = unit.filter(|u| !u.is_empty()) else {
        return Ok(1024);
    };
    let lower = unit.to_ascii_lowercase();
    if matches!(lower.as_str(), "b" | "byte" | "bytes") {
        return Ok(1);
    }
    let mut chars = lower.chars();
    let prefix = chars.next().unwrap_or(' ');
    let rest: String = chars.collect();
    let base: u64 = match rest.as_str() {
        "" | "ib" => 1024,
        "b" => 1000,
        _ => return Err(UnitError::UnknownSuffix(unit.to_string())),
    };
    let power = match prefix {
        'k' => 1,
        'm' => 2,
        'g' => 3,
        't' => 4,
        'p' => 5,
        'e' => 6,
        _ => return Err(UnitError::UnknownSuffix(unit.to_string())),
    };
    Ok(base.pow(power))
}

/// Parses `value` in `unit` and returns KiB, rounded up.
pub fn parse_kib(value: &str, unit: Option<&str>) -> Result<u64, UnitError> {
    let scale = unit_scale(unit)?;
    let n: u64 = value
        .trim()
        .parse()
        .map_err(|_| UnitError::NotANumber(value.to_string()))?;
    let bytes = n.checked_mul(scale).ok_or_else(|| UnitError::TooLarge {
        value: n,
        unit: unit.unwrap_or("").to_string(),
    })?;
    Ok(bytes.div_ceil(1024))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_libvirt_unit_scales() {
        let table: &[(&str, u64)] = &[
            ("b", 1),
            ("bytes", 1),
            ("KB", 1000),
            ("k", 1024),
            ("KiB", 1024),
            ("MB", 1_000_000),
            ("M", 1 << 20),
            ("MiB", 1 << 20),
            ("GB", 1_000_000_000),
            ("G", 1 << 30),
            ("GiB", 1 << 30),
            ("TB", 1_000_000_000_000),
            ("T", 1 << 40),
            ("TiB", 1 << 40),
        ];
        for (unit, scale) in table {
            assert_eq!(unit_scale(Some(unit)), Ok(*scale), "{unit}");
        }
        assert_eq!(unit_scale(None), Ok(1024));
    }

    #[test]
    fn kib_rounds_up_like_libvirt() {
        assert_eq!(parse_kib("1", Some("b")), Ok(1));
        assert_eq!(parse_kib("1025", Some("bytes")), Ok(2));
        assert_eq!(parse_kib("2", Some("GiB")), Ok(2 * 1024 * 1024));
        assert_eq!(parse_kib("219100", None), Ok(219100));
        assert_eq!(parse_kib("1", Some("MB")), Ok(977));
    }

    #[test]
    fn rejects_bad_units_and_numbers() {
        assert_eq!(
            parse_kib("1", Some("GiBs")),
            Err(UnitError::UnknownSuffix("GiBs".into()))
        );
        assert_eq!(
            parse_kib("1", Some("xB")),
            Err(UnitError::UnknownSuffix("xB".into()))
        );
        assert_eq!(
            parse_kib("-1", None),
            Err(UnitError::NotANumber("-1".into()))
        );
        assert!(matches!(
            parse_kib("18446744073709551615", Some("EiB")),
            Err(UnitError::TooLarge { .. })
        ));
    }
}
