//! The module's metrics in the Prometheus text format. Counters and the drain-latency histogram
//! are recorded as things happen, into a recorder of this module instance (not the process's
//! global one, so that two instances in one process never mix); the mails by status and the
//! mailboxes by health are read from the database at scrape time, so that every process on one
//! database reports the same numbers for them.
//!
//! README › "Metrics" lists the series.

use std::collections::BTreeMap;

use crm_sdk::ModuleContext;
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};
use sea_orm::{ColumnTrait, EntityTrait, QuerySelect};

use crate::delivery::classify::{Level, Verdict};
use crate::entities::outbox;

/// Mails by status (gauge, read at scrape time).
pub const MAILS: &str = "microsoft_outlook_mails";
/// Outcomes of delivery attempts by classification rule and level (counter).
pub const SENDS: &str = "microsoft_outlook_sends_total";
/// Seconds from queueing to a mail's final reply (histogram).
pub const DRAIN_SECONDS: &str = "microsoft_outlook_drain_seconds";
/// Token refreshes by outcome (counter).
pub const TOKEN_REFRESHES: &str = "microsoft_outlook_token_refreshes_total";
/// Mailboxes by health state (gauge, read at scrape time).
pub const MAILBOXES: &str = "microsoft_outlook_mailboxes";

/// Every status a mail can have, reported even when no mail has it.
pub const STATUSES: [&str; 5] = crate::entities::outbox::STATUSES;

/// Buckets of the drain latency: a second to a day.
const DRAIN_BUCKETS: [f64; 14] = [
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 21600.0, 86400.0,
];

/// The module's metrics recorder.
pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The level of a verdict as a label value.
pub fn level_name(level: Level) -> &'static str {
    match level {
        Level::MailFails => "mail_fails",
        Level::MailRetries => "mail_retries",
        Level::MailboxHeld(_) => "mailbox_held",
        Level::MailboxThrottled => "mailbox_throttled",
    }
}

impl Metrics {
    /// An empty registry with the series described.
    pub fn new() -> Self {
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Full(DRAIN_SECONDS.into()), &DRAIN_BUCKETS)
            // Only an empty bucket list is refused; without buckets it is a summary.
            .unwrap_or_else(|_| PrometheusBuilder::new());
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        ::metrics::with_local_recorder(&recorder, || {
            ::metrics::describe_gauge!(MAILS, "Mails in the outbox by status.");
            ::metrics::describe_counter!(
                SENDS,
                "Delivery attempts by outcome: the classification rule and the level it is handled at (sent, mail_fails, mail_retries, mailbox_held, mailbox_throttled)."
            );
            ::metrics::describe_histogram!(
                DRAIN_SECONDS,
                ::metrics::Unit::Seconds,
                "Seconds from queueing to the final reply (sent or failed)."
            );
            ::metrics::describe_counter!(TOKEN_REFRESHES, "Token refreshes by outcome.");
            ::metrics::describe_gauge!(MAILBOXES, "Mailboxes by health state.");
        });
        Self { recorder, handle }
    }

    /// A mail went out after `drain_secs` in the queue.
    pub fn sent(&self, drain_secs: f64) {
        ::metrics::with_local_recorder(&self.recorder, || {
            ::metrics::counter!(SENDS, "rule" => "sent", "level" => "sent").increment(1);
            ::metrics::histogram!(DRAIN_SECONDS, "outcome" => "sent").record(drain_secs.max(0.0));
        });
    }

    /// An attempt ended with `verdict` of the classification table.
    pub fn outcome(&self, verdict: &Verdict) {
        ::metrics::with_local_recorder(&self.recorder, || {
            ::metrics::counter!(SENDS, "rule" => verdict.rule, "level" => level_name(verdict.level))
                .increment(1);
        });
    }

    /// A mail failed for good after `drain_secs` in the queue.
    pub fn failed(&self, drain_secs: f64) {
        ::metrics::with_local_recorder(&self.recorder, || {
            ::metrics::histogram!(DRAIN_SECONDS, "outcome" => "failed").record(drain_secs.max(0.0));
        });
    }

    /// A token refresh ended: `ok`, `temporary`, `held` or `database`.
    pub fn token_refresh(&self, outcome: &'static str) {
        ::metrics::with_local_recorder(&self.recorder, || {
            ::metrics::counter!(TOKEN_REFRESHES, "outcome" => outcome).increment(1);
        });
    }

    /// The registry in the Prometheus text format, with the mail gauges read from the database
    /// now and the mailbox gauges from `by_health` (state → number of mailboxes, as the health
    /// module counts them).
    pub async fn render(
        &self,
        ctx: &ModuleContext,
        by_health: &BTreeMap<&'static str, i64>,
    ) -> Result<String, sea_orm::DbErr> {
        let by_status = mails_by_status(ctx).await?;
        ::metrics::with_local_recorder(&self.recorder, || {
            for (status, n) in &by_status {
                ::metrics::gauge!(MAILS, "status" => status.clone()).set(*n as f64);
            }
            for (state, n) in by_health {
                ::metrics::gauge!(MAILBOXES, "state" => *state).set(*n as f64);
            }
        });
        self.handle.run_upkeep();
        Ok(self.handle.render())
    }
}

/// How many mails have each status (every known status, zero included).
async fn mails_by_status(ctx: &ModuleContext) -> Result<BTreeMap<String, i64>, sea_orm::DbErr> {
    let rows: Vec<(String, i64)> = outbox::Entity::find()
        .select_only()
        .column(outbox::Column::Status)
        .column_as(outbox::Column::Id.count(), "n")
        .group_by(outbox::Column::Status)
        .into_tuple()
        .all(ctx.db())
        .await?;
    let mut counts: BTreeMap<String, i64> = STATUSES.iter().map(|s| (s.to_string(), 0)).collect();
    counts.extend(rows);
    Ok(counts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_and_the_histogram_render_in_the_text_format() {
        let m = Metrics::new();
        m.sent(1.5);
        m.token_refresh("ok");
        let text = ::metrics::with_local_recorder(&m.recorder, || {
            ::metrics::gauge!(MAILS, "status" => "sent").set(1.0);
            m.handle.render()
        });
        assert!(
            text.contains("microsoft_outlook_sends_total{rule=\"sent\",level=\"sent\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("microsoft_outlook_drain_seconds_bucket{outcome=\"sent\",le=\"2.5\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("microsoft_outlook_token_refreshes_total{outcome=\"ok\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE microsoft_outlook_mails gauge"),
            "{text}"
        );
    }
}
