//! The classification table: every outcome of a delivery attempt — an SMTP reply (code, enhanced
//! status, known text) at a stage of the dialogue, a network failure, a token-endpoint answer —
//! mapped to exactly one level where it is handled, with the words shown to people.
//!
//! README › "What each failure does" mirrors [`SMTP_RULES`] and [`token`]; a unit test checks
//! that every rule id appears there. Sources: MICROSOFT.md (Exchange Online replies, AADSTS
//! codes), RFC 5321 (reply classes), RFC 4954 (AUTH).

use chrono::Duration;

use crate::connect::aad::{AadFailure, FailureClass, explain};

/// Where a failure is handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// This mail fails for good; the reason is kept on it.
    MailFails,
    /// This mail is tried again later (spends an attempt).
    MailRetries,
    /// The mailbox is held: none of its mails is claimed until the cause is fixed; they spend
    /// no attempt and never fail by attempts.
    MailboxHeld(HoldReason),
    /// The mailbox is throttled for [`Verdict::hold_for`]; its mails wait without spending
    /// attempts.
    MailboxThrottled,
}

/// Why a mailbox is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldReason {
    /// The refresh token is dead (revoked, expired, consent withdrawn): reconnect needed.
    GrantDead,
    /// SMTP refuses a freshly issued token, or the XOAUTH2 data, or AUTH with another 5xx.
    TokenRefused,
    /// `535 5.7.139`: SMTP AUTH is disabled for the tenant or the mailbox.
    SmtpAuthDisabled,
    /// The server offers no XOAUTH2, or says the client is not authenticated (`530 5.7.57`).
    NoUsableAuth,
    /// The SMTP connection is refused: by the server (5xx to the greeting, EHLO or STARTTLS), or
    /// by the CRM (the server's TLS certificate is not accepted).
    ServerRefused,
    /// Exchange refuses the TLS version (`421 4.7.66`).
    TlsRefused,
    /// The client ID or secret is invalid or expired (AADSTS7000215, 7000222, 700016, ...).
    ClientCredentials,
    /// A scope of one cloud was sent to another cloud's tenant (AADSTS500011).
    WrongCloud,
    /// The token endpoint answered something that is not OAuth (a proxy's page, empty body).
    TokenEndpointNotOAuth,
    /// Exchange's sending quota is exceeded until a time.
    QuotaExceeded,
    /// The tenant is blocked for sending (`550 5.7.708`).
    TenantBlocked,
    /// Microsoft Graph denies sending from the mailbox (`403 ErrorAccessDenied`: consent or an
    /// application access policy).
    GraphAccessDenied,
    /// The mailbox is not an Exchange Online mailbox (`MailboxNotEnabledForRESTAPI`).
    NotExchangeOnline,
    /// The mailbox is full (`ErrorQuotaExceeded`): Exchange cannot save the sent mail.
    MailboxFull,
    /// Nothing reached Microsoft: the mail server or Microsoft Graph could not be connected to
    /// (refused, timed out, no address, TLS broken before any reply), or the token endpoint was
    /// away (5xx, 429, a timeout, `temporarily_unavailable`). It ends by itself when a probe
    /// gets through; operators are told only when it lasts ([`UNREACHABLE_TELL_AFTER`]).
    Unreachable,
}

/// How long a mailbox stays unreachable before its operators are told (a short outage of the
/// network or of Microsoft passes unnoticed but for the waiting mail's words).
pub const UNREACHABLE_TELL_AFTER: Duration = Duration::minutes(15);

/// The longest wait between two probes of an unreachable mailbox.
pub const UNREACHABLE_PROBE_MAX: Duration = Duration::minutes(15);

