//! A mail's failure in the words its author (a user, not an operator) reads, on the pages and
//! in the notification that it was not sent: the remote server's reply reduced to its codes,
//! and the operators' steps replaced by what the author is told instead.

/// What an enhanced status code's subject and detail (the `1.1` of `5.1.1`) say, in words:
/// RFC 3463's names for the codes a sender meets most, and Exchange Online's `5.1.10`
/// (RESOLVER.ADR.RecipientNotFound in its non-delivery reports).
const ENHANCED_WORDS: [(&str, &str); 12] = [
    ("1.1", "the recipient's mailbox does not exist"),
    (
        "1.2",
        "the recipient's domain does not exist or takes no mail",
    ),
    ("1.3", "the recipient's address is not valid"),
    ("1.8", "the sender's domain is not accepted"),
    ("1.10", "recipient not found"),
    ("2.1", "the recipient's mailbox is disabled"),
    ("2.2", "the recipient's mailbox is full"),
    ("3.4", "the message is too large"),
    ("4.4", "the recipient's domain cannot be reached"),
    ("5.3", "too many recipients"),
    ("7.1", "refused by the receiving side's policy"),
    ("7.8", "authentication refused"),
];

/// The classified words of a remote SMTP reply: its code and enhanced status code, with the
/// latter's meaning where [`ENHANCED_WORDS`] knows it (`550 5.1.10: recipient not found`),
/// never the remote server's free text.
pub fn classified_reply(reply: &str) -> String {
    let mut words = reply.split_whitespace();
    let Some(code) = words
        .next()
        .filter(|w| w.len() == 3 && w.bytes().all(|b| b.is_ascii_digit()))
    else {
        return "no SMTP reply".into();
    };
    // (Its own output, classified again, stays as it is: the code may end with the colon.)
    let enhanced = words.next().map(|w| w.trim_end_matches(':')).filter(|w| {
        let parts: Vec<&str> = w.split('.').collect();
        parts.len() == 3
            && parts
                .iter()
                .all(|p| (1..=3).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit()))
    });
    let Some(enhanced) = enhanced else {
        return code.to_string();
    };
    let meaning = enhanced
        .split_once('.')
        .and_then(|(_, detail)| ENHANCED_WORDS.iter().find(|(d, _)| *d == detail));
    match meaning {
        Some((_, words)) => format!("{code} {enhanced}: {words}"),
        None => format!("{code} {enhanced}"),
    }
}

/// A failure as a user reads it: `error` ([`user_words`]) with the remote `reply` inside it
/// reduced to its codes ([`classified_reply`]); returns (error, reply). `status` is the mail's.
pub fn for_user(
    error: Option<String>,
    reply: Option<String>,
    status: &str,
) -> (Option<String>, Option<String>) {
    let (error, reply) = match reply {
        Some(reply) => {
            let words = classified_reply(&reply);
            (error.map(|e| e.replace(&reply, &words)), Some(words))
        }
        None => (error, None),
    };
    (error.map(|e| user_words(&e, status)), reply)
}

/// What the author reads when the operators must act and the mail failed for good (as the
/// failed-mail notification says it).
pub const OPERATORS_TOLD_FAILED: &str = "The CRM's operators have been told; nothing is needed from you until they have fixed it — then send it again.";
/// What the author reads when the operators must act and the mail waits (as the notification
/// to the authors of waiting mail says it).
pub const OPERATORS_TOLD_WAITING: &str =
    "The CRM's operators have been told and will fix it; nothing is needed from you.";
/// The words of a wait that ends by itself (a quota's window), after which no one is told
/// to fix anything.
const BY_THEMSELVES: &str = "go out by themselves";

/// What the author reads of a mailbox that cannot reach Microsoft: it may pass by itself,
/// and its people are told only if it lasts.
const UNREACHABLE_TOLD: &str = "Nothing is needed from you; it goes out once the server answers.";

/// What the author reads when the mailbox must be connected again. Who can (its owner: the
/// reader, another user, or the operators for a shared mailbox) is said to each reader by the
/// mailbox's waiting words (`delivery::waiting::waiting_words_for`).
const RECONNECT_TOLD: &str =
    "The mailbox must be connected again; the mail waits until then. Nothing is lost.";

