//! Human-readable sizes: parsing `512`, `4K`, `1G`, `2TiB` and printing
//! `1.0 GiB`. Binary multiples throughout (K = 1024).

use std::fmt;
use std::str::FromStr;

/// A size in bytes that parses and prints with K/M/G/T suffixes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub fn bytes(self) -> u64 {
        self.0
    }
}

impl FromStr for ByteSize {
    type Err = String;

    fn from_str(s: &str) -> Result<ByteSize, String> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, suffix) = t.split_at(split);
        if num.is_empty() {
            return Err(format!("invalid size {s:?}: expected a number with an optional K/M/G/T suffix"));
        }
        let n: u64 = num.parse().map_err(|_| format!("invalid size {s:?}: number too large"))?;
        let shift = match suffix.trim().to_ascii_uppercase().as_str() {
            "" | "B" => 0,
            "K" | "KB" | "KIB" => 10,
            "M" | "MB" | "MIB" => 20,
            "G" | "GB" | "GIB" => 30,
            "T" | "TB" | "TIB" => 40,
            "P" | "PB" | "PIB" => 50,
            _ => return Err(format!("invalid size {s:?}: unknown suffix {suffix:?} (use K, M, G or T)")),
        };
        n.checked_mul(1u64 << shift).map(ByteSize).ok_or_else(|| format!("invalid size {s:?}: too large"))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
        let mut v = self.0 as f64;
        let mut unit = 0;
        while v >= 1024.0 && unit + 1 < UNITS.len() {
            v /= 1024.0;
            unit += 1;
        }
        if unit == 0 { write!(f, "{} B", self.0) } else { write!(f, "{v:.1} {}", UNITS[unit]) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_suffixes() {
        assert_eq!("512".parse::<ByteSize>().unwrap().0, 512);
        assert_eq!("4K".parse::<ByteSize>().unwrap().0, 4096);
        assert_eq!("1g".parse::<ByteSize>().unwrap().0, 1 << 30);
        assert_eq!("2TiB".parse::<ByteSize>().unwrap().0, 2 << 40);
        assert_eq!("10 M".parse::<ByteSize>().unwrap().0, 10 << 20);
        assert!("".parse::<ByteSize>().is_err());
        assert!("G".parse::<ByteSize>().is_err());
        assert!("1X".parse::<ByteSize>().is_err());
        assert!("99999999999999999999".parse::<ByteSize>().is_err());
        assert!("20000000P".parse::<ByteSize>().is_err());
    }

    #[test]
    fn prints_human() {
        assert_eq!(ByteSize(100).to_string(), "100 B");
        assert_eq!(ByteSize(1 << 30).to_string(), "1.0 GiB");
        assert_eq!(ByteSize(1536).to_string(), "1.5 KiB");
    }
}