impl HoldReason {
    /// Every reason, for parsing and documentation.
    pub const ALL: [HoldReason; 15] = [
        HoldReason::GrantDead,
        HoldReason::TokenRefused,
        HoldReason::SmtpAuthDisabled,
        HoldReason::NoUsableAuth,
        HoldReason::ServerRefused,
        HoldReason::TlsRefused,
        HoldReason::ClientCredentials,
        HoldReason::WrongCloud,
        HoldReason::TokenEndpointNotOAuth,
        HoldReason::QuotaExceeded,
        HoldReason::TenantBlocked,
        HoldReason::GraphAccessDenied,
        HoldReason::NotExchangeOnline,
        HoldReason::MailboxFull,
        HoldReason::Unreachable,
    ];

    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            HoldReason::GrantDead => "grant_dead",
            HoldReason::TokenRefused => "token_refused",
            HoldReason::SmtpAuthDisabled => "smtp_auth_disabled",
            HoldReason::NoUsableAuth => "no_usable_auth",
            HoldReason::ServerRefused => "server_refused",
            HoldReason::TlsRefused => "tls_refused",
            HoldReason::ClientCredentials => "client_credentials",
            HoldReason::WrongCloud => "wrong_cloud",
            HoldReason::TokenEndpointNotOAuth => "token_endpoint_not_oauth",
            HoldReason::QuotaExceeded => "quota_exceeded",
            HoldReason::TenantBlocked => "tenant_blocked",
            HoldReason::GraphAccessDenied => "graph_access_denied",
            HoldReason::NotExchangeOnline => "not_exchange_online",
            HoldReason::MailboxFull => "mailbox_full",
            HoldReason::Unreachable => "unreachable",
        }
    }

    /// The reason stored as `name`.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == name)
    }

    /// A short title for badges and lists.
    pub fn title(self) -> &'static str {
        match self {
            HoldReason::GrantDead => "Reconnect needed",
            HoldReason::TokenRefused => "SMTP refuses the token",
            HoldReason::SmtpAuthDisabled => "SMTP AUTH disabled",
            HoldReason::NoUsableAuth => "No usable AUTH",
            HoldReason::ServerRefused => "SMTP connection refused",
            HoldReason::TlsRefused => "TLS refused",
            HoldReason::ClientCredentials => "App credentials or settings refused",
            HoldReason::WrongCloud => "Wrong cloud",
            HoldReason::TokenEndpointNotOAuth => "Token endpoint unreachable",
            HoldReason::QuotaExceeded => "Sending quota exceeded",
            HoldReason::TenantBlocked => "Tenant blocked",
            HoldReason::GraphAccessDenied => "Graph permission missing",
            HoldReason::NotExchangeOnline => "Not an Exchange Online mailbox",
            HoldReason::MailboxFull => "Mailbox full",
            HoldReason::Unreachable => "Microsoft cannot be reached",
        }
    }

    /// What holds the mailbox, in plain words for someone who does not run the CRM (after
    /// "the mailbox waits because …").
    pub fn in_words(self) -> &'static str {
        match self {
            HoldReason::GrantDead => "its sign-in at Microsoft has ended",
            HoldReason::TokenRefused => "Exchange does not accept the CRM's sign-in for it",
            HoldReason::SmtpAuthDisabled => "Exchange does not let the CRM send by SMTP for it",
            HoldReason::NoUsableAuth => "its mail server offers no sign-in the CRM can use",
            HoldReason::ServerRefused => "its mail server could not be reached",
            HoldReason::TlsRefused => "its mail server's secure connection failed",
            HoldReason::ClientCredentials => "Microsoft refuses the CRM's own settings",
            HoldReason::WrongCloud => "the CRM is set up for another Microsoft cloud",
            HoldReason::TokenEndpointNotOAuth => "Microsoft's sign-in service cannot be reached",
            HoldReason::QuotaExceeded => "Exchange's daily sending limit was reached",
            HoldReason::TenantBlocked => "Microsoft has blocked the organisation's outgoing mail",
            HoldReason::GraphAccessDenied => "Microsoft Graph does not let the CRM send for it",
            HoldReason::NotExchangeOnline => "it is not an Exchange Online mailbox",
            HoldReason::MailboxFull => "the mailbox is full",
            HoldReason::Unreachable => "the CRM cannot reach Microsoft's servers at the moment",
        }
    }

    /// Whether an operator (not the mailbox's owner) must act on a shared mailbox. A quota
    /// ends by itself.
    pub fn needs_operator(self) -> bool {
        self.needs_operator_for(false)
    }

    /// Whether the mailbox's owner, not an operator, must act on a personal mailbox (`personal`):
    /// its connection and its room; and its connection settings (host, port, security, extra
    /// CA certificate), which are on the owner's page (My mailbox), when the server refuses
    /// the connection, the CRM refuses its certificate, or it offers no usable AUTH.
    pub fn owner_fixes(self, personal: bool) -> bool {
        match self {
            HoldReason::GrantDead | HoldReason::MailboxFull => true,
            HoldReason::ServerRefused | HoldReason::NoUsableAuth => personal,
            _ => false,
        }
    }

    /// Whether ending the hold by hand ("Release held mail" in the outbox and on a server's
    /// page) can help: not for a mailbox whose sign-in is gone or was never given, which only
    /// a new Connect ends.
    pub fn release_can_help(self) -> bool {
        self != HoldReason::GrantDead
    }

    /// Whether an operator must act on a mailbox (`personal`: a user's own one).
    pub fn needs_operator_for(self, personal: bool) -> bool {
        self != HoldReason::QuotaExceeded && !self.owner_fixes(personal)
    }

    /// After how long a held mailbox is tried again by itself (one mail is the probe: if it
    /// goes out, the hold ends). `None`: only the fix ends it (reconnect, settings saved) or an
    /// operator's "retry now".
    pub fn probe_after(self) -> Option<Duration> {
        match self {
            HoldReason::GrantDead | HoldReason::ClientCredentials | HoldReason::WrongCloud => None,
            HoldReason::TokenEndpointNotOAuth => Some(Duration::minutes(5)),
            HoldReason::TokenRefused
            | HoldReason::SmtpAuthDisabled
            | HoldReason::NoUsableAuth
            | HoldReason::ServerRefused => Some(Duration::minutes(15)),
            HoldReason::TlsRefused | HoldReason::TenantBlocked => Some(Duration::hours(1)),
            HoldReason::GraphAccessDenied | HoldReason::NotExchangeOnline => {
                Some(Duration::minutes(15))
            }
            HoldReason::MailboxFull => Some(Duration::hours(1)),
            // Paced by the hold itself ([`crate::delivery::hold::hold`]): the retry base at
            // first, then as long as it has lasted, at most [`UNREACHABLE_PROBE_MAX`]; a
            // verdict's own time (a `Retry-After`) is the least wait.
            HoldReason::Unreachable => Some(Duration::zero()),
            // The quota window: 24 hours from the first refusal unless the server said otherwise.
            HoldReason::QuotaExceeded => Some(Duration::hours(24)),
        }
    }

    /// Whether a hold for this reason ends when the module's settings are saved.
    pub fn ends_on_settings_saved(self) -> bool {
        matches!(
            self,
            HoldReason::ClientCredentials
                | HoldReason::WrongCloud
                | HoldReason::TokenEndpointNotOAuth
        )
    }
}

