//! The settings section as a setup guide: the vendor's procedure step by step (redirect URI to
//! copy, permissions and what each is for, where the client secret's Value is), the secret's
//! expiry as it nears, and the check of the client ID and secret against the token endpoint.

use chrono::NaiveDate;
use crm_sdk::{FieldError, ModuleContext, SettingsCheck};
use maud::{Markup, html};

use crate::connect::aad::{FailureClass, explain};
use crate::connect::token_client::{Grant, request};
use crate::settings::OutlookSettings;

/// Where the copy button's script is served (a file: the Content-Security-Policy allows no
/// inline script).
pub const COPY_SCRIPT_PATH: &str = "/microsoft_outlook/assets/copy.js";

/// The copy button's script.
pub const COPY_SCRIPT: &str = include_str!("../assets/copy.js");

/// Microsoft Entra admin center › App registrations.
pub const PORTAL_APP_REGISTRATIONS: &str =
    "https://entra.microsoft.com/#view/Microsoft_AAD_RegisteredApps/ApplicationsListBlade";

/// The code sent in the check: no sign-in produced it, so Microsoft answers about it only after
/// it accepted the client's credentials.
const PROBE_CODE: &str = "crm-settings-check-not-a-real-code";
/// A PKCE verifier of the legal length (43 characters) for the check's request.
const PROBE_VERIFIER: &str = "crm-settings-check-verifier-0000000000000000";

/// One permission of the app registration, what it is for and which features need it.
struct Permission {
    name: &'static str,
    api: &'static str,
    kind: &'static str,
    purpose: &'static str,
    needed_by: &'static str,
}

const PERMISSIONS: [Permission; 8] = [
    Permission {
        name: "SMTP.Send",
        api: "Microsoft Graph",
        kind: "Delegated",
        purpose: "Send mail over SMTP (AUTH XOAUTH2) as the signed-in mailbox.",
        needed_by: "Sending over SMTP (required)",
    },
    Permission {
        name: "offline_access",
        api: "Microsoft Graph",
        kind: "Delegated",
        purpose: "A refresh token, so the connection lasts beyond the hour and the nightly job keeps it alive.",
        needed_by: "Sending over SMTP (required)",
    },
    Permission {
        name: "openid, email, User.Read",
        api: "Microsoft Graph",
        kind: "Delegated",
        purpose: "Who signed in: the mailbox and its sign-in name, checked on Connect.",
        needed_by: "Connect",
    },
    Permission {
        name: "Mail.Send, Mail.Send.Shared",
        api: "Microsoft Graph",
        kind: "Delegated",
        purpose: "Send through Microsoft Graph (sendMail), from the mailbox or a shared one.",
        needed_by: "The Graph transport",
    },
    Permission {
        name: "User.Read.All, Mail.ReadWrite",
        api: "Microsoft Graph",
        kind: "Delegated",
        purpose: "Look up senders and find sent mail in Sent Items.",
        needed_by: "The Graph transport (optional)",
    },
    Permission {
        name: "SMTP.SendAsApp",
        api: "Office 365 Exchange Online",
        kind: "Application",
        purpose: "Send without a signed-in user (client credentials), once Exchange has the app's service principal and mailbox permissions.",
        needed_by: "App-only servers",
    },
    Permission {
        name: "IMAP.AccessAsUser.All, POP.AccessAsUser.All",
        api: "Microsoft Graph",
        kind: "Delegated",
        purpose: "Read a mailbox over IMAP or POP.",
        needed_by: "Incoming mail (not used for sending)",
    },
    Permission {
        name: "IMAP.AccessAsApp, POP.AccessAsApp",
        api: "Office 365 Exchange Online",
        kind: "Application",
        purpose: "Read mailboxes over IMAP or POP without a signed-in user.",
        needed_by: "Incoming mail, app-only (not used for sending)",
    },
];

/// Whether `value` has the shape of a GUID (`8-4-4-4-12` hexadecimal digits).
pub fn looks_like_guid(value: &str) -> bool {
    let groups: Vec<&str> = value.trim().split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.chars().all(|c| c.is_ascii_hexdigit()))
}

/// Refuses a client secret that is the portal's "Secret ID" (a GUID) instead of its Value.
pub fn secret_field_errors(values: &std::collections::BTreeMap<String, String>) -> Vec<FieldError> {
    match values.get("client_secret") {
        Some(secret) if looks_like_guid(secret) => vec![FieldError {
            field: "client_secret".into(),
            message: "looks like the secret's Secret ID (a GUID), not its Value. In Microsoft Entra ID › App registrations › your app › Certificates & secrets, copy the Value column — it is shown only right after the secret is created; if it is hidden, create a new secret. Nothing was saved.".into(),
        }],
        _ => Vec::new(),
    }
}

