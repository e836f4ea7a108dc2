use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::CurrentUser;

/// A reference to a record of the CRM (a contact, a deal, ...).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RecordRef {
    /// The record's model, e.g. `contact`.
    pub model: String,
    /// The record's id within its model.
    pub id: i64,
}

/// What a module may show of a record.
#[derive(Debug, Clone)]
pub struct RecordSummary {
    /// A human title, e.g. the contact's name.
    pub title: String,
    /// The record's e-mail address, when it has one.
    pub email: Option<String>,
    /// The record's page in the host.
    pub url: String,
}

/// The answer to "may this user see this record?".
#[derive(Debug, Clone)]
pub enum RecordAccess {
    /// No such record.
    Missing,
    /// The record exists but this user may not see it.
    Hidden,
    /// The user may see it.
    Visible(RecordSummary),
}

/// The host's records, as modules may look them up.
#[async_trait]
pub trait RecordDirectory: Send + Sync + 'static {
    /// Looks a record up on behalf of `viewer`.
    async fn find(
        &self,
        record: &RecordRef,
        viewer: &CurrentUser,
    ) -> Result<RecordAccess, crate::BoxError>;

    /// Looks several records up at once, each on behalf of its own viewer: one answer per
    /// `(record, viewer)` pair, in the order given, or the error that stopped the whole
    /// look-up. For a module that admits many requests together (one query instead of one
    /// per request). The default asks [`RecordDirectory::find`] for each pair in turn; a host
    /// whose records live in a database should answer with one query.
    async fn find_many(
        &self,
        lookups: &[(&RecordRef, &CurrentUser)],
    ) -> Result<Vec<RecordAccess>, crate::BoxError> {
        let mut answers = Vec::with_capacity(lookups.len());
        for (record, viewer) in lookups {
            answers.push(self.find(record, viewer).await?);
        }
        Ok(answers)
    }
}