/// Who must act.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Who {
    /// Nobody: the module retries.
    Nobody,
    /// The person who wrote the mail.
    Author,
    /// The mailbox's owner (a personal mailbox) or an operator (a shared one).
    MailboxOwner,
    /// A CRM operator.
    Operator,
    /// An Exchange / Microsoft 365 administrator.
    ExchangeAdmin,
}

impl Who {
    /// In words.
    pub fn words(self) -> &'static str {
        match self {
            Who::Nobody => "nobody (the module retries)",
            Who::Author => "the author",
            Who::MailboxOwner => "the mailbox's owner",
            Who::Operator => "a CRM operator",
            Who::ExchangeAdmin => "an Exchange administrator",
        }
    }
}

/// The decision for one outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// The rule that decided (its id, as in README).
    pub rule: &'static str,
    /// Where it is handled.
    pub level: Level,
    /// Who must act.
    pub who: Who,
    /// What happened, in words.
    pub what: String,
    /// What to do.
    pub fix: String,
    /// For a throttle or a hold: how long before the mailbox is tried again by itself.
    pub hold_for: Option<Duration>,
}

impl Verdict {
    /// What happened and what to do, in one text.
    pub fn words(&self) -> String {
        format!("{} {}", self.what, self.fix)
    }

    /// What happened, without Microsoft's own words quoted after [`MICROSOFT_SAID`] (its
    /// error description: trace and correlation IDs, steps for administrators), for people
    /// who are only told that their mail waits.
    pub fn what_in_brief(&self) -> &str {
        self.what.split(MICROSOFT_SAID).next().unwrap_or(&self.what)
    }
}

/// Where a verdict's `what` quotes Microsoft's own error description (token requests).
pub const MICROSOFT_SAID: &str = " Microsoft said: ";

/// The stage of the SMTP dialogue a reply answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Connecting, the greeting, EHLO, STARTTLS.
    Connect,
    /// AUTH XOAUTH2.
    Auth,
    /// MAIL FROM, RCPT TO, DATA and the end of the content.
    Transaction,
}