/// [`RECONNECT_TOLD`] for a mailbox that was never connected (or was disconnected).
const CONNECT_TOLD: &str =
    "The mailbox must be connected; the mail waits until then. Nothing is lost.";

/// What the author of a mail that failed for good reads when the mailbox must be connected
/// again.
const RECONNECT_TOLD_FAILED: &str = "The mailbox must be connected again; then send it again.";

/// Sentences that tell an operator or an administrator what to do (where a user cannot go:
/// the server page, the settings, Azure, the Exchange admin center).
const FOR_OPERATORS: &[&str] = &[
    "administrator",
    "operator",
    "Release held mail",
    // Words stored before the server page's button was named Release held mail.
    "Retry now",
    "server page",
    "server's page",
    "Settings ›",
    "Azure",
    "Entra",
    "App registrations",
    "Enterprise applications",
    "admin center",
    "Reconnecting",
    "proxy",
    "report it",
    "spread the sending",
];

/// Sentences that ask for the mailbox to be connected again (not lettre's "Connection
/// error: …", a network failure).
const RECONNECT: &[&str] = &["Click Connect", "connected again", "sign in again"];

/// How the "what to do" part of a failure may begin where the "what happened" before it ends
/// with a remote reply rather than a full stop.
const STEPS_BEGIN: &[&str] = &[
    "A CRM operator",
    "An administrator",
    "An Exchange administrator",
    "A Microsoft 365 administrator",
    "Reconnecting",
    "Nothing to do",
    "Check ",
    "Click ",
];

/// The sentences of `text`: each ends with a full stop followed by a capital letter, or just
/// before the steps of [`STEPS_BEGIN`].
fn sentences(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    for (at, _) in text.match_indices(' ') {
        let next = &text[at + 1..];
        let ends = (text[..at].ends_with('.') && next.starts_with(char::is_uppercase))
            || STEPS_BEGIN.iter().any(|s| next.starts_with(s));
        if ends && at > start {
            out.push(text[start..at].trim());
            start = at + 1;
        }
    }
    let rest = text[start..].trim();
    if !rest.is_empty() {
        out.push(rest);
    }
    out
}

/// `words` (a failure as its author reads it: [`user_words`]) without what they were told
/// instead of the operators' steps, for a page that says that beside it (a waiting mail's
/// waiting words).
pub fn without_told(words: &str) -> &str {
    [
        OPERATORS_TOLD_WAITING,
        UNREACHABLE_TOLD,
        RECONNECT_TOLD,
        CONNECT_TOLD,
    ]
    .iter()
    .find_map(|told| words.strip_suffix(told))
    .unwrap_or(words)
    .trim_end()
}

/// A failure in the words its author reads: what happened, without the steps only operators
/// (or a mailbox's owner) can take, and instead what the notifications tell authors — that
/// the operators were told, and what is left for them to do. `status` is the mail's.
pub fn user_words(words: &str, status: &str) -> String {
    let (mut kept, told) = user_parts(words, status);
    kept.extend(told);
    kept.join(" ")
}

/// [`user_words`] in its two parts: the sentences a user reads as they are, and what they are
/// told instead of the steps left out (`None` when nothing was left out).
fn user_parts<'a>(words: &'a str, status: &str) -> (Vec<&'a str>, Option<&'static str>) {
    let (mut for_operators, mut reconnect) = (false, false);
    let mut kept: Vec<&str> = Vec::new();
    // A mailbox out of reach: its waiting words (beside these) say when the mail goes.
    let unreachable = words.contains(crate::delivery::classify::IF_IT_LASTS);
    for sentence in sentences(words) {
        if unreachable && sentence.starts_with("The mails wait") {
            continue;
        }
        if FOR_OPERATORS.iter().any(|w| sentence.contains(w)) {
            for_operators = true;
        } else if RECONNECT.iter().any(|w| sentence.contains(w)) {
            reconnect = true;
        } else {
            kept.push(sentence);
        }
    }
    let never = words.contains(" is not connected.");
    let told = match (reconnect, for_operators, status) {
        (true, _, "failed") => Some(RECONNECT_TOLD_FAILED),
        (true, _, _) if never => Some(CONNECT_TOLD),
        (true, _, _) => Some(RECONNECT_TOLD),
        (false, true, "failed") => Some(OPERATORS_TOLD_FAILED),
        (false, true, _) if words.contains(crate::delivery::classify::IF_IT_LASTS) => {
            Some(UNREACHABLE_TOLD)
        }
        // It goes by itself (a quota's window): nobody has anything to fix.
        (false, true, _) if kept.iter().any(|s| s.contains(BY_THEMSELVES)) => None,
        (false, true, _) => Some(OPERATORS_TOLD_WAITING),
        (false, false, _) => None,
    };
    (kept, told)
}

