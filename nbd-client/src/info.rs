//! What the handshake learned about the export: size, transmission flags,
//! block size constraints, reply framing and the selected metadata
//! contexts; and the request limits the client derives from them.

use nbd_server::proto::*;

/// Largest READ or WRITE payload this client sends in one request, even when
/// the server allows more: the spec's portable maximum (2^25), which bounds
/// the memory one request in flight can pin.
pub const REQUEST_PAYLOAD_MAX_BYTES: u32 = 32 * 1024 * 1024;
/// Block sizes the spec tells clients to assume when the server names none.
pub const DEFAULT_MINIMUM_BYTES: u32 = 1;
pub const DEFAULT_PREFERRED_BYTES: u32 = 4096;
pub const DEFAULT_MAXIMUM_BYTES: u32 = REQUEST_PAYLOAD_MAX_BYTES;
/// The largest minimum block size the spec allows (2^16).
pub const MINIMUM_BLOCK_MAX_BYTES: u32 = 64 * 1024;

/// The server's size constraints (NBD_INFO_BLOCK_SIZE), or the spec's
/// defaults when it sent none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSizes {
    pub minimum_bytes: u32,
    pub preferred_bytes: u32,
    /// The maximum payload; 0xffffffff means the server has no fixed limit.
    pub maximum_bytes: u32,
    /// Whether the server sent them (else these are the defaults).
    pub advertised: bool,
}

impl Default for BlockSizes {
    fn default() -> Self {
        BlockSizes {
            minimum_bytes: DEFAULT_MINIMUM_BYTES,
            preferred_bytes: DEFAULT_PREFERRED_BYTES,
            maximum_bytes: DEFAULT_MAXIMUM_BYTES,
            advertised: false,
        }
    }
}

impl BlockSizes {
    /// Checks what the server advertised. The minimum and maximum bind the
    /// client, so values the spec forbids there end the handshake; the
    /// preferred size is only a hint, so an odd one is replaced by the
    /// minimum rather than refusing the server.
    pub fn from_server(minimum: u32, preferred: u32, maximum: u32) -> Option<BlockSizes> {
        if !minimum.is_power_of_two() || minimum > MINIMUM_BLOCK_MAX_BYTES || maximum < minimum {
            return None;
        }
        let preferred_is_sane =
            preferred.is_power_of_two() && preferred >= minimum && preferred <= maximum;
        Some(BlockSizes {
            minimum_bytes: minimum,
            preferred_bytes: if preferred_is_sane {
                preferred
            } else {
                minimum
            },
            maximum_bytes: maximum,
            advertised: true,
        })
    }
}

/// Everything about the export that the handshake settled.
#[derive(Debug, Clone)]
pub struct ExportInfo {
    pub export_name: String,
    pub size_bytes: u64,
    /// The raw transmission flags; the `can_*` methods read them.
    pub transmission_flags: u16,
    pub block_sizes: BlockSizes,
    /// Simple, structured or extended replies.
    pub reply_mode: ReplyMode,
    /// Selected metadata contexts: (id the server chose, name).
    pub meta_contexts: Vec<(u32, String)>,
}

impl ExportInfo {
    fn flag(&self, flag: u16) -> bool {
        // Without HAS_FLAGS the other bits mean nothing (spec: bit 0 MUST be set).
        self.transmission_flags & TFLAG_HAS_FLAGS != 0 && self.transmission_flags & flag != 0
    }
    pub fn is_read_only(&self) -> bool {
        self.flag(TFLAG_READ_ONLY)
    }
    pub fn can_flush(&self) -> bool {
        self.flag(TFLAG_SEND_FLUSH)
    }
    pub fn can_fua(&self) -> bool {
        self.flag(TFLAG_SEND_FUA)
    }
    pub fn is_rotational(&self) -> bool {
        self.flag(TFLAG_ROTATIONAL)
    }
    pub fn can_trim(&self) -> bool {
        self.flag(TFLAG_SEND_TRIM)
    }
    pub fn can_write_zeroes(&self) -> bool {
        self.flag(TFLAG_SEND_WRITE_ZEROES)
    }
    pub fn can_df(&self) -> bool {
        self.flag(TFLAG_SEND_DF)
    }
    /// FLUSH and FUA on this connection cover writes made on every other
    /// connection to the same export, so several connections may be used.
    pub fn can_multi_conn(&self) -> bool {
        self.flag(TFLAG_CAN_MULTI_CONN)
    }
    pub fn can_cache(&self) -> bool {
        self.flag(TFLAG_SEND_CACHE)
    }
    pub fn can_fast_zero(&self) -> bool {
        self.can_write_zeroes() && self.flag(TFLAG_SEND_FAST_ZERO)
    }
    pub fn has_meta_context(&self, name: &str) -> bool {
        self.meta_contexts
            .iter()
            .any(|(_, context)| context == name)
    }
}