/// What was observed in an attempt, for [`smtp`].
#[derive(Debug, Clone, Copy)]
pub enum Observed<'a> {
    /// A reply, as on the wire (`554 5.2.0 STOREDRV...`).
    Reply {
        /// At which stage.
        stage: Stage,
        /// The three-digit code.
        code: u16,
        /// The whole reply text, code included.
        text: &'a str,
    },
    /// The line dropped, a timeout, a TLS failure: no reply.
    Network {
        /// At which stage.
        stage: Stage,
        /// What failed.
        detail: &'a str,
    },
    /// The server's EHLO offers no XOAUTH2.
    NoXoauth2,
    /// The mail has an address with letters outside ASCII before the @ and the server offers
    /// no SMTPUTF8 (RFC 6531): nothing was sent.
    NeedsSmtpUtf8 {
        /// Which addresses.
        detail: &'a str,
    },
}

/// The facts the words name.
#[derive(Debug, Clone, Copy, Default)]
pub struct Facts<'a> {
    /// The server's mailbox address.
    pub mailbox: &'a str,
    /// The envelope sender of the mail.
    pub from: &'a str,
    /// The `user=` that authenticated (or was tried).
    pub auth_user: &'a str,
}

/// How one rule matches an SMTP reply.
#[derive(Debug, Clone, Copy)]
pub struct Match {
    /// Only at this stage (`None`: any).
    pub stage: Option<Stage>,
    /// Reply codes from..=to (`None`: any).
    pub codes: Option<(u16, u16)>,
    /// The reply contains one of these (empty: anything).
    pub contains: &'static [&'static str],
    /// Only when the envelope sender is (true) or is not (false) the mailbox itself.
    pub from_is_mailbox: Option<bool>,
}

/// One row of the table.
#[derive(Debug, Clone, Copy)]
pub struct Rule {
    /// Its id (README names it).
    pub id: &'static str,
    /// When it applies.
    pub when: Match,
    /// Where the failure is handled.
    pub level: Level,
    /// For throttles: how long the mailbox waits.
    pub hold_for_secs: Option<i64>,
    /// Who must act.
    pub who: Who,
    /// What happened; `{mailbox}`, `{from}`, `{user}` and `{reply}` are filled in (and in
    /// `fix`, `{what_to_check}`: what the author of a refused mail should look at).
    pub what: &'static str,
    /// What to do.
    pub fix: &'static str,
}

const ANY: Match = Match {
    stage: None,
    codes: None,
    contains: &[],
    from_is_mailbox: None,
};