/// How near the client secret's expiry is, for the banner.
fn expiry_banner(expires_on: NaiveDate, today: NaiveDate) -> Markup {
    let left = crate::jobs::days_left(expires_on, today);
    let (class, role, words) = match left {
        n if n < 0 => (
            "flash bad secret-expiry",
            "alert",
            format!(
                "The expiry date given for the client secret, {expires_on}, has passed. Microsoft refuses an expired secret, and then no mailbox can refresh its token: create a new client secret in Azure and paste its Value and expiry date below. If the check of a save says Microsoft accepted the secret, the date is wrong: correct it from the secret's Expires column in Azure (Certificates & secrets)."
            ),
        ),
        n if n <= 1 => (
            "flash bad secret-expiry",
            "alert",
            format!(
                "The client secret runs out {}: create a new one in Azure now and paste it below.",
                if n == 0 { "today" } else { "tomorrow" }
            ),
        ),
        n if n <= 7 => (
            "flash bad secret-expiry",
            "alert",
            format!(
                "The client secret runs out in {n} days ({expires_on}): create a new one in Azure and paste it below."
            ),
        ),
        n if n <= 30 => (
            "flash warn secret-expiry",
            "status",
            format!(
                "The client secret runs out in {n} days ({expires_on}): plan to create a new one in Azure."
            ),
        ),
        _ => ("help secret-expiry", "status", String::new()),
    };
    html! {
        @if !words.is_empty() { p class=(class) role=(role) { (words) } }
        p.help { "Client secret: "
            @if left < 0 { "expired on " (expires_on) } @else { (left) " day(s) left (expires " (expires_on) ")" } }
    }
}

/// The guide shown above the module's settings fields.
/// How many mailboxes are held because Microsoft refused the module's settings (the client
/// ID or secret, the cloud, the token endpoint: the holds a save of the settings ends), and
/// what the most recent such hold said; `None` when there is none (or the database is away).
async fn refused_settings(ctx: &ModuleContext) -> Option<(usize, String)> {
    let now = ctx.clock().now();
    let healths = crate::delivery::health::all(ctx).await.ok()?;
    let mut held: Vec<(chrono::DateTime<chrono::Utc>, String)> = healths
        .values()
        .filter_map(
            |row| match crate::delivery::health::Health::of(Some(row), now) {
                crate::delivery::health::Health::Held {
                    reason,
                    detail,
                    since,
                    ..
                } if reason.ends_on_settings_saved() => Some((since, detail)),
                _ => None,
            },
        )
        .collect();
    held.sort_by_key(|(since, _)| std::cmp::Reverse(*since));
    let count = held.len();
    held.into_iter().next().map(|(_, detail)| (count, detail))
}

