//! The classification of Microsoft Graph's answers to sendMail and to the Sent Items lookup:
//! each (HTTP status, Graph error code) mapped to the level where it is handled, with the words
//! shown to people. Source: MICROSOFT.md › Microsoft Graph mail (errors and limits).

use chrono::Duration;

use crate::delivery::classify::{HoldReason, Level, Verdict, Who};

/// Graph's answer when it was not `202 Accepted`.
#[derive(Debug, Clone, Default)]
pub struct GraphReply {
    /// The HTTP status.
    pub status: u16,
    /// `error.code` of the JSON body (`ErrorInvalidRecipients`); empty when there was none.
    pub code: String,
    /// `error.message`.
    pub message: String,
    /// `Retry-After`, in seconds, when given.
    pub retry_after_secs: Option<i64>,
}

impl GraphReply {
    /// The reply as the outbox keeps it: `403 ErrorAccessDenied: <message>`.
    pub fn text(&self) -> String {
        match (self.code.is_empty(), self.message.is_empty()) {
            (true, _) => format!("{}", self.status),
            (false, true) => format!("{} {}", self.status, self.code),
            (false, false) => format!("{} {}: {}", self.status, self.code, self.message),
        }
    }

    /// Whether Graph refused the access token itself (`401 InvalidAuthenticationToken`).
    pub fn refused_token(&self) -> bool {
        self.status == 401
            && !self
                .code
                .eq_ignore_ascii_case("MailboxNotEnabledForRESTAPI")
    }
}

fn verdict(
    rule: &'static str,
    level: Level,
    who: Who,
    what: String,
    fix: &str,
    hold_for: Option<Duration>,
) -> Verdict {
    Verdict {
        rule,
        level,
        who,
        what,
        fix: fix.into(),
        hold_for,
    }
}

/// What Graph's `reply` to sending a mail from `mailbox` (envelope sender `from`) means.
pub fn classify(reply: &GraphReply, mailbox: &str, from: &str) -> Verdict {
    let code = reply.code.to_ascii_lowercase();
    let said = reply.text();
    match (reply.status, code.as_str()) {
        (_, "mailboxnotenabledforrestapi") => verdict(
            "graph-mailbox-not-enabled",
            Level::MailboxHeld(HoldReason::NotExchangeOnline),
            Who::ExchangeAdmin,
            format!(
                "Microsoft Graph cannot send from {mailbox}: it is not an Exchange Online mailbox (on-premises, unlicensed or inactive) ({said})."
            ),
            "An Exchange administrator must give the mailbox an Exchange Online licence, or an operator must send this server's mail over SMTP.",
            HoldReason::NotExchangeOnline.probe_after(),
        ),
        (_, "errorinvaliduser" | "resourcenotfound" | "mailboxnotfound") => verdict(
            "graph-mailbox-unknown",
            Level::MailboxHeld(HoldReason::NotExchangeOnline),
            Who::Operator,
            format!("Microsoft Graph does not know the mailbox {mailbox} ({said})."),
            "A CRM operator must check the mailbox address on the server page (it must be the mailbox's primary address in Exchange Online).",
            HoldReason::NotExchangeOnline.probe_after(),
        ),
        (400, "errorinvalidrecipients") => verdict(
            "graph-invalid-recipients",
            Level::MailFails,
            Who::Author,
            format!("Exchange refused the recipients of this mail ({said})."),
            "Check the addresses and send it again.",
            None,
        ),
        (401, _) => verdict(
            "graph-token-refused",
            Level::MailboxHeld(HoldReason::TokenRefused),
            Who::MailboxOwner,
            format!(
                "Microsoft Graph refuses the mailbox's access token even just after it was renewed ({said})."
            ),
            "Connect the mail server again so that the Graph permissions (Mail.Send) are granted; for an app-only server, an administrator must grant the app Mail.Send as an application permission with admin consent.",
            HoldReason::TokenRefused.probe_after(),
        ),
        (403, "errorsendasdenied") if !from.eq_ignore_ascii_case(mailbox) => verdict(
            "graph-send-as-denied",
            Level::MailFails,
            Who::ExchangeAdmin,
            format!("Exchange does not let {mailbox} send as {from} ({said})."),
            "An Exchange administrator must grant the mailbox Send As on that address, or an operator must set the server to send as the mailbox.",
            None,
        ),
        (403, _) => verdict(
            "graph-access-denied",
            Level::MailboxHeld(HoldReason::GraphAccessDenied),
            Who::ExchangeAdmin,
            format!("Microsoft Graph denies sending from {mailbox} ({said})."),
            "An administrator must grant the app Mail.Send (and Mail.Send.Shared for a shared mailbox) with admin consent, and check that no application access policy excludes this mailbox; then click Retry now on the server page.",
            HoldReason::GraphAccessDenied.probe_after(),
        ),
        (413, _) | (_, "errormessagesizeexceeded") => verdict(
            "graph-too-large",
            Level::MailFails,
            Who::Author,
            format!("Exchange refused this mail as too large ({said})."),
            "Send smaller files, or fewer of them in one mail.",
            None,
        ),
        (429, _) => verdict(
            "graph-throttled",
            Level::MailboxThrottled,
            Who::Nobody,
            format!("Microsoft Graph asked to slow down ({said})."),
            "The mailbox's mail waits and goes out by itself.",
            Some(Duration::seconds(
                reply.retry_after_secs.unwrap_or(60).clamp(1, 3600),
            )),
        ),
        (_, "errorquotaexceeded") | (507, _) => verdict(
            "graph-mailbox-full",
            Level::MailboxHeld(HoldReason::MailboxFull),
            Who::MailboxOwner,
            format!("The mailbox {mailbox} is full: Exchange cannot save the sent mail ({said})."),
            "Empty the mailbox's Sent Items or Deleted Items, or ask an Exchange administrator to raise its quota; the waiting mail is tried again within the hour.",
            HoldReason::MailboxFull.probe_after(),
        ),
        (500..=599, _) => verdict(
            "graph-transient",
            Level::MailRetries,
            Who::Nobody,
            format!("Microsoft Graph could not take the mail just now ({said})."),
            "It is sent again later.",
            None,
        ),
        _ => verdict(
            "graph-refused",
            Level::MailFails,
            Who::Operator,
            format!("Microsoft Graph refused this mail ({said})."),
            "A CRM operator should look at the reply; the mail can be retried from the outbox.",
            None,
        ),
    }
}

