//! Telling people that a mail failed for good: its author and the operators, once per mail,
//! in the words of the classification table.

use crm_sdk::{Audience, ModuleContext, Notification};

use crate::delivery::classify::Who;
use crate::outbox::claims::ClaimedRow;
use crate::outbox::user_words::failed_for_author;

/// The incident key of a failed mail (one notice per mail and person).
pub fn key(mail_id: i64) -> String {
    format!("microsoft_outlook/mail/{mail_id}/failed")
}

/// The page both notices link to: the mail's detail page in the outbox (its author and the
/// operators see it, whatever the mailbox or the record).
pub fn link(mail_id: i64) -> String {
    format!("/microsoft_outlook/outbox/{mail_id}")
}

/// Notifies the author and the operators that `mail` failed because of `why` (the words of
/// the classification; `reply` is the remote server's reply in them, if any); `who` must act.
/// The author reads it as on the mail's page ([`failed_for_author`]): the reply reduced to its
/// codes, no operator's steps, and what is left for them to do. `authors_advice` is the end of
/// `why` meant for the author alone: the operators' copy leaves it out.
pub async fn mail_failed(
    ctx: &ModuleContext,
    mail: &ClaimedRow,
    (why, reply): (&str, Option<&str>),
    who: Who,
    authors_advice: Option<&str>,
) {
    let subject = format!("Mail not sent: \"{}\"", mail.subject);
    let recipients = mail.recipients.lines().collect::<Vec<_>>().join(", ");
    let author_body = format!(
        "Your mail to {recipients} was not sent, and it is not tried again by itself. {}",
        failed_for_author(why, reply, who == Who::Author)
    );
    let for_operators = authors_advice
        .and_then(|a| why.strip_suffix(a))
        .unwrap_or(why)
        .trim_end();
    let operators_body = format!(
        "Mail {} by {} to {recipients} was not sent, and it is not tried again by itself. {for_operators}",
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
