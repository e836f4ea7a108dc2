//! Microsoft identity platform errors: parsing `AADSTS` codes and saying what a person must do.

/// Who has to act on a failure, which decides the module's reaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureClass {
    /// Try again later (5xx, throttling, timeouts, `temporarily_unavailable`).
    Transient,
    /// The mailbox's grant is gone: its owner must connect again.
    NeedsReconnect,
    /// The module's configuration (client id / secret / redirect URI) is wrong: an operator must fix settings or Azure.
    Configuration,
    /// The person cancelled or the request was refused; nothing to retry.
    Refused,
    /// The token endpoint answered something that is not an OAuth document (a proxy's HTML
    /// page, an empty body): a problem of the path to Microsoft, never proof of a dead grant.
    NotOAuth,
}

/// A failure from the identity platform, with the AADSTS code when there is one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AadFailure {
    /// The OAuth `error` value (`invalid_grant`, `access_denied`, ...), or a transport description.
    pub error: String,
    /// The AADSTS number, from `error_codes` or the description's prefix.
    pub code: Option<u32>,
    /// Microsoft's description (user-visible text; always shown escaped).
    pub description: String,
    /// Who must act.
    pub class: FailureClass,
    /// Seconds to wait before retrying, from `Retry-After`.
    pub retry_after_secs: Option<u64>,
}

/// The `AADSTSnnnn` number at the start of a description.
pub fn aadsts_code(description: &str) -> Option<u32> {
    let rest = description.trim_start().strip_prefix("AADSTS")?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// Classifies by `error` first, then by the AADSTS code.
pub fn classify(error: &str, code: Option<u32>) -> FailureClass {
    match (error, code) {
        (
            _,
            Some(7000215 | 7000222 | 700016 | 50011 | 500112 | 700054 | 7000218 | 500011 | 90002),
        ) => FailureClass::Configuration,
        ("invalid_client" | "unauthorized_client", _) => FailureClass::Configuration,
        ("temporarily_unavailable" | "server_error", _) => FailureClass::Transient,
        ("invalid_grant" | "interaction_required" | "consent_required" | "login_required", _) => {
            FailureClass::NeedsReconnect
        }
        (_, Some(65001 | 50076 | 50079 | 50173 | 70008 | 700082)) => FailureClass::NeedsReconnect,
        _ => FailureClass::Refused,
    }
}

/// What happened and what to do, in words, for the AADSTS codes and errors an operator meets.
pub fn explain(error: &str, code: Option<u32>, redirect_uri: &str) -> (String, String) {
    let pair = |what: &str, fix: &str| (what.to_string(), fix.to_string());
    match (error, code) {
        (_, Some(7000215)) => pair(
            "The client secret is invalid.",
            "Create a new client secret in Microsoft Entra ID (App registrations › your app › Certificates & secrets) and paste its Value — not its Secret ID — in Settings › Microsoft Outlook.",
        ),
        (_, Some(7000222)) => pair(
            "The client secret has expired.",
            "Create a new client secret in Azure and paste it, with its expiry date, in Settings › Microsoft Outlook.",
        ),
        (_, Some(700016)) => pair(
            "Microsoft does not know this application (client) ID in this tenant.",
            "Check the Application (client) ID and the tenant in Settings › Microsoft Outlook against the app registration's Overview page.",
        ),
        (_, Some(500011)) => pair(
            "Microsoft did not find the Outlook resource in the tenant (AADSTS500011): the scope belongs to another cloud than the tenant's, or the tenant has no Exchange Online service principal.",
            "In Settings › Microsoft Outlook, choose the cloud the tenant lives in (global, US Government, or China operated by 21Vianet); the authority, the Outlook scope and the SMTP host follow that choice. If the cloud is right, an administrator must make sure Exchange Online is licensed in the tenant.",
        ),
        (_, Some(90002)) => pair(
            "Microsoft does not know this tenant.",
            "Check the Tenant in Settings › Microsoft Outlook: common, organizations, the tenant ID or its domain, in the cloud chosen there.",
        ),
        (_, Some(50011 | 500112)) => (
            "The redirect URI does not match the one registered for the app.".to_string(),
            format!(
                "In Azure (App registrations › your app › Authentication), add a Web redirect URI exactly: {redirect_uri} — mind https and the host name. If the CRM is behind a proxy, CRM_PUBLIC_BASE_URL must be the public https address."
            ),
        ),
        (_, Some(65001)) | ("consent_required", _) => pair(
            "Consent to the app's permissions is missing.",
            "An administrator must grant admin consent (Enterprise applications › your app › Permissions › Grant admin consent), or the mailbox's user must consent when signing in. Then click Connect (Reconnect on a mailbox connected before) and sign in again.",
        ),
        (_, Some(65004)) | ("access_denied", _) => pair(
            "The sign-in was cancelled or consent was declined at Microsoft.",
            "Nothing was changed. Click Connect again when you are ready, and accept the permissions requested.",
        ),
        (_, Some(50076 | 50079)) | ("interaction_required" | "login_required", _) => pair(
            "Microsoft requires an interactive sign-in (multi-factor authentication or a conditional access policy).",
            "Click Connect (or Reconnect) and complete the sign-in at Microsoft.",
        ),
        (_, Some(70008 | 700082)) => pair(
            "The grant has expired (unused for too long, or the sign-in took too long).",
            "Click Connect (Reconnect on a mailbox connected before) and sign in again.",
        ),
        (_, Some(50173)) => pair(
            "The grant was revoked, usually because the mailbox's password changed or sessions were revoked.",
            "Whoever connected the mailbox must click Reconnect and sign in again: an operator, on the mail server's page, for a shared mailbox; its owner, under My mailbox, for a personal one.",
        ),
        (_, Some(54005)) => pair(
            "This sign-in was already used.",
            "Click Connect again; each sign-in can be completed once.",
        ),
        (_, Some(501481)) => pair(
            "Microsoft refused the proof key (PKCE) of this sign-in.",
            "Click Connect again. If it repeats, report it: the CRM sent a proof key that does not match.",
        ),
        ("temporarily_unavailable" | "server_error", _) => pair(
            "Microsoft's sign-in service had a temporary problem.",
            "Wait a minute and click Connect again.",
        ),
        ("unauthorized_client" | "invalid_client", _) => pair(
            "Microsoft refused the application's credentials.",
            "Check the client ID, the client secret and the tenant in Settings › Microsoft Outlook.",
        ),
        _ => pair(
            "Microsoft refused the request.",
            "Check the settings and click Connect (or Reconnect) again; if it repeats, give an administrator Microsoft's code and message, shown with this text.",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_classes() {
        assert_eq!(aadsts_code("AADSTS70008: The provided ..."), Some(70008));
        assert_eq!(aadsts_code("no code"), None);
        assert_eq!(
            classify("invalid_grant", Some(70008)),
            FailureClass::NeedsReconnect
        );
        assert_eq!(
            classify("invalid_client", Some(7000215)),
            FailureClass::Configuration
        );
        assert_eq!(
            classify("invalid_grant", Some(7000222)),
            FailureClass::Configuration
        );
        assert_eq!(
            classify("temporarily_unavailable", None),
            FailureClass::Transient
        );
        assert_eq!(
            classify("access_denied", Some(65004)),
            FailureClass::Refused
        );
    }
}