/// The author's words for a mail that failed for good because of `why` (the words of the
/// classification, with the remote `reply` in them), ending with what is left for the author
/// to do: `theirs` when the failure is the author's to correct, else what they are told
/// (the operators were told, or the mailbox must be connected again).
pub fn failed_for_author(why: &str, reply: Option<&str>, theirs: bool) -> String {
    let why = match reply {
        Some(reply) => why.replace(reply, &classified_reply(reply)),
        None => why.to_string(),
    };
    let (mut kept, told) = user_parts(&why, "failed");
    let says_send_again = kept.iter().any(|k| k.contains("send it again"));
    match told {
        Some(told) => kept.push(told),
        // The classification's own advice already ends "then send it again".
        None if theirs && says_send_again => {}
        None if theirs => kept.push("Correct what is said here and send it again from the record."),
        None => kept.push(OPERATORS_TOLD_FAILED),
    }
    kept.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::classify::{self, Facts, Observed, Stage};

    /// Words only operators can act on.
    fn for_operators_only(words: &str) -> bool {
        [
            "Release held mail",
            "Retry now",
            "server page",
            "Settings ›",
            "administrator",
            "operator must",
            "Azure",
        ]
        .iter()
        .any(|w| words.contains(w))
    }

    #[test]
    fn a_user_reads_every_failure_without_the_operators_steps() {
        let facts = Facts {
            mailbox: "sales@contoso.example",
            from: "alice@contoso.example",
            auth_user: "admin@contoso.example",
        };
        let mut verdicts: Vec<classify::Verdict> = classify::SMTP_RULES
            .iter()
            .map(|rule| {
                let code = if rule.id.contains("temporary") || rule.id == "rate-throttled" {
                    421
                } else {
                    554
                };
                let stage = match rule.id {
                    "auth-refused" | "auth-temporary" | "auth-other" => Stage::Auth,
                    "connection-refused" => Stage::Connect,
                    _ => Stage::Transaction,
                };
                let text = format!(
                    "{code} {} x",
                    rule.when.contains.first().copied().unwrap_or("5.0.0")
                );
                classify::smtp(
                    Observed::Reply {
                        stage,
                        code,
                        text: &text,
                    },
                    &facts,
                )
            })
            .collect();
        verdicts.push(classify::smtp(Observed::NoXoauth2, &facts));
        verdicts.push(classify::not_connected("sales@contoso.example"));
        for detail in [
            "Connection error: failed to lookup address information",
            "Connection error: invalid peer certificate: UnknownIssuer",
        ] {
            verdicts.push(classify::smtp(
                Observed::Network {
                    stage: Stage::Connect,
                    detail,
                },
                &facts,
            ));
        }
        verdicts.push(classify::smtp(
            Observed::NeedsSmtpUtf8 {
                detail: "the server does not offer SMTPUTF8, which dänä@fabrikam.example needs",
            },
            &facts,
        ));
        for v in &verdicts {
            for status in ["queued", "failed"] {
                let seen = user_words(&v.words(), status);
                assert!(!for_operators_only(&seen), "{}: {seen}", v.rule);
                // Only a mailbox whose sign-in ended or that is not connected is said to need
                // connecting (lettre's "Connection error: …" is a network failure).
                assert_eq!(
                    seen.contains("must be connected"),
                    v.rule == "not-connected",
                    "{}: {seen}",
                    v.rule
                );
                assert!(
                    seen.starts_with(v.what.split(". ").next().unwrap_or_default()),
                    "{}: {seen}",
                    v.rule
                );
                // No sentence left behind that points at a step taken out.
                assert!(!seen.contains("after that"), "{}: {seen}", v.rule);
            }
        }
        assert_eq!(
            user_words(
                &classify::not_connected("sales@contoso.example").words(),
                "queued"
            ),
            "The mailbox sales@contoso.example is not connected. The mailbox must be connected; the mail waits until then. Nothing is lost."
        );
    }

    #[test]
    fn a_user_is_told_the_operators_were_told() {
        let words = "Microsoft Graph refused to send from sales@contoso.example (403). An administrator must grant the app Mail.Send with admin consent; then click Release held mail on the server page.";
        assert_eq!(
            user_words(words, "failed"),
            format!(
                "Microsoft Graph refused to send from sales@contoso.example (403). {OPERATORS_TOLD_FAILED}"
            )
        );
        assert_eq!(
            user_words(words, "queued"),
            format!(
                "Microsoft Graph refused to send from sales@contoso.example (403). {OPERATORS_TOLD_WAITING}"
            )
        );
        // What is the author's to fix stays as it is.
        let theirs = "The SMTP server refused this mail (550 5.1.1). Check the recipients and the content, then send it again.";
        assert_eq!(user_words(theirs, "failed"), theirs);
    }

    #[test]
    fn the_author_of_a_failed_mail_reads_what_is_left_for_them() {
        let operators = "Microsoft Graph refused to send from sales@contoso.example (403). An administrator must grant the app Mail.Send with admin consent; then click Release held mail on the server page.";
        assert_eq!(
            failed_for_author(operators, None, false),
            format!(
                "Microsoft Graph refused to send from sales@contoso.example (403). {OPERATORS_TOLD_FAILED}"
            )
        );
        let reconnect = "The mailbox sales@contoso.example is not connected. Click Connect on its page and sign in again.";
        let read = failed_for_author(reconnect, None, false);
        assert!(read.ends_with(RECONNECT_TOLD_FAILED), "{read}");
        assert!(!read.contains("operators have been told"), "{read}");
        // The author's own fix stays, and the remote server's free text is reduced to codes.
        let reply = "550 5.1.1 <nobody@fabrikam.example>: anything the server says";
        let theirs = format!(
            "The SMTP server refused this mail ({reply}). Check the recipients and the content, then send it again."
        );
        assert_eq!(
            failed_for_author(&theirs, Some(reply), true),
            "The SMTP server refused this mail (550 5.1.1: the recipient's mailbox does not exist). Check the recipients and the content, then send it again."
        );
        // Without advice of its own, the author is told what is left for them.
        assert_eq!(
            failed_for_author("The message is too large.", None, true),
            "The message is too large. Correct what is said here and send it again from the record."
        );
        // Nothing left out and not theirs to fix (a mail given up on): the operators were told.
        let given_up = "Gave up after 5 attempts: the connection to smtp.office365.com was lost.";
        assert_eq!(
            failed_for_author(given_up, None, false),
            format!("{given_up} {OPERATORS_TOLD_FAILED}")
        );
    }

    #[test]
    fn a_reply_is_classified_to_its_codes() {
        assert_eq!(
            classified_reply("554 5.2.0 STOREDRV.Submission.Exception: anything the server says"),
            "554 5.2.0"
        );
        assert_eq!(
            classified_reply("550 5.1.10 RESOLVER.ADR.RecipientNotFound; not found"),
            "550 5.1.10: recipient not found"
        );
        assert_eq!(
            classified_reply("552 5.2.2 Mailbox full"),
            "552 5.2.2: the recipient's mailbox is full"
        );
        assert_eq!(classified_reply("250 OK queued as 12345"), "250");
        let once = classified_reply("550 5.1.10 RESOLVER.ADR.RecipientNotFound");
        assert_eq!(
            classified_reply(&once),
            once,
            "classifying twice changes nothing"
        );
        assert_eq!(classified_reply("421 4.7.0 <script>"), "421 4.7.0");
        assert_eq!(
            classified_reply("Connection refused by peer"),
            "no SMTP reply"
        );
        assert_eq!(classified_reply("5541 x"), "no SMTP reply");
    }
}
