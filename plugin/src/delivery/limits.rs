//! The delivery limits operators set (attempts, per-minute share, size, retention), read at
//! most every two seconds per process, and the retry back-off.

use chrono::Duration;
use crm_sdk::ModuleContext;
use rand::Rng;

use crate::runtime::Shared;

/// The default number of attempts before a mail is failed.
pub const DEFAULT_MAX_ATTEMPTS: i32 = 8;

/// The default days a sent mail's text is kept.
pub const DEFAULT_KEEP_SENT_DAYS: i64 = 30;

/// The retry delay after `attempts` failed attempts: exponential from `base_secs`, at most an
/// hour, with ±20 % jitter so that retries of many mails spread out.
pub fn backoff(base_secs: i64, attempts: i32) -> Duration {
    let exp = Ord::min(
        base_secs.saturating_mul(1_i64 << attempts.clamp(1, 16).saturating_sub(1)),
        3600,
    );
    let jitter = rand::rng().random_range(0.8..1.2);
    Duration::milliseconds((exp as f64 * 1000.0 * jitter) as i64)
}

pub use crate::runtime::Limits;

/// How long a process goes on using the limits it read (settings saved in another process
/// apply within this time; in this one, at once).
const LIMITS_FOR: std::time::Duration = std::time::Duration::from_secs(2);

/// The delivery limits from settings, read at most every [`LIMITS_FOR`].
pub async fn limits(ctx: &ModuleContext, shared: &Shared) -> Limits {
    if let Some((at, cached)) = *shared.limits.lock().unwrap_or_else(|e| e.into_inner())
        && at.elapsed() < LIMITS_FOR
    {
        return cached;
    }
    let fresh = read_limits(ctx).await;
    *shared.limits.lock().unwrap_or_else(|e| e.into_inner()) =
        Some((std::time::Instant::now(), fresh));
    fresh
}

async fn read_limits(ctx: &ModuleContext) -> Limits {
    let settings = ctx.settings().load(ctx.module_id()).await.ok();
    let get = |field: &str| {
        settings
            .as_ref()
            .and_then(|s| s.get(field).and_then(|v| v.parse::<i64>().ok()))
    };
    Limits {
        max_attempts: get("max_attempts").map_or(DEFAULT_MAX_ATTEMPTS, |n| n.clamp(1, 100) as i32),
        per_minute: get("mailbox_rate_per_minute").map_or(30, |n| Ord::max(n, 0) as usize),
        max_bytes: get("max_message_kb").map_or(crate::outbox::compose::DEFAULT_MAX_BYTES, |kb| {
            Ord::max(kb, 1) as usize * 1024
        }),
        max_attachment_bytes: get("max_attachments_mb").map_or(
            crate::outbox::attachments::DEFAULT_MAX_ATTACHMENT_BYTES,
            |mb| Ord::max(mb, 0) as usize * 1_000_000,
        ),
        keep_sent_days: get("keep_sent_days").map_or(DEFAULT_KEEP_SENT_DAYS, |d| d.clamp(0, 3650)),
    }
}