pub async fn guide(ctx: &ModuleContext) -> String {
    let redirect_uri = ctx.public_url(crate::CONFIRM_PATH);
    let values = ctx
        .settings()
        .load(ctx.module_id())
        .await
        .unwrap_or_default();
    let expires_on = values
        .get("client_secret_expires_on")
        .and_then(|d| NaiveDate::parse_from_str(d, "%Y-%m-%d").ok());
    let today = ctx.clock().now().date_naive();
    let configured = values.get("client_id").is_some() && values.has_secret("client_secret");
    let refused = refused_settings(ctx).await;
    html! {
        @if let Some((held, detail)) = &refused {
            div.flash.bad role="alert" {
                p { strong { "Microsoft refuses these settings: " (held) " mailbox(es) hold their mail until they are corrected." } }
                p { (detail) }
                p { "Correct the client ID, the secret or the tenant below and save. If Microsoft accepts them, the held mail goes out at once, in queue order; if not, the mail goes on waiting and the check below says why." }
            }
        }
        @if let Some(expires_on) = expires_on { (expiry_banner(expires_on, today)) }
        details.setup-guide open[!configured] {
            summary { strong { "Setup guide" } " — register the app in Microsoft Entra ID, then fill in the fields below" }
            ol.steps {
                li {
                    strong { "Register the application. " }
                    "In the " a href=(PORTAL_APP_REGISTRATIONS) rel="noopener" { "Microsoft Entra admin center › App registrations" }
                    " choose New registration: any name (e.g. CRM mail), supported account types "
                    em { "Accounts in any organizational directory (multi-tenant)" }
                    ", redirect URI of type " strong { "Web" } ":"
                    p.copy-row {
                        code.copy id="redirect-uri" { (redirect_uri) }
                        " " button.secondary.copy-button type="button" data-copy="redirect-uri" { "Copy" }
                    }
                    p.help { "It must match exactly, https and host name included; it is built from the CRM's public base URL." }
                }
                li {
                    strong { "API permissions. " }
                    "Add these, then " strong { "Grant admin consent" } ":"
                    div.scroll {
                        table.permissions {
                            thead { tr { th { "Permission" } th { "API, type" } th { "What it is for" } th { "Needed by" } } }
                            tbody {
                                @for p in &PERMISSIONS {
                                    tr { td { code { (p.name) } } td { (p.api) ", " (p.kind) } td { (p.purpose) } td { (p.needed_by) } }
                                }
                            }
                        }
                    }
                }
                li {
                    strong { "Client secret. " }
                    "Copy the Application (client) ID from the app's Overview page. Under Certificates & secrets create a "
                    "New client secret (up to 730 days; the default is 6 months). Copy its " strong { "Value" }
                    " — not its " em { "Secret ID" } " — at once: it is shown only once. Note its Expires date: the CRM warns 30, 7 and 1 days before."
                }
                li {
                    strong { "Send As. " }
                    "The CRM signs in as the outgoing server's mailbox and puts the author in From, so that mailbox needs "
                    em { "Send As" } " on the mailbox of every user who sends from the CRM: in the Microsoft 365 admin center, "
                    "Users › the user › Mail › Mailbox permissions › Send as, add the CRM's mailbox. Do it for each new employee, "
                    "and assign those users to the enterprise application (Users and groups)."
                }
                li {
                    strong { "Fill in and save below. " }
                    "On save the CRM checks the client ID and secret with Microsoft's token endpoint and says what it found."
                }
                li {
                    strong { "Next step: " }
                    a.button href="/microsoft_outlook/servers" { "Outgoing mail servers" }
                    " — add the mailbox (smtp.office365.com, 587, STARTTLS, no password) and click Connect."
                }
            }
        }
        script src=(COPY_SCRIPT_PATH) defer {}
    }
    .into_string()
}

/// Checks the saved client ID and secret with the token endpoint: an authorization-code
/// exchange with a code no sign-in produced. Microsoft checks the client's credentials first,
/// so an answer about the code means they were accepted (MICROSOFT.md › Checking a client
/// secret before any user signs in).
pub async fn verify(ctx: &ModuleContext, http: &oauth2::reqwest::Client) -> Option<SettingsCheck> {
    let settings = match OutlookSettings::load(ctx).await {
        Ok(s) => s,
        Err(problem) => {
            return Some(SettingsCheck {
                verified: None,
                title: "The client ID and secret were not checked.".into(),
                detail: problem.to_string(),
                code: None,
                next: None,
            });
        }
    };
    let redirect_uri = ctx.public_url(crate::CONFIRM_PATH);
    let answer = request(
        http,
        &settings,
        Grant::AuthorizationCode {
            code: PROBE_CODE,
            redirect_uri: &redirect_uri,
            verifier: PROBE_VERIFIER,
        },
        crate::settings::Resource::Outlook,
    )
    .await;
    let code_text = |code: Option<u32>| code.map(|c| format!("AADSTS{c}"));
    Some(match answer {
        Ok(_) => verified(&settings, next_step(ctx).await),
        Err(f) if f.class == FailureClass::Configuration => {
            let (what, fix) = explain(&f.error, f.code, &redirect_uri);
            SettingsCheck {
                verified: Some(false),
                title: what,
                detail: format!("{fix} Microsoft said: {}", f.description),
                code: code_text(f.code).or(Some(f.error)),
                next: None,
            }
        }
        // The made-up sign-in code is refused once the credentials are accepted.
        Err(f) if f.error == "invalid_grant" => verified(&settings, next_step(ctx).await),
        Err(f) if matches!(f.class, FailureClass::Transient | FailureClass::NotOAuth) => {
            SettingsCheck {
                verified: None,
                title: "Microsoft's token endpoint could not be reached; the client ID and secret were not checked.".into(),
                detail: format!(
                    "{} ({}). The settings were saved; save again later to check them.",
                    f.description,
                    settings.token_url()
                ),
                code: code_text(f.code),
                next: None,
            }
        }
        Err(f) => {
            let (what, fix) = explain(&f.error, f.code, &redirect_uri);
            SettingsCheck {
                verified: Some(false),
                title: what,
                detail: format!("{fix} Microsoft said: {}", f.description),
                code: code_text(f.code).or(Some(f.error)),
                next: None,
            }
        }
    })
}

