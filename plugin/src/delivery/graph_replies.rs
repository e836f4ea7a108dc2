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

/// Which answers a [`GraphRule`] covers: any of these.
enum When {
    /// An HTTP status in this range (inclusive).
    Status(u16, u16),
    /// A Graph error code (compared in lower case), whatever the status.
    Code(&'static str),
    /// A Graph error code with this status.
    StatusCode(u16, &'static str),
}

/// One row of the table of Graph's answers.
struct GraphRule {
    id: &'static str,
    when: &'static [When],
    /// Only when the envelope sender is not the mailbox itself.
    other_sender: bool,
    level: Level,
    who: Who,
    /// What happened, with `{mailbox}`, `{from}` and `{said}` (the reply as kept).
    what: &'static str,
    fix: &'static str,
}

const NOT_EXCHANGE_ONLINE: Level = Level::MailboxHeld(HoldReason::NotExchangeOnline);

/// Graph's answers to sendMail, first match wins (MICROSOFT.md › Microsoft Graph mail): the
/// rules that name an error code come before those of a status alone, so that a code keeps its
/// meaning whatever status it comes with.
const GRAPH_RULES: &[GraphRule] = &[
    GraphRule {
        id: "graph-mailbox-not-enabled",
        when: &[When::Code("mailboxnotenabledforrestapi")],
        other_sender: false,
        level: NOT_EXCHANGE_ONLINE,
        who: Who::ExchangeAdmin,
        what: "Microsoft Graph cannot send from {mailbox}: it is not an Exchange Online mailbox (on-premises, unlicensed or inactive) ({said}).",
        fix: "An Exchange administrator must give the mailbox an Exchange Online licence, or an operator must send this server's mail over SMTP.",
    },
    GraphRule {
        id: "graph-mailbox-unknown",
        when: &[
            When::Code("errorinvaliduser"),
            When::Code("resourcenotfound"),
            When::Code("mailboxnotfound"),
        ],
        other_sender: false,
        level: NOT_EXCHANGE_ONLINE,
        who: Who::Operator,
        what: "Microsoft Graph does not know the mailbox {mailbox} ({said}).",
        fix: "A CRM operator must check the mailbox address on the server page (it must be the mailbox's primary address in Exchange Online).",
    },
    GraphRule {
        id: "graph-invalid-recipients",
        when: &[When::StatusCode(400, "errorinvalidrecipients")],
        other_sender: false,
        level: Level::MailFails,
        who: Who::Author,
        what: "Exchange refused the recipients of this mail ({said}).",
        fix: "Check the addresses and send it again.",
    },
    GraphRule {
        id: "graph-too-large",
        when: &[
            When::Status(413, 413),
            When::Code("errormessagesizeexceeded"),
        ],
        other_sender: false,
        level: Level::MailFails,
        who: Who::Author,
        what: "Exchange refused this mail as too large ({said}).",
        fix: "Send smaller files, or fewer of them in one mail.",
    },
    GraphRule {
        id: "graph-mailbox-full",
        when: &[When::Code("errorquotaexceeded"), When::Status(507, 507)],
        other_sender: false,
        level: Level::MailboxHeld(HoldReason::MailboxFull),
        who: Who::MailboxOwner,
        what: "The mailbox {mailbox} is full: Exchange cannot save the sent mail ({said}).",
        fix: "Empty the mailbox's Sent Items or Deleted Items, or ask an Exchange administrator to raise its quota; the waiting mail is tried again within the hour.",
    },
    GraphRule {
        id: "graph-token-refused",
        when: &[When::Status(401, 401)],
        other_sender: false,
        level: Level::MailboxHeld(HoldReason::TokenRefused),
        who: Who::MailboxOwner,
        what: "Microsoft Graph refuses the mailbox's access token even just after it was renewed ({said}).",
        fix: "Connect the mail server again so that the Graph permissions (Mail.Send) are granted; for an app-only server, an administrator must grant the app Mail.Send as an application permission with admin consent.",
    },
    GraphRule {
        id: "graph-send-as-denied",
        when: &[When::StatusCode(403, "errorsendasdenied")],
        other_sender: true,
        level: Level::MailFails,
        who: Who::ExchangeAdmin,
        what: "Exchange does not let {mailbox} send as {from} ({said}).",
        fix: "An Exchange administrator must grant the mailbox Send As on that address, or an operator must set the server to send as the mailbox.",
    },
    GraphRule {
        id: "graph-access-denied",
        when: &[When::Status(403, 403)],
        other_sender: false,
        level: Level::MailboxHeld(HoldReason::GraphAccessDenied),
        who: Who::ExchangeAdmin,
        what: "Microsoft Graph denies sending from {mailbox} ({said}).",
        fix: "An administrator must grant the app Mail.Send (and Mail.Send.Shared for a shared mailbox) with admin consent, and check that no application access policy excludes this mailbox. The mails wait and are tried again every 15 minutes.",
    },
    GraphRule {
        id: "graph-throttled",
        when: &[When::Status(429, 429)],
        other_sender: false,
        level: Level::MailboxThrottled,
        who: Who::Nobody,
        what: "Microsoft Graph asked to slow down ({said}).",
        fix: "The mailbox's mail waits and goes out by itself.",
    },
    GraphRule {
        id: "graph-transient",
        when: &[When::Status(500, 599)],
        other_sender: false,
        level: Level::MailRetries,
        who: Who::Nobody,
        what: "Microsoft Graph could not take the mail just now ({said}).",
        fix: "It is sent again later.",
    },
];

/// Any other answer.
const GRAPH_OTHERWISE: GraphRule = GraphRule {
    id: "graph-refused",
    when: &[],
    other_sender: false,
    level: Level::MailFails,
    who: Who::Operator,
    what: "Microsoft Graph refused this mail ({said}).",
    fix: "A CRM operator should look at the reply; the mail can be retried from the outbox.",
};

/// What Graph's `reply` to sending a mail from `mailbox` (envelope sender `from`) means: the
/// first rule of [`GRAPH_RULES`] that covers it. A hold is probed again after its reason's
/// time; a throttle lasts `Retry-After` (60 s without one, at most an hour).
pub fn classify(reply: &GraphReply, mailbox: &str, from: &str) -> Verdict {
    let code = reply.code.to_ascii_lowercase();
    let covers = |w: &When| match *w {
        When::Status(low, high) => (low..=high).contains(&reply.status),
        When::Code(c) => code == c,
        When::StatusCode(status, c) => reply.status == status && code == c,
    };
    let rule = GRAPH_RULES
        .iter()
        .find(|r| {
            r.when.iter().any(covers) && (!r.other_sender || !from.eq_ignore_ascii_case(mailbox))
        })
        .unwrap_or(&GRAPH_OTHERWISE);
    let what = rule
        .what
        .replace("{mailbox}", mailbox)
        .replace("{from}", from)
        .replace("{said}", &reply.text());
    let hold_for = match rule.level {
        Level::MailboxHeld(reason) => reason.probe_after(),
        Level::MailboxThrottled => Some(Duration::seconds(
            reply.retry_after_secs.unwrap_or(60).clamp(1, 3600),
        )),
        _ => None,
    };
    verdict(rule.id, rule.level, rule.who, what, rule.fix, hold_for)
}

/// The verdict when Graph could not be reached: nothing was sent.
pub fn unreachable(detail: &str) -> Verdict {
    verdict(
        "graph-unreachable",
        Level::MailboxHeld(HoldReason::Unreachable),
        Who::Operator,
        format!("Microsoft Graph could not be reached ({detail})."),
        crate::delivery::classify::UNREACHABLE_FIX,
        HoldReason::Unreachable.probe_after(),
    )
}

/// The verdict when a later request of a mail (a file, its upload session, the send of its
/// draft) could not connect after Graph had answered its first: nothing was sent; this mail
/// is tried again (its draft was deleted where it could be).
pub fn connection_lost(detail: &str) -> Verdict {
    verdict(
        "graph-connection-lost",
        Level::MailRetries,
        Who::Nobody,
        format!(
            "The connection to Microsoft Graph was lost while this mail was being prepared ({detail}); nothing was sent."
        ),
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
        assert_eq!(
            classify(&reply(418, "Teapot"), m, m).rule,
            "graph-refused",
            "anything else is refused, for an operator to read"
        );
        assert!(reply(401, "InvalidAuthenticationToken").refused_token());
        assert!(!reply(401, "MailboxNotEnabledForRESTAPI").refused_token());
    }

    #[test]
    fn every_rule_says_who_and_what_in_words_with_no_placeholder_left() {
        let (m, from) = ("sales@contoso.example", "alice@contoso.example");
        for rule in GRAPH_RULES {
            let status = match rule.when[0] {
                When::Status(low, _) => low,
                When::StatusCode(status, _) => status,
                When::Code(_) => 400,
            };
            let code = match rule.when[0] {
                When::Code(c) | When::StatusCode(_, c) => c,
                When::Status(..) => "",
            };
            let v = classify(&reply(status, code), m, from);
            assert_eq!(v.rule, rule.id);
            assert!(!v.what.contains('{'), "{}: {}", rule.id, v.what);
            assert!(
                v.what.contains(&format!("{status}")),
                "{}: {}",
                rule.id,
                v.what
            );
        }
        let v = classify(&reply(403, "ErrorSendAsDenied"), m, from);
        assert!(v.what.contains(m) && v.what.contains(from), "{}", v.what);
    }

    #[test]
    fn each_way_a_rule_covers_an_answer_leads_to_it() {
        let m = "sales@contoso.example";
        let rule = |status, code| classify(&reply(status, code), m, m).rule;
        // A status alone, or a code whatever the status.
        assert_eq!(rule(413, ""), "graph-too-large");
        assert_eq!(rule(400, "ErrorMessageSizeExceeded"), "graph-too-large");
        assert_eq!(rule(507, ""), "graph-mailbox-full");
        assert_eq!(rule(403, "ErrorQuotaExceeded"), "graph-mailbox-full");
        for code in ["ErrorInvalidUser", "ResourceNotFound", "MailboxNotFound"] {
            assert_eq!(rule(404, code), "graph-mailbox-unknown", "{code}");
        }
        // A code that needs its status.
        assert_eq!(rule(422, "ErrorInvalidRecipients"), "graph-refused");
        // Sending as the mailbox itself: not a Send As matter, the app's access is denied.
        assert_eq!(rule(403, "ErrorSendAsDenied"), "graph-access-denied");
        // Code rules come before status rules: a 401 for a mailbox Graph cannot serve.
        assert_eq!(
            rule(401, "MailboxNotEnabledForRESTAPI"),
            "graph-mailbox-not-enabled"
        );
        // The hold of each level, and Retry-After within an hour.
        let full = classify(&reply(507, ""), m, m);
        assert_eq!(full.hold_for, HoldReason::MailboxFull.probe_after());
        assert_eq!(full.who, Who::MailboxOwner);
        let mut slow = reply(429, "ApplicationThrottled");
        slow.retry_after_secs = Some(86_400);
        assert_eq!(
            classify(&slow, m, m).hold_for,
            Some(Duration::seconds(3600))
        );
        slow.retry_after_secs = None;
        assert_eq!(classify(&slow, m, m).hold_for, Some(Duration::seconds(60)));
        assert_eq!(classify(&reply(503, ""), m, m).hold_for, None);
    }
}
