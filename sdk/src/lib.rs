//! The contract between the CRM host and its modules: what a module declares, what it receives
//! from the host, and the shared pieces (sealing, current user, records, notifications).

mod chrome;
mod clock;
mod context;
mod manifest;
mod module;
mod notify;
mod records;
pub mod redirect;
mod sealing;
mod settings;
mod user;

pub use chrome::Chrome;
pub use clock::{Clock, ManualClock, SystemClock};
pub use context::ModuleContext;
pub use manifest::{
    FieldKind, HOST_API_VERSION, JobSpec, Manifest, ManifestError, MenuItem, SettingField,
};
pub use module::{
    BoxError, FieldError, JobsHandle, Module, SettingsCheck, SettingsHint, StaticAsset,
};
pub use notify::{Audience, Notification, Notifier, NullNotifier};
pub use records::{RecordAccess, RecordDirectory, RecordRef, RecordSummary};
pub use sealing::{SealError, Sealer, SealingKey};
pub use settings::{SettingsError, SettingsStore, SettingsValues};
pub use user::{CSRF_FIELD, CSRF_HEADER, CurrentUser, SIGN_IN_PATH, SignInRequired};