/// The verdict when Graph could not be reached: nothing was sent.
pub fn unreachable(detail: &str) -> Verdict {
    verdict(
        "graph-unreachable",
        Level::MailRetries,
        Who::Nobody,
        format!("Microsoft Graph could not be reached ({detail})."),
        "It is sent again later.",
        None,
    )
}

/// The verdict when the mail was sent but no answer came (a timeout, a dropped connection):
/// Graph may have taken it, so it is looked for in Sent Items before it is sent again.
pub fn unknown(detail: &str) -> Verdict {
    verdict(
        "graph-no-answer",
        Level::MailRetries,
        Who::Nobody,
        format!("Microsoft Graph gave no answer after the mail was sent ({detail})."),
        "Before sending it again the module looks for it in the mailbox's Sent Items, so it is not sent twice.",
        None,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(status: u16, code: &str) -> GraphReply {
        GraphReply {
            status,
            code: code.into(),
            message: "m".into(),
            retry_after_secs: Some(7),
        }
    }

    #[test]
    fn each_answer_lands_at_its_level() {
        let m = "sales@contoso.example";
        let level = |status, code, from| classify(&reply(status, code), m, from).level;
        assert_eq!(level(400, "ErrorInvalidRecipients", m), Level::MailFails);
        assert_eq!(
            level(403, "ErrorAccessDenied", m),
            Level::MailboxHeld(HoldReason::GraphAccessDenied)
        );
        assert_eq!(
            level(403, "ErrorSendAsDenied", "alice@contoso.example"),
            Level::MailFails
        );
        assert_eq!(
            level(404, "MailboxNotEnabledForRESTAPI", m),
            Level::MailboxHeld(HoldReason::NotExchangeOnline)
        );
        assert_eq!(
            level(401, "MailboxNotEnabledForRESTAPI", m),
            Level::MailboxHeld(HoldReason::NotExchangeOnline)
        );
        assert_eq!(level(413, "ErrorMessageSizeExceeded", m), Level::MailFails);
        assert_eq!(
            level(429, "ApplicationThrottled", m),
            Level::MailboxThrottled
        );
        assert_eq!(
            classify(&reply(429, "ApplicationThrottled"), m, m).hold_for,
            Some(Duration::seconds(7))
        );
        assert_eq!(
            level(507, "ErrorQuotaExceeded", m),
            Level::MailboxHeld(HoldReason::MailboxFull)
        );
        assert_eq!(level(503, "serviceNotAvailable", m), Level::MailRetries);
        assert_eq!(level(504, "UnknownError", m), Level::MailRetries);
        assert_eq!(
            level(404, "ErrorInvalidUser", m),
            Level::MailboxHeld(HoldReason::NotExchangeOnline)
        );
        assert!(reply(401, "InvalidAuthenticationToken").refused_token());
        assert!(!reply(401, "MailboxNotEnabledForRESTAPI").refused_token());
    }
}
