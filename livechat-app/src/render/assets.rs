//! Asset fingerprinting: the client script and stylesheet, served under URLs that carry a
//! hash of their content so browsers may cache them forever.

/// Where the client script and stylesheet are served, with a content hash for caching.
pub struct Assets {
    /// URL of `live.js`.
    pub script: String,
    /// URL of `app.css`.
    pub style: String,
}

/// The hand-written client script.
pub const LIVE_JS: &str = include_str!("../../assets/live.js");
/// The stylesheet.
pub const APP_CSS: &str = include_str!("../../assets/app.css");

impl Assets {
    /// URLs carrying a hash of each file, so browsers may cache them forever.
    pub fn new() -> Self {
        Self {
            script: format!("/assets/live.js?v={:016x}", fnv1a(LIVE_JS.as_bytes())),
            style: format!("/assets/app.css?v={:016x}", fnv1a(APP_CSS.as_bytes())),
        }
    }
}

impl Default for Assets {
    fn default() -> Self {
        Self::new()
    }
}

/// FNV-1a, 64 bits: a stable content hash for cache busting (not for security).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn asset_urls_carry_a_content_hash() {
        let assets = Assets::new();
        assert!(assets.script.starts_with("/assets/live.js?v="));
        assert_eq!(assets.script.len(), "/assets/live.js?v=".len() + 16);
    }
}