/// The check's answer when Microsoft accepted the client ID and secret (it then refused only
/// the sign-in code the check made up, with `invalid_grant`: no code is shown for that), with
/// the `next` step as a link.
fn verified(
    settings: &OutlookSettings,
    next: Result<Option<(String, String)>, sea_orm::DbErr>,
) -> SettingsCheck {
    let next = next.unwrap_or_else(|_| {
        Some((
            "Outgoing mail servers".into(),
            "/microsoft_outlook/servers".into(),
        ))
    });
    let then = match &next {
        None => "Mail goes out through the connected mail servers.",
        Some((_, path)) if path.ends_with("/new") => {
            "Next, add the outgoing mail server, then click Connect on its page and sign in as its mailbox."
        }
        Some(_) => {
            "Next, click Connect on the outgoing mail server's page and sign in as its mailbox."
        }
    };
    SettingsCheck {
        verified: Some(true),
        title: "Client ID and secret verified: Microsoft accepted them.".into(),
        detail: format!(
            "The token endpoint of tenant {} ({}) accepted the application's credentials. {then}",
            settings.tenant, settings.authority_url
        ),
        code: None,
        next,
    }
}

/// What to do after verified settings, as a link: add a shared outgoing mail server while
/// there is none, connect one while none is connected; nothing once one is.
async fn next_step(ctx: &ModuleContext) -> Result<Option<(String, String)>, sea_orm::DbErr> {
    use crate::entities::{mail_server, token};
    use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};
    let servers = mail_server::Entity::find()
        .filter(mail_server::Column::Kind.eq("shared"))
        .all(ctx.db())
        .await?;
    if servers.is_empty() {
        return Ok(Some((
            "Add the outgoing mail server".into(),
            "/microsoft_outlook/servers/new".into(),
        )));
    }
    let connected = token::Entity::find()
        .filter(token::Column::ServerId.is_in(servers.iter().map(|s| s.id)))
        .all(ctx.db())
        .await?;
    let needs_sign_in = |s: &&mail_server::Model| {
        s.auth != "app_only" && !connected.iter().any(|t| t.server_id == s.id)
    };
    Ok(servers.iter().find(needs_sign_in).map(|first| {
        (
            format!("Connect {}", first.mailbox),
            crate::web::servers::server_url(first),
        )
    }))
}

/// What disabling the module leaves behind.
pub async fn disable_consequences(ctx: &ModuleContext) -> Vec<String> {
    use sea_orm::{EntityTrait, PaginatorTrait, QueryFilter};
    let queued = crate::entities::outbox::Entity::find()
        .filter(crate::entities::outbox::unsent())
        .count(ctx.db())
        .await
        .unwrap_or(0);
    vec![
        format!(
            "{queued} queued mail(s) stay queued and are not sent while the module is disabled; they go out when it is enabled again."
        ),
        "Its jobs stop (token refresh, client secret check, delivery): tokens unused for 90 days lapse.".into(),
        "Its pages (Outgoing mail servers, My mailbox) answer that the module is disabled. Its data and settings are kept.".into(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_id_is_told_apart_from_a_value() {
        assert!(looks_like_guid("0b2f1c3e-8d4a-4f6b-9c1d-2e3f4a5b6c7d"));
        assert!(!looks_like_guid(
            "Xy8Q~abcdefghijklmnopqrstuvwxyz0123456789"
        ));
        assert!(!looks_like_guid("0b2f1c3e-8d4a-4f6b-9c1d-2e3f4a5b6c7"));
        let mut values = std::collections::BTreeMap::new();
        values.insert(
            "client_secret".to_string(),
            "0b2f1c3e-8d4a-4f6b-9c1d-2e3f4a5b6c7d".to_string(),
        );
        assert_eq!(secret_field_errors(&values)[0].field, "client_secret");
    }

    #[test]
    fn the_expiry_is_louder_as_it_nears() {
        let today = NaiveDate::from_ymd_opt(2026, 1, 1).expect("date");
        let at =
            |days: i64| expiry_banner(today + chrono::Duration::days(days), today).into_string();
        assert!(at(40).contains("40 day(s) left"));
        assert!(!at(40).contains("flash"));
        assert!(at(30).contains("flash warn"));
        assert!(at(7).contains("flash bad"));
        assert!(at(1).contains("tomorrow"));
        assert!(at(-1).contains("expired on"));
    }
}
