//! Telling people that a mail failed for good: its author and the operators, once per mail,
//! in the words of the classification table.

use crm_sdk::{Audience, ModuleContext, Notification};

use crate::delivery::classify::Who;
use crate::outbox::claims::ClaimedRow;

/// The incident key of a failed mail (one notice per mail and person).
pub fn key(mail_id: i64) -> String {
    format!("microsoft_outlook/mail/{mail_id}/failed")
}

/// The page both notices link to: the mail's detail page in the outbox (its author and the
/// operators see it, whatever the mailbox or the record).
pub fn link(mail_id: i64) -> String {
    format!("/microsoft_outlook/outbox/{mail_id}")
}

/// Notifies the author and the operators that `mail` failed because of `why`; `who` must act
/// (the author is told to correct the mail only when it is theirs to fix).
pub async fn mail_failed(ctx: &ModuleContext, mail: &ClaimedRow, why: &str, who: Who) {
    let subject = format!("Mail not sent: \"{}\"", mail.subject);
    let recipients = mail.recipients.lines().collect::<Vec<_>>().join(", ");
    let advice = if who == Who::Author {
        "Correct what is said here and send it again from the record."
    } else {
        "The CRM's operators have been told; nothing is needed from you until they have fixed it — then send it again."
    };
    let author_body =
        format!("Your mail to {recipients} failed and will not be retried. {why} {advice}");
    let operators_body = format!(
        "Mail {} from {} to {recipients} (author: user {}) failed and will not be retried. {why}",
        mail.id, mail.from_header, mail.author_user_id
    );
    let notices = [
        Notification {
            audience: Audience::User(mail.author_user_id),
            subject: subject.clone(),
            body: author_body,
            link: Some(link(mail.id)),
            key: Some(key(mail.id)),
        },
        Notification {
            audience: Audience::Operators,
            subject,
            body: operators_body,
            link: Some(link(mail.id)),
            key: Some(key(mail.id)),
        },
    ];
    for notice in notices {
        if let Err(e) = ctx.notifier().notify(notice).await {
            tracing::warn!(error = %e, outbox_id = mail.id, "a failed-mail notification was not recorded");
        }
    }
}
