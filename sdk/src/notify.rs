use async_trait::async_trait;

/// Who a notification is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Audience {
    /// One user of the CRM, by id.
    User(i64),
    /// Every operator (administrator) of the CRM.
    Operators,
}

/// Something a person must know or act on.
#[derive(Debug, Clone)]
pub struct Notification {
    /// Who should see it.
    pub audience: Audience,
    /// One line saying what happened.
    pub subject: String,
    /// What it means and what to do.
    pub body: String,
    /// A page of the CRM where it can be fixed.
    pub link: Option<String>,
    /// The incident it belongs to, when the module will say that it is resolved
    /// ([`Notifier::resolve`] with the same key).
    pub key: Option<String>,
}

/// The host's way to tell people things (inbox, mail, chat: the host decides).
#[async_trait]
pub trait Notifier: Send + Sync + 'static {
    /// Delivers a notification; an error means it was not recorded.
    async fn notify(&self, notification: Notification) -> Result<(), crate::BoxError>;

    /// Marks the notifications of the incident `key` resolved: shown as such, no longer
    /// counted as needing attention.
    async fn resolve(&self, _key: &str) -> Result<(), crate::BoxError> {
        Ok(())
    }

    /// Marks resolved only the notifications of the incident `key` addressed to the user
    /// `user_id` (not the operators'): the incident goes on, but it no longer concerns them.
    async fn resolve_for(&self, _key: &str, _user_id: i64) -> Result<(), crate::BoxError> {
        Ok(())
    }
}

/// A notifier that drops everything (for hosts without one).
#[derive(Debug, Default)]
pub struct NullNotifier;

#[async_trait]
impl Notifier for NullNotifier {
    async fn notify(&self, _notification: Notification) -> Result<(), crate::BoxError> {
        Ok(())
    }
}