/// The SMTP rules, first match wins.
pub const SMTP_RULES: &[Rule] = &[
    Rule {
        id: "smtp-auth-disabled",
        when: Match {
            contains: &["5.7.139"],
            ..ANY
        },
        level: Level::MailboxHeld(HoldReason::SmtpAuthDisabled),
        hold_for_secs: None,
        who: Who::ExchangeAdmin,
        what: "Exchange refuses SMTP AUTH for {mailbox}: authenticated SMTP is disabled for the tenant or for the mailbox (535 5.7.139).",
        fix: "An Exchange administrator must enable Authenticated SMTP for {mailbox} (Microsoft 365 admin center › Users › the mailbox › Mail › Manage email apps, or Set-CASMailbox -SmtpClientAuthenticationDisabled $false), or switch this server to the Microsoft Graph transport. Reconnecting does not help. The mails wait and are tried again every 15 minutes.",
    },
    Rule {
        id: "quota-exceeded",
        when: Match {
            contains: &[
                "SubmissionQuotaExceeded",
                "MessageSubmissionExceeded",
                "RecipientRateLimitExceeded",
            ],
            ..ANY
        },
        level: Level::MailboxHeld(HoldReason::QuotaExceeded),
        hold_for_secs: None,
        who: Who::Operator,
        what: "Exchange stopped accepting mail from {mailbox}: its sending quota is exceeded (Exchange Online allows 10,000 recipients a day per mailbox, and 30 messages a minute).",
        fix: "Nothing is lost: the mails wait and go out by themselves when the 24-hour window has passed. If this repeats, spread the sending over several mailboxes or send fewer recipients per day.",
    },
    Rule {
        id: "tenant-blocked",
        when: Match {
            contains: &["5.7.708"],
            ..ANY
        },
        level: Level::MailboxHeld(HoldReason::TenantBlocked),
        hold_for_secs: None,
        who: Who::ExchangeAdmin,
        what: "Microsoft has blocked the tenant of {mailbox} from sending (550 5.7.708).",
        fix: "A Microsoft 365 administrator must open a support request with Microsoft to lift the block. The mails wait and are tried again every hour.",
    },
    Rule {
        id: "tls-refused",
        when: Match {
            contains: &["4.7.66"],
            ..ANY
        },
        level: Level::MailboxHeld(HoldReason::TlsRefused),
        hold_for_secs: None,
        who: Who::Operator,
        what: "Exchange refused the TLS version of the connection (421 4.7.66: TLS 1.0 and 1.1 are not accepted).",
        fix: "A CRM operator must make sure the server uses TLS 1.2 or later (security STARTTLS on port 587). The mails wait and are tried again every hour.",
    },
    Rule {
        id: "xoauth2-data-invalid",
        when: Match {
            contains: &["5.5.124"],
            ..ANY
        },
        level: Level::MailboxHeld(HoldReason::TokenRefused),
        hold_for_secs: None,
        who: Who::Operator,
        what: "Exchange refused the XOAUTH2 data for {mailbox} as {user} (501 5.5.124 Invalid XOAUTH2 auth data).",
        fix: "A CRM operator must check the server's mailbox address and that the connected account may send from it. The mails wait.",
    },
    Rule {
        id: "not-authenticated",
        when: Match {
            contains: &["5.7.57"],
            ..ANY
        },
        level: Level::MailboxHeld(HoldReason::NoUsableAuth),
        hold_for_secs: None,
        who: Who::Operator,
        what: "The SMTP server says the CRM is not authenticated (530 5.7.57), usually because the connection is not encrypted so AUTH was not offered.",
        fix: "A CRM operator must set the server's security to STARTTLS on port 587 (smtp.office365.com). The mails wait.",
    },
    Rule {
        id: "send-as-denied-mailbox",
        when: Match {
            contains: &["5.7.60", "SendAsDenied"],
            from_is_mailbox: Some(true),
            ..ANY
        },
        level: Level::MailFails,
        hold_for_secs: None,
        who: Who::ExchangeAdmin,
        what: "Exchange refused to let the signed-in account {user} send as the mailbox {mailbox}.",
        fix: "An Exchange administrator must grant {user} Send As (or Full Access) on {mailbox}, or the server must be connected by signing in as {mailbox} itself; then send the mail again.",
    },
    Rule {
        id: "send-as-denied",
        when: Match {
            contains: &["5.7.60", "SendAsDenied"],
            ..ANY
        },
        level: Level::MailFails,
        hold_for_secs: None,
        who: Who::ExchangeAdmin,
        what: "Exchange refused to send as {from}: the mailbox {mailbox} has no Send As permission for that address.",
        fix: "An Exchange administrator must grant {mailbox} Send As on {from} (Microsoft 365 admin center › Users › {from} › Mailbox permissions › Send as), then send the mail again.",
    },
    Rule {
        id: "rate-throttled",
        when: Match {
            codes: Some((421, 421)),
            contains: &["4.7."],
            ..ANY
        },
        level: Level::MailboxThrottled,
        hold_for_secs: Some(60),
        who: Who::Nobody,
        what: "Exchange is throttling {mailbox} ({reply}).",
        fix: "Nothing to do: its mails wait a minute, then go on.",
    },
    Rule {
        id: "auth-refused",
        when: Match {
            stage: Some(Stage::Auth),
            codes: Some((535, 535)),
            ..ANY
        },
        level: Level::MailboxHeld(HoldReason::TokenRefused),
        hold_for_secs: None,
        who: Who::Operator,
        what: "The SMTP server refused a freshly issued token for {mailbox} (signing in as {user}; {reply}).",
        fix: "Reconnecting does not help while this holds. An administrator must check that the connected account is licensed for Exchange Online, may send from {mailbox} (Full Access or Send As), and that SMTP AUTH is enabled for the mailbox. The mails wait and are tried again every 15 minutes.",
    },
    Rule {
        id: "auth-temporary",
        when: Match {
            stage: Some(Stage::Auth),
            codes: Some((400, 499)),
            ..ANY
        },
        level: Level::MailRetries,
        hold_for_secs: None,
        who: Who::Nobody,
        what: "The SMTP server could not authenticate right now ({reply}).",
        fix: "Nothing to do: the mail is tried again later.",
    },
    Rule {
        id: "auth-other",
        when: Match {
            stage: Some(Stage::Auth),
            codes: Some((500, 599)),
            ..ANY
        },
        level: Level::MailboxHeld(HoldReason::TokenRefused),
        hold_for_secs: None,
        who: Who::Operator,
        what: "The SMTP server refused authentication for {mailbox} ({reply}).",
        fix: "A CRM operator must check the server's settings and the mailbox's permissions. The mails wait.",
    },
    Rule {
        id: "connection-refused",
        when: Match {
            stage: Some(Stage::Connect),
            codes: Some((500, 599)),
            ..ANY
        },
        level: Level::MailboxHeld(HoldReason::ServerRefused),
        hold_for_secs: None,
        who: Who::Operator,
        what: "The SMTP server refuses the CRM's connection ({reply}).",
        fix: "A CRM operator must check the server's host, port and security. The mails wait and are tried again every 15 minutes.",
    },
    Rule {
        id: "temporary",
        when: Match {
            codes: Some((400, 499)),
            ..ANY
        },
        level: Level::MailRetries,
        hold_for_secs: None,
        who: Who::Nobody,
        what: "The SMTP server answered with a temporary failure ({reply}).",
        fix: "Nothing to do: the mail is tried again later.",
    },
    Rule {
        id: "mail-refused",
        when: Match {
            codes: Some((500, 599)),
            ..ANY
        },
        level: Level::MailFails,
        hold_for_secs: None,
        who: Who::Author,
        what: "The SMTP server refused this mail ({reply}).",
        fix: "Check {what_to_check}, then send it again.",
    },
];