/// Request sizes derived from `ExportInfo`, all multiples of the minimum
/// block size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limits {
    /// Every offset and length is a multiple of this.
    pub alignment_bytes: u64,
    /// Largest READ/WRITE payload in one request.
    pub payload_max_bytes: u64,
    /// Largest TRIM/WRITE_ZEROES effect length in one request.
    pub effect_max_bytes: u64,
    /// Largest BLOCK_STATUS length asked for in one request (a hint).
    pub status_max_bytes: u64,
}

impl Limits {
    pub fn new(info: &ExportInfo) -> Limits {
        let sizes = info.block_sizes;
        let alignment = u64::from(sizes.minimum_bytes);
        // Split on preferred-size boundaries where the maximum allows it, so
        // that no piece but the last leaves the server a partial block.
        let round = |limit: u64| {
            let preferred = u64::from(sizes.preferred_bytes);
            if limit >= preferred {
                limit / preferred * preferred
            } else {
                limit / alignment * alignment
            }
        };
        let maximum = u64::from(sizes.maximum_bytes);
        // TRIM and WRITE_ZEROES carry no payload: the spec lets a client
        // exceed the maximum payload for them, but a server may refuse
        // with EOVERFLOW, so they split at the server's maximum too.
        let effect = if sizes.advertised {
            maximum
        } else {
            u64::from(DEFAULT_MAXIMUM_BYTES)
        };
        let status = match info.reply_mode {
            ReplyMode::Extended => u64::MAX,
            _ => u64::from(u32::MAX),
        };
        Limits {
            alignment_bytes: alignment,
            payload_max_bytes: round(maximum.min(u64::from(REQUEST_PAYLOAD_MAX_BYTES))),
            effect_max_bytes: round(effect.min(u64::from(u32::MAX))),
            status_max_bytes: round(status),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(sizes: BlockSizes, mode: ReplyMode) -> ExportInfo {
        ExportInfo {
            export_name: String::new(),
            size_bytes: 1 << 40,
            transmission_flags: TFLAG_HAS_FLAGS,
            block_sizes: sizes,
            reply_mode: mode,
            meta_contexts: Vec::new(),
        }
    }

    #[test]
    fn advertised_block_sizes_are_checked() {
        assert_eq!(
            BlockSizes::from_server(512, 4096, 1 << 25),
            Some(BlockSizes {
                minimum_bytes: 512,
                preferred_bytes: 4096,
                maximum_bytes: 1 << 25,
                advertised: true
            })
        );
        assert_eq!(BlockSizes::from_server(0, 4096, 1 << 25), None);
        assert_eq!(BlockSizes::from_server(3, 4096, 1 << 25), None);
        assert_eq!(BlockSizes::from_server(1 << 17, 1 << 17, 1 << 25), None);
        assert_eq!(BlockSizes::from_server(4096, 4096, 512), None);
        let odd_preferred = BlockSizes::from_server(512, 1000, 1 << 20).unwrap();
        assert_eq!(odd_preferred.preferred_bytes, 512);
    }

    #[test]
    fn limits_follow_the_server_and_stay_aligned() {
        let defaults = Limits::new(&info(BlockSizes::default(), ReplyMode::Structured));
        assert_eq!(defaults.alignment_bytes, 1);
        assert_eq!(defaults.payload_max_bytes, 32 << 20);
        assert_eq!(defaults.effect_max_bytes, 32 << 20);
        assert_eq!(defaults.status_max_bytes, u64::from(u32::MAX) / 4096 * 4096);

        // No fixed limit: payloads still stop at 32 MiB, effects at 32 bits.
        let unlimited = BlockSizes::from_server(1, 4096, u32::MAX).unwrap();
        let limits = Limits::new(&info(unlimited, ReplyMode::Extended));
        assert_eq!(limits.payload_max_bytes, 32 << 20);
        assert_eq!(limits.effect_max_bytes, u64::from(u32::MAX) / 4096 * 4096);
        assert_eq!(limits.status_max_bytes, u64::MAX / 4096 * 4096);

        // An odd maximum is rounded down to the preferred size.
        let odd = BlockSizes::from_server(512, 4096, 1_000_000).unwrap();
        let limits = Limits::new(&info(odd, ReplyMode::Structured));
        assert_eq!(limits.payload_max_bytes, 1_000_000 / 4096 * 4096);
        assert_eq!(limits.alignment_bytes, 512);
    }

    #[test]
    fn capabilities_need_has_flags() {
        let mut export = info(BlockSizes::default(), ReplyMode::Structured);
        export.transmission_flags = TFLAG_HAS_FLAGS | TFLAG_SEND_TRIM | TFLAG_SEND_FAST_ZERO;
        assert!(export.can_trim());
        // FAST_ZERO means nothing without WRITE_ZEROES.
        assert!(!export.can_fast_zero());
        export.transmission_flags = TFLAG_SEND_TRIM | TFLAG_READ_ONLY;
        assert!(!export.can_trim());
        assert!(!export.is_read_only());
    }
}
