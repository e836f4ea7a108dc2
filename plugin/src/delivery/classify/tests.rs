//! The classification table's unit tests: each rule on the replies and failures it names.

use super::*;

fn facts() -> Facts<'static> {
    Facts {
        mailbox: "sales@contoso.example",
        from: "alice@contoso.example",
        auth_user: "sales@contoso.example",
    }
}

fn reply(stage: Stage, text: &str) -> Verdict {
    let code = text[..3].parse().unwrap_or(0);
    smtp(Observed::Reply { stage, code, text }, &facts())
}

#[test]
fn a_refused_mail_asks_its_author_to_check_what_its_status_code_names() {
    for (text, check) in [
        (
            "550 5.1.10 RESOLVER.ADR.RecipientNotFound",
            "recipients' addresses",
        ),
        (
            "550 5.1.8 Access denied, bad outbound sender",
            "sender's address",
        ),
        (
            "550 5.2.1 Mailbox disabled",
            "whether their mailbox takes mail",
        ),
        (
            "552 5.3.4 Message size exceeds fixed maximum",
            "size of the mail",
        ),
        (
            "554 5.6.0 Corrupt message content",
            "recipients and the content",
        ),
        (
            "550 Requested action not taken",
            "recipients and the content",
        ),
    ] {
        let v = reply(Stage::Transaction, text);
        assert_eq!(v.level, Level::MailFails, "{text}");
        assert!(v.fix.contains(check), "{text}: {}", v.fix);
        assert!(!v.fix.contains('{'), "{text}: {}", v.fix);
    }
}

#[test]
fn mailbox_refusals_hold_the_mailbox_at_any_stage() {
    for (stage, text, reason) in [
        (
            Stage::Auth,
            "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant",
            HoldReason::SmtpAuthDisabled,
        ),
        (
            Stage::Transaction,
            "554 5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException; Failed to process message due to a permanent exception",
            HoldReason::QuotaExceeded,
        ),
        (
            Stage::Transaction,
            "554 5.2.0 STOREDRV.Submission.Exception:MessageSubmissionExceededException",
            HoldReason::QuotaExceeded,
        ),
        (
            Stage::Auth,
            "501 5.5.124 Invalid XOAUTH2 auth data",
            HoldReason::TokenRefused,
        ),
        (
            Stage::Transaction,
            "530 5.7.57 Client not authenticated to send mail",
            HoldReason::NoUsableAuth,
        ),
        (
            Stage::Transaction,
            "550 5.7.708 Service unavailable. Access denied, traffic not accepted from this IP",
            HoldReason::TenantBlocked,
        ),
        (
            Stage::Connect,
            "421 4.7.66 TLS 1.0 and 1.1 are not supported",
            HoldReason::TlsRefused,
        ),
        (
            Stage::Auth,
            "535 5.7.3 Authentication unsuccessful",
            HoldReason::TokenRefused,
        ),
        (
            Stage::Auth,
            "504 5.7.4 Unrecognized authentication type",
            HoldReason::TokenRefused,
        ),
        (
            Stage::Connect,
            "554 5.7.1 Access denied",
            HoldReason::ServerRefused,
        ),
    ] {
        let v = reply(stage, text);
        assert_eq!(v.level, Level::MailboxHeld(reason), "{text}");
    }
}

#[test]
fn message_replies_stay_with_the_message() {
    assert_eq!(
        reply(
            Stage::Transaction,
            "550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found"
        )
        .level,
        Level::MailFails
    );
    assert_eq!(
        reply(
            Stage::Transaction,
            "432 4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded"
        )
        .level,
        Level::MailRetries
    );
    assert_eq!(
        reply(Stage::Auth, "454 4.7.0 Temporary authentication failure").level,
        Level::MailRetries
    );
    let throttled = reply(Stage::Transaction, "421 4.7.0 Too many messages");
    assert_eq!(throttled.level, Level::MailboxThrottled);
    assert_eq!(throttled.hold_for, Some(Duration::seconds(60)));
    let dropped = smtp(
        Observed::Network {
            stage: Stage::Transaction,
            detail: "the line dropped",
        },
        &facts(),
    );
    assert_eq!(dropped.level, Level::MailRetries);
}

