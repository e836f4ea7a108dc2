//! The form of a mail server: a shared server's (operators) or a personal mailbox's (its
//! owner), with each field's errors beside it.

use crm_sdk::{CurrentUser, FieldError, ModuleContext};
use maud::{Markup, html};

use crate::web::layout::csrf;
use crate::web::servers::{ServerForm, ServerKind};

/// The SMTP host of the cloud chosen in the settings (the global one until they are saved).
pub(super) async fn cloud_smtp_host(ctx: &ModuleContext) -> String {
    let cloud = ctx
        .settings()
        .load(ctx.module_id())
        .await
        .ok()
        .and_then(|s| s.get("cloud").map(crate::settings::Cloud::parse))
        .unwrap_or_default();
    cloud.smtp_host().to_string()
}

/// The errors of `field`, each in an alert below it.
fn field_error(errors: &[FieldError], field: &str) -> Markup {
    html! {
        @for e in errors.iter().filter(|e| e.field == field) {
            p.error role="alert" { (e.message) }
        }
    }
}

/// The form of a shared server or a personal mailbox (`kind`), posting to `action`, with
/// `form`'s values and `errors` beside their fields. A user's own mailbox shows its address
/// first and folds the connection details, which the CRM's settings fill in.
pub(super) fn server_form(
    user: &CurrentUser,
    action: &str,
    form: &ServerForm,
    kind: ServerKind,
    errors: &[FieldError],
) -> Markup {
    let technical = html! {
        label for="password" { "Password" }
        input #password type="password" name="password" value="" placeholder="leave empty — not used" autocomplete="off";
        p.help { "Not used: the mailbox signs in at Microsoft (Outlook OAuth) with the Connect button of the server's page." }
        (field_error(errors, "password"))
        label for="smtp_host" { "SMTP host" }
        input #smtp_host name="smtp_host" value=(form.smtp_host);
        (field_error(errors, "smtp_host"))
        label for="smtp_port" { "Port" }
        input #smtp_port name="smtp_port" value=(form.smtp_port);
        (field_error(errors, "smtp_port"))
        label for="security" { "Security" }
        select #security name="security" {
            option value="starttls" selected[form.security == "starttls"] { "STARTTLS (port 587)" }
            option value="tls" selected[form.security == "tls"] { "TLS from the start (port 465)" }
            @if kind == ServerKind::Shared || user.is_admin {
                option value="none" selected[form.security == "none"] { "None (local relay only)" }
            }
        }
        (field_error(errors, "security"))
        label for="extra_ca_pem" { "Extra trusted CA certificate (PEM, optional)" }
        textarea #extra_ca_pem name="extra_ca_pem" { (form.extra_ca_pem) }
        p.help { "Only for a relay behind a private certificate authority." }
        (field_error(errors, "extra_ca_pem"))
        @if kind == ServerKind::Shared {
            label for="auth" { "Authentication" }
            select #auth name="auth" {
                option value="delegated" selected[form.auth != "app_only"] { "Outlook OAuth (delegated)" }
                option value="app_only" selected[form.auth == "app_only"] { "App-only (SMTP.SendAsApp)" }
            }
            p.help { "Outlook OAuth: the mailbox signs in at Microsoft once, with Connect. App-only: the app's client credentials, no sign-in; needs SMTP.SendAsApp and an Exchange service principal with access to the mailbox." }
            (field_error(errors, "auth"))
        }
        label for="transport" { "Send through" }
        select #transport name="transport" {
            option value="smtp" selected[form.transport != "graph"] { "SMTP with OAuth (SMTP.Send)" }
            option value="graph" selected[form.transport == "graph"] { "Microsoft Graph (Mail.Send)" }
        }
        p.help { "Choose SMTP where the tenant allows authenticated SMTP (it is off by default in new tenants; Exchange then answers 535 5.7.139). Choose Microsoft Graph where it stays off: the same message goes through Graph's sendMail. Graph needs the Mail.Send, Mail.Send.Shared and Mail.ReadWrite permissions and a new Connect after switching. Host, port and security apply to SMTP only." }
        (field_error(errors, "transport"))
        label for="send_as" { "Send as" }
        select #send_as name="send_as" {
            option value="author" selected[form.send_as != "mailbox"] { "The mail's author (needs Send As)" }
            option value="mailbox" selected[form.send_as == "mailbox"] { "The mailbox itself" }
        }
        p.help { "The mail's author: From is the CRM user who writes the mail, which Exchange allows only where the mailbox has Send As on their address. The mailbox itself: From is the mailbox's address under the author's name, and replies go to the author." }
        (field_error(errors, "send_as"))
        label for="from_allow_list" { "May send as (one address or @domain per line)" }
        textarea #from_allow_list name="from_allow_list" { (form.from_allow_list) }
        p.help { "Empty: any author when sending as the author. Otherwise only these addresses may appear in From." }
        (field_error(errors, "from_allow_list"))
    };
    // A user's own mailbox needs only its address: the rest comes from the CRM's settings.
    let folded = kind == ServerKind::Personal && !user.is_admin;
    let technical_error = errors
        .iter()
        .any(|e| !matches!(e.field.as_str(), "name" | "mailbox"));
    html! {
        form method="post" action=(action) {
            (csrf(user))
            @if !errors.is_empty() { p.flash.bad role="alert" { "Nothing was saved: correct the fields marked below." } }
            label for="name" { "Name" }
            input #name name="name" value=(form.name);
            (field_error(errors, "name"))
            label for="mailbox" { "Mailbox address (username)" }
            input #mailbox type="email" name="mailbox" value=(form.mailbox);
            p.help {
                @if kind == ServerKind::Personal { "Your own Office 365 address, e.g. alice@contoso.com: you sign in with it at Microsoft when you click Connect." }
                @else { "The Office 365 mailbox that signs in, e.g. crm@contoso.com." }
            }
            (field_error(errors, "mailbox"))
            @if folded {
                details.connection-details open[technical_error] {
                    summary { "Connection details — filled in from the CRM's settings; change them only if your operators tell you to" }
                    (technical)
                }
            } @else {
                (technical)
            }
            @if kind == ServerKind::Shared {
                label { input type="checkbox" name="is_default" checked[form.is_default.is_some()]; " Default outgoing server" }
            }
            p { button type="submit" { "Save" } }
        }
    }
}
