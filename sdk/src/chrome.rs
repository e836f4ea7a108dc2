use crate::CurrentUser;

/// The host's page frame (header, menu, styles) that module pages are shown in.
pub trait Chrome: Send + Sync + 'static {
    /// Wraps `body` (trusted HTML the module rendered and escaped) in a full page.
    fn page(&self, title: &str, user: Option<&CurrentUser>, body: &str) -> String;
}