/// What an unreachable mailbox's people read: that its mails wait, and (a sentence for
/// operators, beginning [`IF_IT_LASTS`]) what to check if it lasts.
pub const UNREACHABLE_FIX: &str = "The mails wait, spending no attempt, and are tried again by themselves, less often the longer it lasts (at most every 15 minutes); they go out in queue order once it answers. If it lasts, check this CRM's connection to Microsoft (DNS, firewall, proxy) and the Microsoft 365 service health page.";

/// [`UNREACHABLE_FIX`] for an SMTP server: its host, port and security are checked too.
const SMTP_UNREACHABLE_FIX: &str = "The mails wait, spending no attempt, and are tried again by themselves, less often the longer it lasts (at most every 15 minutes); they go out in queue order once it answers. If it lasts, check the server's host, port and security on its page (Exchange Online: smtp.office365.com, port 587, STARTTLS), this CRM's connection to Microsoft (DNS, firewall, proxy) and the Microsoft 365 service health page.";

/// How the operators' sentence of an unreachable mailbox's words begins (a user is told
/// instead that the operators are told if it lasts).
pub const IF_IT_LASTS: &str = "If it lasts, check";

/// A connection that failed before the server said anything (refused, timed out, no address,
/// a TLS failure other than the certificate): every mail of the mailbox would meet it, so the
/// mailbox waits and one mail probes it again.
const UNREACHABLE_RULE: Rule = Rule {
    id: "unreachable",
    when: ANY,
    level: Level::MailboxHeld(HoldReason::Unreachable),
    hold_for_secs: None,
    who: Who::Operator,
    what: "The SMTP server could not be reached ({reply}).",
    fix: SMTP_UNREACHABLE_FIX,
};

/// The rule for the outcomes the table's replies do not cover.
const NETWORK_RULE: Rule = Rule {
    id: "network",
    when: ANY,
    level: Level::MailRetries,
    hold_for_secs: None,
    who: Who::Nobody,
    what: "The connection to the SMTP server failed ({reply}).",
    fix: "Nothing to do: the mail is tried again later.",
};

const NO_XOAUTH2_RULE: Rule = Rule {
    id: "no-xoauth2",
    when: ANY,
    level: Level::MailboxHeld(HoldReason::NoUsableAuth),
    hold_for_secs: None,
    who: Who::Operator,
    what: "The SMTP server does not offer AUTH XOAUTH2 on this connection, so no token can be presented.",
    fix: "A CRM operator must point the server at an Office 365 submission host (smtp.office365.com, port 587, STARTTLS). The mails wait.",
};

/// A TLS certificate the client does not accept: wrong host name, unknown issuer, expired.
/// Every mail of the mailbox would meet it, so the mailbox waits rather than each mail
/// spending its attempts; a probe tries again, and a passed test ends the hold.
const CERTIFICATE_RULE: Rule = Rule {
    id: "certificate-refused",
    when: ANY,
    level: Level::MailboxHeld(HoldReason::ServerRefused),
    hold_for_secs: None,
    who: Who::MailboxOwner,
    what: "The SMTP server's TLS certificate was not accepted ({reply}).",
    fix: "On the server's page, check that its host name is the one its certificate names (smtp.office365.com for Exchange Online), or add the certificate authority that signed it as its extra CA certificate. The mails wait and are tried again every 15 minutes.",
};

