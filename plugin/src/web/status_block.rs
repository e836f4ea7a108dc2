//! The connection and health block of a server's page (shared or personal): what holds the
//! mailbox and who must act, the token and when it is renewed, and the next step when the
//! server's transport is not the one its sign-in was given for.

use crm_sdk::CurrentUser;
use maud::{Markup, html};

use crate::delivery::classify::HoldReason;
use crate::delivery::health::Health;
use crate::entities::{mail_server, token};
use crate::web::layout::csrf;
use crate::web::servers::{self, server_url};

/// What to do when `server` sends through a transport whose permission its sign-in did not
/// grant (it was switched between SMTP and Microsoft Graph after its Connect): `None` when the
/// stored grant covers the transport.
fn other_transport_words(server: &mail_server::Model, t: &token::Model) -> Option<String> {
    use crate::settings::Resource;
    if server.auth == "app_only" || Resource::of_transport(&server.transport).granted_in(&t.scopes)
    {
        return None;
    }
    let (now, granted, permission) = if server.transport == "graph" {
        ("Microsoft Graph", "SMTP", "Mail.Send")
    } else {
        ("SMTP", "Microsoft Graph", "SMTP.Send")
    };
    Some(format!(
        "Next step: this server now sends through {now}, but its sign-in was given for {granted}. Click Reconnect and sign in as {} to grant {permission}. Until then the CRM asks Microsoft for a {now} token from the same sign-in, which works only where an administrator granted consent for the whole organisation; if Microsoft refuses, the mail waits and this page says so.",
        server.mailbox
    ))
}

