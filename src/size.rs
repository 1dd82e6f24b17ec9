//! Size arguments: a number of bytes with an optional binary suffix
//! (`512`, `64K`, `10M`, `1G`, `2TiB`).

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

#[cfg(test)]
mod tests {
    use super::parse_size;

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
}