/// Whether a connection failure is the client refusing the server's certificate (rustls'
/// words, as lettre passes them on: `invalid peer certificate: UnknownIssuer`).
fn certificate_refused(detail: &str) -> bool {
    detail.contains("invalid peer certificate")
}

const NEEDS_SMTPUTF8_RULE: Rule = Rule {
    id: "needs-smtputf8",
    when: ANY,
    level: Level::MailFails,
    hold_for_secs: None,
    who: Who::Author,
    what: "This mail was not sent: {reply}. An address with letters outside ASCII before the @ can go only through a server that offers SMTPUTF8.",
    fix: "Write the address in plain ASCII letters (ask the recipient for one), then send the mail again.",
};

/// The ids of every rule, for README's mirror (and its test).
pub fn rule_ids() -> Vec<&'static str> {
    let mut ids: Vec<&'static str> = SMTP_RULES.iter().map(|r| r.id).collect();
    ids.extend([
        NETWORK_RULE.id,
        UNREACHABLE_RULE.id,
        CERTIFICATE_RULE.id,
        NO_XOAUTH2_RULE.id,
        NEEDS_SMTPUTF8_RULE.id,
    ]);
    ids.extend(TOKEN_RULE_IDS);
    ids
}

fn matches(m: &Match, stage: Stage, code: u16, text: &str, facts: &Facts<'_>) -> bool {
    m.stage.is_none_or(|s| s == stage)
        && m.codes.is_none_or(|(lo, hi)| (lo..=hi).contains(&code))
        && (m.contains.is_empty() || m.contains.iter().any(|c| text.contains(c)))
        && m.from_is_mailbox
            .is_none_or(|want| facts.from.eq_ignore_ascii_case(facts.mailbox) == want)
}

fn fill(template: &str, facts: &Facts<'_>, reply: &str) -> String {
    template
        .replace("{mailbox}", facts.mailbox)
        .replace("{from}", facts.from)
        .replace("{user}", facts.auth_user)
        .replace("{reply}", reply)
        .replace("{what_to_check}", what_to_check(reply))
}

/// What the author of a refused mail should look at, by the reply's enhanced status code
/// (RFC 3463: `5.1.x` addressing, `5.2.x` the recipient's mailbox, `5.3.4` the size).
fn what_to_check(reply: &str) -> &'static str {
    let enhanced = reply.split_whitespace().nth(1).unwrap_or("");
    let mut parts = enhanced.trim_end_matches(':').split('.');
    match (parts.next(), parts.next(), parts.next()) {
        (Some("5"), Some("1"), Some("7" | "8")) => {
            "the sender's address with the CRM's operators (the receiving side refuses it)"
        }
        (Some("5"), Some("1"), Some(_)) => {
            "the recipients' addresses (a letter may be wrong, or the person may have left)"
        }
        (Some("5"), Some("2"), Some(_)) => {
            "with the recipient whether their mailbox takes mail, or write to another address"
        }
        (Some("5"), Some("3"), Some("4")) => "the size of the mail and its files",
        _ => "the recipients and the content",
    }
}

fn verdict(rule: &Rule, facts: &Facts<'_>, reply: &str) -> Verdict {
    let hold_for = match rule.level {
        Level::MailboxHeld(reason) => reason.probe_after(),
        _ => rule.hold_for_secs.map(Duration::seconds),
    };
    Verdict {
        rule: rule.id,
        level: rule.level,
        who: rule.who,
        what: fill(rule.what, facts, reply),
        fix: fill(rule.fix, facts, reply),
        hold_for,
    }
}

/// The verdict when Microsoft's token endpoint is away (`why`: a timeout, a 5xx, a 429,
/// `temporarily_unavailable`), waiting at least `retry_after_secs` when it said so: the
/// mailbox waits for it, as for a server that cannot be reached.
pub fn token_unavailable(why: &str, retry_after_secs: Option<u64>) -> Verdict {
    Verdict {
        rule: "token-endpoint-unavailable",
        level: Level::MailboxHeld(HoldReason::Unreachable),
        who: Who::Operator,
        what: format!("Microsoft's token endpoint is temporarily unavailable ({why})."),
        fix: UNREACHABLE_FIX.into(),
        hold_for: Some(Duration::seconds(
            retry_after_secs.map_or(0, |s| i64::try_from(s).unwrap_or(i64::MAX / 1000)),
        )),
    }
}