#[test]
fn a_server_that_cannot_be_reached_holds_the_mailbox_and_a_refused_certificate_too() {
    for detail in [
        "Connection error: invalid peer certificate: UnknownIssuer",
        "Connection error: invalid peer certificate: NotValidForName",
    ] {
        let v = smtp(
            Observed::Network {
                stage: Stage::Connect,
                detail,
            },
            &facts(),
        );
        assert_eq!(v.rule, "certificate-refused");
        assert_eq!(v.level, Level::MailboxHeld(HoldReason::ServerRefused));
        assert_eq!(v.who, Who::MailboxOwner);
        assert!(v.what.contains(detail), "{}", v.what);
        assert!(v.fix.contains("extra CA certificate"), "{}", v.fix);
    }
    for detail in [
        "Connection error: failed to lookup address information: Name or service not known",
        "Connection error: Connection refused (os error 111)",
        "the SMTP server did not answer in time",
    ] {
        let v = smtp(
            Observed::Network {
                stage: Stage::Connect,
                detail,
            },
            &facts(),
        );
        assert_eq!(v.rule, "unreachable", "{detail}");
        assert_eq!(
            v.level,
            Level::MailboxHeld(HoldReason::Unreachable),
            "{detail}"
        );
        assert!(v.what.contains(detail), "{}", v.what);
        assert!(v.fix.contains("spending no attempt"), "{}", v.fix);
    }
    // Once the server answered, a failure is this mail's: it retries.
    for stage in [Stage::Auth, Stage::Transaction] {
        let v = smtp(
            Observed::Network {
                stage,
                detail: "Connection reset by peer",
            },
            &facts(),
        );
        assert_eq!((v.rule, v.level), ("network", Level::MailRetries));
    }
}

#[test]
fn send_as_advice_fits_the_case() {
    let other = reply(
        Stage::Transaction,
        "554 5.2.0 STOREDRV.Submission.Exception:SendAsDeniedException",
    );
    assert_eq!(other.level, Level::MailFails);
    assert!(
        other
            .fix
            .contains("grant sales@contoso.example Send As on alice@")
    );
    let own = smtp(
        Observed::Reply {
            stage: Stage::Transaction,
            code: 550,
            text: "550 5.7.60 SMTP; Client does not have permissions to send as this sender",
        },
        &Facts {
            from: "sales@contoso.example",
            auth_user: "s.jones@contoso.example",
            ..facts()
        },
    );
    assert_eq!(own.rule, "send-as-denied-mailbox");
    // Never: "grant the mailbox Send As on itself".
    assert!(
        !own.fix
            .contains("grant sales@contoso.example Send As on sales@")
    );
    assert!(own.fix.contains("grant s.jones@contoso.example"));
}

#[test]
fn quota_holds_for_a_day() {
    let v = reply(
        Stage::Transaction,
        "554 5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException; Failed",
    );
    assert_eq!(v.hold_for, Some(Duration::hours(24)));
    assert!(v.what.contains("10,000 recipients a day"));
}

#[test]
fn only_oauth_errors_prove_a_dead_grant() {
    let failure = |class, error: &str, code| AadFailure {
        error: error.into(),
        code,
        description: "x".into(),
        class,
        retry_after_secs: None,
    };
    let uri = "https://crm.example/microsoft_outlook/confirm";
    let not_oauth = token(&failure(FailureClass::NotOAuth, "http_400", None), uri);
    assert_eq!(
        not_oauth.level,
        Level::MailboxHeld(HoldReason::TokenEndpointNotOAuth)
    );
    let dead = token(
        &failure(FailureClass::NeedsReconnect, "invalid_grant", Some(50173)),
        uri,
    );
    assert_eq!(dead.level, Level::MailboxHeld(HoldReason::GrantDead));
    assert!(dead.what.contains("AADSTS50173"));
    let secret = token(
        &failure(FailureClass::Configuration, "invalid_client", Some(7000222)),
        uri,
    );
    assert_eq!(
        secret.level,
        Level::MailboxHeld(HoldReason::ClientCredentials)
    );
    let cloud = token(
        &failure(
            FailureClass::Configuration,
            "invalid_resource",
            Some(500011),
        ),
        uri,
    );
    assert_eq!(cloud.level, Level::MailboxHeld(HoldReason::WrongCloud));
    let down = token(&failure(FailureClass::Transient, "server_error", None), uri);
    assert_eq!(down.level, Level::MailboxHeld(HoldReason::Unreachable));
    assert_eq!(down.hold_for, Some(Duration::zero()));
    let mut busy = failure(FailureClass::Transient, "temporarily_unavailable", None);
    busy.retry_after_secs = Some(120);
    assert_eq!(token(&busy, uri).hold_for, Some(Duration::seconds(120)));
}

#[test]
fn every_rule_is_documented_in_the_readme() {
    let readme = include_str!("../../../../README.md");
    for id in rule_ids() {
        assert!(
            readme.contains(&format!("`{id}`")),
            "README lacks rule {id}"
        );
    }
    for reason in HoldReason::ALL {
        assert_eq!(HoldReason::parse(reason.as_str()), Some(reason));
    }
}
