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
/// (the author is told to correct the mail only when it is theirs to fix). `authors_advice`
/// is the end of `why` meant for the author alone: the operators' copy leaves it out.
pub async fn mail_failed(
    ctx: &ModuleContext,
    mail: &ClaimedRow,
    why: &str,
    who: Who,
    authors_advice: Option<&str>,
) {
    let subject = format!("Mail not sent: \"{}\"", mail.subject);
    let recipients = mail.recipients.lines().collect::<Vec<_>>().join(", ");
    let advice = if who == Who::Author {
        "Correct what is said here and send it again from the record."
    } else {
        "The CRM's operators have been told; nothing is needed from you until they have fixed it — then send it again."
    };
    let author_body =
        format!("Your mail to {recipients} failed and will not be retried. {why} {advice}");
    let for_operators = authors_advice
        .and_then(|a| why.strip_suffix(a))
        .unwrap_or(why)
        .trim_end();
    let operators_body = format!(
        "Mail {} by {} to {recipients} failed and will not be retried. {for_operators}",
        mail.id,
        author_of(&mail.from_header)
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

/// The author of a mail as people know them: the From header's display name (always the
/// author's name), else the header itself.
fn author_of(from_header: &str) -> String {
    match from_header.parse::<lettre::message::Mailbox>() {
        Ok(mailbox) => match mailbox.name.as_deref().map(str::trim) {
            Some(name) if !name.is_empty() => format!("{name} (sent as {})", mailbox.email),
            _ => mailbox.email.to_string(),
        },
        Err(_) => from_header.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::author_of;

    #[test]
    fn the_author_is_named_not_numbered() {
        assert_eq!(
            author_of("Alice Adams <sales@contoso.example>"),
            "Alice Adams (sent as sales@contoso.example)"
        );
        assert_eq!(
            author_of("\"Adams, Alice\" <alice@contoso.example>"),
            "Adams, Alice (sent as alice@contoso.example)"
        );
        assert_eq!(author_of("bob@contoso.example"), "bob@contoso.example");
    }
}