/// The verdict on an SMTP outcome.
pub fn smtp(observed: Observed<'_>, facts: &Facts<'_>) -> Verdict {
    match observed {
        Observed::Reply { stage, code, text } => {
            let rule = SMTP_RULES
                .iter()
                .find(|r| matches(&r.when, stage, code, text, facts))
                // Every 4xx and 5xx matches a rule; a 2xx/3xx where a failure was expected
                // is a broken dialogue: retried.
                .unwrap_or(&NETWORK_RULE);
            verdict(rule, facts, text)
        }
        Observed::Network { detail, .. } if certificate_refused(detail) => {
            verdict(&CERTIFICATE_RULE, facts, detail)
        }
        Observed::Network {
            stage: Stage::Connect,
            detail,
        } => verdict(&UNREACHABLE_RULE, facts, detail),
        Observed::Network { detail, .. } => verdict(&NETWORK_RULE, facts, detail),
        Observed::NoXoauth2 => verdict(&NO_XOAUTH2_RULE, facts, ""),
        Observed::NeedsSmtpUtf8 { detail } => verdict(&NEEDS_SMTPUTF8_RULE, facts, detail),
    }
}

const TOKEN_RULE_IDS: [&str; 6] = [
    "token-endpoint-unavailable",
    "token-endpoint-not-oauth",
    "wrong-cloud",
    "client-credentials",
    "grant-dead",
    "not-connected",
];

/// The verdict on a failed token request (refresh or client credentials). Only an OAuth error
/// document proves a dead grant; anything else is the path to Microsoft.
pub fn token(failure: &AadFailure, redirect_uri: &str) -> Verdict {
    let microsoft_said = match failure.code {
        Some(code) if !failure.description.is_empty() => format!(
            "{MICROSOFT_SAID}AADSTS{code} ({}): {}",
            failure.error, failure.description
        ),
        _ if !failure.description.is_empty() => {
            format!("{MICROSOFT_SAID}{}: {}", failure.error, failure.description)
        }
        _ => String::new(),
    };
    let (what, fix) = explain(&failure.error, failure.code, redirect_uri);
    let held =
        |rule: &'static str, reason: HoldReason, who: Who, what: String, fix: String| Verdict {
            rule,
            level: Level::MailboxHeld(reason),
            who,
            what,
            fix,
            hold_for: reason.probe_after(),
        };
    match failure.class {
        FailureClass::Transient => token_unavailable(&failure.description, failure.retry_after_secs),
        FailureClass::NotOAuth => held(
            "token-endpoint-not-oauth",
            HoldReason::TokenEndpointNotOAuth,
            Who::Operator,
            format!("{}, not an OAuth error.", failure.description),
            "Check the proxy or firewall between the CRM and Microsoft's sign-in service (the authority URL in Settings › Microsoft Outlook). The refresh token is kept; the mails wait and are tried again every 5 minutes.".into(),
        ),
        _ if failure.code == Some(500011) => held(
            "wrong-cloud",
            HoldReason::WrongCloud,
            Who::Operator,
            format!("{what}{microsoft_said}"),
            fix,
        ),
        FailureClass::Configuration => held(
            "client-credentials",
            HoldReason::ClientCredentials,
            Who::Operator,
            format!("{what}{microsoft_said}"),
            format!("{fix} The mails wait and go out as soon as the settings are saved."),
        ),
        FailureClass::NeedsReconnect | FailureClass::Refused => held(
            "grant-dead",
            HoldReason::GrantDead,
            Who::MailboxOwner,
            format!("{what}{microsoft_said}"),
            format!("{fix} The mails wait and go out after the mailbox is connected again."),
        ),
    }
}

/// The verdict when a mailbox has no token at all (never connected, or disconnected).
pub fn not_connected(mailbox: &str) -> Verdict {
    Verdict {
        rule: "not-connected",
        level: Level::MailboxHeld(HoldReason::GrantDead),
        who: Who::MailboxOwner,
        what: format!("The mailbox {mailbox} is not connected."),
        fix: format!(
            "Click Connect and sign in at Microsoft as {mailbox}; the mails wait and go out once it is connected."
        ),
        hold_for: None,
    }
}

#[cfg(test)]
mod tests;