/// The connection and health block of a server's page: the health state (held with its
/// reason in words, since when, how many mails wait), then the token, and the buttons that can
/// help (switch to Microsoft Graph where the tenant keeps SMTP AUTH off; Release held mail, for
/// an operator, where a release can help: a hold, not a throttle, which ends by itself).
/// `waiting`: mails queued for the server.
pub fn status_block(
    server: &mail_server::Model,
    token: Option<&token::Model>,
    health: &Health,
    waiting: i64,
    user: &CurrentUser,
) -> Markup {
    // To the second, as the mail pages give their times (a probe may be a minute away).
    let when = |t: chrono::DateTime<chrono::Utc>| t.format("%Y-%m-%d %H:%M:%S UTC").to_string();
    html! {
        div.status {
            @match health {
                Health::Held { reason, detail, since, until, told, .. } => {
                    p { span.badge.bad { "Held: " (reason.title()) } }
                    @let detail_shown = user.is_admin || !reason.needs_operator_for(server.owner_user_id.is_some());
                    @if detail_shown {
                        p role="alert" { (detail) }
                    } @else {
                        // What the operators are told is theirs to do; the owner reads why.
                        p role="alert" { "This mailbox is held because " (reason.in_words()) "." }
                    }
                    p.help {
                        "Held since " (when(*since)) ". "
                        @let once = match reason {
                            HoldReason::Unreachable => "once Microsoft answers again",
                            HoldReason::QuotaExceeded => "once Exchange's 24-hour window has passed (nothing to fix)",
                            _ => "once this is fixed",
                        };
                        @if detail_shown && *reason == HoldReason::Unreachable {
                            // Its words above say how the mails wait and go.
                            @if waiting == 0 { "No mail waits on it now." } @else { (waiting) " mail(s) wait." }
                        }
                        @else if waiting == 0 { "No mail waits on it now; mail queued for it waits without spending attempts and goes out in queue order " (once) "." }
                        @else { (waiting) " mail(s) wait; they spend no attempt and go out in queue order " (once) "." }
                        @if let Some(until) = until { " The mailbox is tried again by itself at " (when(*until)) "." }
                    }
                    @if user.is_admin && *reason == HoldReason::Unreachable {
                        p.help { @if *told { "The operators were notified: it has lasted over 15 minutes." } @else { "The operators are notified if it lasts 15 minutes; a short outage passes by itself." } }
                    }
                    @if !user.is_admin && *reason == HoldReason::Unreachable && !*told {
                        p { "It may pass by itself: the CRM keeps trying, and its operators are told if it lasts. Nothing is needed from you." }
                    } @else if !user.is_admin && health.smtp_out_of_reach() && server.transport == "smtp" {
                        p { "If this mailbox's server settings here are right, nothing is needed from you: the CRM's operators have been told." }
                    } @else if !user.is_admin && *reason == HoldReason::Unreachable {
                        p { "The CRM's operators have been told; nothing is needed from you." }
                    } @else if !user.is_admin && reason.needs_operator_for(server.owner_user_id.is_some()) {
                        p { "The CRM's operators have been told and will fix it; nothing is needed from you." }
                    }
                }
                Health::Throttled { until } => {
                    p { span.badge.warn { "Throttled until " (until.format("%Y-%m-%d %H:%M:%S UTC")) } }
                    p.help { "Microsoft 365 asked the CRM to slow down. " (waiting) " mail(s) wait without spending attempts." }
                }
                Health::Ready => {}
            }
            @match token {
                None if server.auth == "app_only" => {
                    @if *health == Health::Ready { p { span.badge.ok { "App-only" } } }
                }
                None => {
                    p { span.badge.muted { "Not connected" } }
                    p { "No Outlook token is stored. Click Connect and sign in as " strong { (server.mailbox) } " at Microsoft." }
                }
                Some(t) => {
                    @if t.status == "valid" && *health == Health::Ready {
                        p { span.badge.ok { "Outlook token validated" } }
                    }
                    @if let Some(words) = other_transport_words(server, t) {
                        p.flash.warn role="status" { (words) }
                    }
                    p { "Mailbox: " strong { (server.mailbox) } }
                    p { "Signed in at Microsoft as " strong { (t.signed_in_as) } }
                    @if let Some(identity) = &t.smtp_user {
                        p { "Authenticates as " strong { (identity) } " (the identity SMTP AUTH accepts for this mailbox)." }
                    }
                    p.help {
                        @if t.status == "valid" && health.reason() != Some(crate::delivery::classify::HoldReason::GrantDead) {
                            "Access token expires " (when(t.access_expires_at)) "; it is renewed automatically."
                        } @else {
                            "The sign-in can no longer be renewed: only a new sign-in (Reconnect) gives this mailbox a token again."
                        }
                        @match (t.last_refresh_at, &t.last_error) {
                            (Some(at), _) => { " Last refresh " (when(at)) "." }
                            (None, Some(_)) => { " No refresh has succeeded since the sign-in of " (when(t.connected_at)) "." }
                            (None, None) => { " Connected " (when(t.connected_at)) "; not refreshed yet." }
                        } }
                    @if let (Some(e), Health::Ready) = (&t.last_error, health) { p.help { "Last error: " (e) } }
                    @if *health == Health::Ready && waiting > 0 { p.help { (waiting) " mail(s) queued." } }
                }
            }
            @if server.transport != "graph"
                && matches!(health, Health::Held { reason: crate::delivery::classify::HoldReason::SmtpAuthDisabled, .. })
                && servers::may_manage(user, server) {
                form.inline method="post" action="/microsoft_outlook/connect" {
                    (csrf(user))
                    input type="hidden" name="server" value=(server.id);
                    input type="hidden" name="switch_to" value="graph";
                    button type="submit" { "Switch this server to Microsoft Graph" }
                    span.help { " The tenant keeps SMTP AUTH off: send this mailbox's mail through Graph's sendMail instead. You sign in at Microsoft once more to grant Mail.Send; the waiting mail then goes out." }
                }
            }
            @if user.is_admin && health.reason().is_some_and(|r| r.release_can_help()) {
                form.inline method="post" action=(format!("{}/retry", server_url(server))) {
                    (csrf(user))
                    button type="submit" { "Release held mail" }
                    span.help { " Ends the hold and sends the waiting mails now, in queue order (Retry now, on a mail's page, is for that one mail)." }
                }
            }
        }
    }
}
