//! What one claimed mail's attempt comes to: sent, failed (and who must act), tried again
//! after a back-off, or waiting for its mailbox without spending the attempt.

use chrono::{DateTime, Duration, Utc};

use crate::delivery::classify::{Level, Verdict, Who};
use crate::delivery::limits::backoff;
use crate::outbox::claims::ClaimedRow;
use crate::outbox::record::Outcome;
use crate::tokens::service::TokenProblem;

/// One claimed mail's attempt, and what it may spend.
pub(crate) struct Attempt<'a> {
    pub(crate) row: &'a ClaimedRow,
    pub(crate) max_attempts: i32,
    pub(crate) retry_base_secs: i64,
    pub(crate) now: DateTime<Utc>,
}

/// An outcome, and who must act when the mail failed for good.
pub(crate) struct Decided {
    pub(crate) outcome: Outcome,
    pub(crate) failed_for: Option<FailedFor>,
}

/// Who must act on a mail that failed for good.
pub(crate) struct FailedFor {
    pub(crate) who: Who,
    /// The end of the failure's words that is advice to the author alone (to correct the mail
    /// and send it again): left out of the operators' copy.
    pub(crate) authors_advice: Option<String>,
}

impl Attempt<'_> {
    pub(crate) fn outcome(
        &self,
        status: &'static str,
        reply: Option<String>,
        error: Option<String>,
    ) -> Outcome {
        Outcome {
            id: self.row.id,
            status,
            next_attempt_at: None,
            last_reply: reply,
            last_error: error,
            uncount: false,
            tried: true,
        }
    }

    pub(crate) fn sent(&self, reply: String) -> Decided {
        Decided {
            outcome: self.outcome("sent", Some(reply), None),
            failed_for: None,
        }
    }

    pub(crate) fn failed(&self, reply: Option<String>, why: String, who: Who) -> Decided {
        Decided {
            outcome: self.outcome("failed", reply, Some(why)),
            failed_for: Some(FailedFor {
                who,
                authors_advice: None,
            }),
        }
    }

    pub(crate) fn retry_or_fail(&self, reply: Option<String>, error: String) -> Decided {
        if self.row.attempts >= self.max_attempts {
            let why = format!("Gave up after {} attempts: {error}", self.row.attempts);
            return self.failed(reply, why, Who::Nobody);
        }
        let mut outcome = self.outcome("queued", reply, Some(error));
        outcome.next_attempt_at = Some(self.now + backoff(self.retry_base_secs, self.row.attempts));
        Decided {
            outcome,
            failed_for: None,
        }
    }

    /// The mail waits for its mailbox, spending no attempt.
    pub(crate) fn wait(
        &self,
        until: Option<DateTime<Utc>>,
        reply: Option<String>,
        why: Option<String>,
    ) -> Decided {
        let mut outcome = self.outcome("queued", reply, why);
        outcome.next_attempt_at = Some(until.unwrap_or(self.now));
        outcome.uncount = true;
        Decided {
            outcome,
            failed_for: None,
        }
    }

    /// What a token problem does to the mail (a hold was recorded by the token service).
    pub(crate) fn token_problem(&self, problem: &TokenProblem) -> Decided {
        match problem {
            TokenProblem::Held(v) => {
                let until = v.hold_for.map(|d| self.now + d);
                self.wait(until, None, Some(v.words()))
            }
            TokenProblem::Transient {
                retry_after_secs, ..
            } => {
                let mut d = self.retry_or_fail(None, problem.to_string());
                if let (Some(secs), Some(at)) = (retry_after_secs, d.outcome.next_attempt_at) {
                    d.outcome.next_attempt_at =
                        Some(Ord::max(at, self.now + Duration::seconds(*secs as i64)));
                }
                d
            }
            TokenProblem::Database(_) => self.retry_or_fail(None, problem.to_string()),
            // Quietly, a moment: another worker's refresh is about to give the token.
            TokenProblem::Busy(_) => self.wait(Some(self.now + Duration::seconds(3)), None, None),
        }
    }

    /// What a message-level refusal does to the mail.
    pub(crate) fn refused(&self, verdict: &Verdict, reply: Option<String>) -> Decided {
        match verdict.level {
            Level::MailFails => {
                let mut d = self.failed(reply, verdict.words(), verdict.who);
                if let Some(f) = d.failed_for.as_mut().filter(|f| f.who == Who::Author) {
                    f.authors_advice = Some(verdict.fix.clone());
                }
                d
            }
            _ => self.retry_or_fail(reply, verdict.words()),
        }
    }
}
