//! Size arguments: a number of bytes with an optional binary suffix
//! (`512`, `64K`, `10M`, `1G`, `2TiB`), and the tracking granularity, a
//! size the tracker can use.

use tracker::regions::{
    GRANULARITY_DEFAULT_BYTES, GRANULARITY_MAX_BYTES, GRANULARITY_MIN_BYTES, Granularity,
};

/// Largest size accepted: what `off_t` can address.
const SIZE_MAX_BYTES: u64 = i64::MAX as u64;

pub fn parse_size(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    let digits_end = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (digits, suffix) = trimmed.split_at(digits_end);
    let number: u64 = digits.parse().map_err(|_| {
        format!("size {text:?} is not a number of bytes (examples: 4096, 64M, 10G)")
    })?;
    let shift = match suffix.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        "P" | "PB" | "PIB" => 50,
        _ => {
            return Err(format!(
                "size {text:?} has an unknown suffix (use K, M, G, T or P)"
            ));
        }
    };
    let bytes = number
        .checked_mul(1u64 << shift)
        .filter(|&bytes| bytes <= SIZE_MAX_BYTES)
        .ok_or_else(|| format!("size {text:?} is too large"))?;
    if bytes == 0 {
        return Err(format!(
            "size {text:?} is zero; a disk needs at least one byte"
        ));
    }
    Ok(bytes)
}

/// Parses `--granularity`: a size that is a power of two from 4K to 16M.
pub fn parse_granularity(text: &str) -> Result<u64, String> {
    parse_region_size("--granularity", text, GRANULARITY_DEFAULT_BYTES)
}

/// Parses `--precision`: a power of two in the same range.
pub fn parse_precision(text: &str) -> Result<u64, String> {
    parse_region_size("--precision", text, 4096)
}

fn parse_region_size(flag: &str, text: &str, default_bytes: u64) -> Result<u64, String> {
    let bytes = parse_size(text)?;
    if Granularity::new(bytes).is_none() {
        return Err(format!(
            "{flag} {text} is not a power of two from {} to {} (the default is {})",
            size_text(GRANULARITY_MIN_BYTES),
            size_text(GRANULARITY_MAX_BYTES),
            size_text(default_bytes)
        ));
    }
    Ok(bytes)
}

/// `bytes` the way a user writes it: `64K`, `16M`, or plain bytes.
pub fn size_text(bytes: u64) -> String {
    for (shift, suffix) in [(40, "T"), (30, "G"), (20, "M"), (10, "K")] {
        if bytes >= 1 << shift && bytes % (1 << shift) == 0 {
            return format!("{}{suffix}", bytes >> shift);
        }
    }
    bytes.to_string()
}

#[cfg(test)]
mod tests {
    use super::{parse_granularity, parse_size, size_text};

    #[test]
    fn sizes_parse_with_binary_suffixes() {
        for (text, bytes) in [
            ("4096", 4096),
            ("64K", 64 << 10),
            ("10M", 10 << 20),
            ("1G", 1 << 30),
            ("2TiB", 2 << 40),
            ("3gb", 3 << 30),
        ] {
            assert_eq!(parse_size(text), Ok(bytes), "{text}");
        }
    }

    #[test]
    fn bad_sizes_are_refused() {
        for text in ["", "G", "0", "12X", "-1", "99999999P"] {
            assert!(parse_size(text).is_err(), "{text}");
        }
    }

    #[test]
    fn granularities_are_powers_of_two_from_4k_to_16m() {
        for (text, bytes) in [
            ("4K", 4096),
            ("64K", 64 << 10),
            ("1M", 1 << 20),
            ("16M", 16 << 20),
        ] {
            assert_eq!(parse_granularity(text), Ok(bytes), "{text}");
        }
        for text in ["3K", "2K", "6K", "32M", "4097", "0", "x"] {
            assert!(parse_granularity(text).is_err(), "{text}");
        }
    }

    #[test]
    fn sizes_are_shown_with_the_largest_exact_suffix() {
        for (bytes, text) in [
            (4096, "4K"),
            (16 << 20, "16M"),
            (3 << 30, "3G"),
            (1536, "1536"),
            (7, "7"),
        ] {
            assert_eq!(size_text(bytes), text, "{bytes}");
        }
    }
}
